"""The information-flow cliff of a truncation curve (:func:`cliff_report`) and the search that finds it
(:func:`search_cliff`): pure functions of the scores, with no model and no files.

.. code-block:: python

    baseline, curve, search = search_cliff(range(32), evaluate, mode="bisect", tolerance=1.0)
    cliff_report(curve, baseline, tolerance=1.0)["cliff_layer"]

``evaluate(layers)`` scores a list of layers (``None`` = the baseline, no pruning) and returns ``{layer: score}``;
the search decides which layers to ask for, in rounds, and never asks for one twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["cliff_report", "search_cliff", "within", "Evaluate"]

Evaluate = Callable[[Sequence[int | None]], Mapping[int | None, float]]
"""Scores the given layers (``None``: the baseline) and returns ``{layer: main metric}`` for each."""


def cliff_report(curve: Mapping[int, float], baseline: float, *, tolerance: float = 1.0,
                 higher_is_better: bool = True, scale: float = 100.0) -> dict[str, Any]:
    """The information-flow cliff layer of a truncation curve, and how much the definition can be trusted.

    Args:
        curve: evaluated layer ``L`` -> main metric with the image dropped from ``L`` on.
        baseline: the unpruned metric.
        tolerance: in points (``tolerance / scale`` in metric units).
        higher_is_better: False for CHAIR (lower is better): decides what "hurts".
        scale: metric units per point (100: ratios).

    Returns:
        a JSON-able dict: ``cliff_layer`` (smallest L with every evaluated L' >= L within tolerance, or None),
        ``no_harm_layer`` (smallest L with every L' >= L at least as good as the baseline), ``first_no_harm_layer``,
        ``within`` per layer, ``monotone`` (no later layer further from the baseline than an earlier one by more than
        the tolerance), ``violations`` (the worst such pairs), ``within_below_cliff`` and a ``note``.
    """
    layers = sorted(int(x) for x in curve)
    tol = tolerance / scale
    eps = 1e-12
    gap = {x: abs(curve[x] - baseline) for x in layers}
    within = {x: gap[x] <= tol + eps for x in layers}

    def hurts(x: int) -> bool:
        return curve[x] < baseline - eps if higher_is_better else curve[x] > baseline + eps

    def tail_start(ok: Mapping[int, bool]) -> int | None:
        start = None
        for x in reversed(layers):
            if not ok[x]:
                break
            start = x
        return start

    cliff = tail_start(within)
    no_harm = tail_start({x: not hurts(x) for x in layers})
    first_no_harm = next((x for x in layers if not hurts(x)), None)
    violations = sorted(
        ({"from": a, "to": b, "gap_from_points": round(gap[a] * scale, 6), "gap_to_points": round(gap[b] * scale, 6)}
         for i, a in enumerate(layers) for b in layers[i + 1:] if gap[b] > gap[a] + tol + eps),
        key=lambda v: v["gap_from_points"] - v["gap_to_points"])
    islands = [x for x in layers if within[x] and (cliff is None or x < cliff)]
    monotone = not violations
    if not layers:
        note = "no layer evaluated"
    elif cliff is None:
        note = (f"no cliff: the last evaluated layer {layers[-1]} is {gap[layers[-1]] * scale:.2f} points from the "
                f"baseline (tolerance {tolerance:g})")
    elif monotone:
        note = (f"monotone within {tolerance:g} points: from layer {cliff} on, dropping the image changes the score "
                f"by at most the tolerance")
    else:
        worst = violations[0]
        note = (f"not monotone enough for a clean cliff: layer {worst['to']} is {worst['gap_to_points']:.2f} points "
                f"from the baseline although layer {worst['from']} was {worst['gap_from_points']:.2f}"
                + (f"; layers {islands} below the cliff are within tolerance too" if islands else "")
                + "; the cliff layer is still the smallest L past which every evaluated layer is within tolerance")
    return {
        "cliff_layer": cliff, "no_harm_layer": no_harm, "first_no_harm_layer": first_no_harm,
        "tolerance_points": tolerance, "baseline": baseline, "higher_is_better": higher_is_better,
        "curve": {str(x): curve[x] for x in layers},
        "delta_points": {str(x): round((curve[x] - baseline) * scale, 6) for x in layers},
        "within": {str(x): within[x] for x in layers}, "monotone": monotone, "violations": violations[:10],
        "within_below_cliff": islands, "meaningful": monotone and cliff is not None, "note": note,
    }


def within(value: float, baseline: float, tol_points: float) -> bool:
    """Whether ``value`` is within ``tol_points`` points (1 point = 0.01) of ``baseline``."""
    return abs(value - baseline) <= tol_points / 100.0 + 1e-12


def bisect_violation(curve: Mapping[int, float], baseline: float, tol: float) -> str | None:
    """Why the evaluated points contradict a monotone curve, or None."""
    rep = cliff_report(curve, baseline, tolerance=tol)
    layers = sorted(curve)
    for i, a in enumerate(layers):
        for b in layers[i + 1:]:
            if within(curve[a], baseline, tol) and not within(curve[b], baseline, tol):
                return f"layer {a} is within tolerance but the later layer {b} is not"
    if rep["violations"]:
        v = rep["violations"][0]
        return f"layer {v['to']} is {v['gap_to_points']:.2f} points from the baseline, layer {v['from']} only " \
               f"{v['gap_from_points']:.2f}"
    return None



def search_cliff(layers: Sequence[int], evaluate: Evaluate, *, mode: str = "full",
                 tolerance: float = 1.0) -> tuple[float, dict[int, float], dict[str, Any]]:
    """Evaluate the layers the cliff layer needs, in rounds of ``evaluate`` calls.

    ``mode="full"``: one round, the baseline and every layer. ``mode="bisect"``: the baseline with the first and last
    layers, then bisection on "within ``tolerance`` points of the baseline" (O(log layers) rounds of one layer on a
    monotone curve); as soon as the evaluated layers contradict a monotone curve, one more round with every layer not
    yet evaluated. When the last layer is off the baseline, or the first is already within, nothing more is needed.

    Args:
        layers: sorted candidate layers (at least one).
        evaluate: scores a list of layers, ``None`` the baseline (:data:`Evaluate`).
        mode: ``"full"`` or ``"bisect"``.
        tolerance: in points of the metric (1 point = 0.01).

    Returns:
        ``(baseline, curve, search)``: the baseline's score, ``{layer: score}`` of every evaluated layer, and the
        search's record (``mode``, ``layers``; for bisect also ``fallback``, ``reason`` and a ``note``).
    """
    layers = list(layers)
    search: dict[str, Any] = {"mode": mode, "layers": layers}
    if mode == "full":
        got = evaluate([None, *layers])
        return got[None], {x: got[x] for x in layers}, search
    got = dict(evaluate([None, *sorted({layers[0], layers[-1]})]))
    base = got.pop(None)
    curve: dict[int, float] = dict(got)  # type: ignore[arg-type]
    lo, hi = 0, len(layers) - 1
    reason = None
    if within(curve[layers[hi]], base, tolerance) and not within(curve[layers[lo]], base, tolerance):
        while hi - lo > 1:
            mid = (lo + hi) // 2
            curve.update(evaluate([layers[mid]]))  # type: ignore[arg-type]
            if within(curve[layers[mid]], base, tolerance):
                hi = mid
            else:
                lo = mid
            reason = bisect_violation({x: curve[x] for x in layers if x in curve}, base, tolerance)
            if reason:
                break
    if reason:
        curve.update(evaluate([x for x in layers if x not in curve]))  # type: ignore[arg-type]
    search.update(fallback=bool(reason), reason=reason, note=(
        f"not monotone ({reason}): evaluated every layer" if reason else
        "bisection assumes a monotone curve: layers not evaluated are assumed to lie between their neighbours"))
    return base, {x: curve[x] for x in layers if x in curve}, search
