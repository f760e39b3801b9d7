"""The report's attention-knockout curves: per task, the CVPR 2025 four edges (image -> question, image -> last,
question -> last, last -> last) cut in disjoint windows covering the depth, through the engine of ``flowkern
knockout`` (:func:`flowkern.eval.sweep.knockout.run_knockout`), and the plain-words verdict computed from them.

The window is the CVPR protocol's 9 of 32 layers scaled to the model (:func:`flowkern.eval.sweep.knockout.
default_window`: 2 of the demo model's 8), its starts ``0, k, 2k, ...`` (the last window ending at the last layer).
Each task answers its first :data:`QUESTIONS` questions (``--quick``: fewer), in the order of its file. Per window the
curve is ``p_change``: the mean relative change (%) in the probability of the unblocked model's first answer token.
The sweep folders go to ``sweeps/<task>-knockout/`` beside the truncation sweeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowkern.demo.report.config import TASKS
from flowkern.demo.report.records import Conclusion, FigureRecord

__all__ = ["QUESTIONS", "SECTION", "TOPIC", "KnockoutSection", "knockout_stage", "knockout_conclusions", "section_html"]

QUESTIONS = {"full": 16, "quick": 8}
"""Questions per task answered at every knockout point."""

SECTION = "knockout"
"""The report section (and figure section) of the curves."""

TOPIC = "attention knockout"
"""The topic of the verdict sentence among the report's conclusions."""

MARGIN = 1.0
"""Percentage points by which one cut must hurt more than another to count (below it: a tie)."""

EDGE_LABELS = {"image->user": "image \u2192 question", "image->last": "image \u2192 last",
               "user->last": "question \u2192 last", "last->last": "last \u2192 last"}


@dataclass
class KnockoutSection:
    """What the knockout stage measured: per task label ``{edge: {first layer: p_change %}}``, the window, the
    questions per task, the seconds it took, the figures and the sentences."""

    curves: dict[str, dict[str, dict[int, float]]]
    window: int
    questions: int
    seconds: float
    figures: list[FigureRecord] = field(default_factory=list)
    conclusions: list[Conclusion] = field(default_factory=list)


def _starts(num_layers: int, k: int) -> list[int]:
    starts = list(range(0, num_layers - k + 1, k))
    if starts[-1] + k < num_layers:
        starts.append(num_layers - k)
    return starts


def knockout_stage(model: Any, processor: Any, loaded: Mapping[str, Any], *, tmp: Path, model_id: str, quick: bool,
                   batch_size: int, max_new_tokens: Mapping[str, int], device: str, progress: bool) -> KnockoutSection:
    """Run the four edges' knockout sweeps of every task into ``tmp / "sweeps"`` and draw their figure into
    ``tmp / "figures"``.

    Args:
        loaded: per task world ``(task, data folder, images folder or None)`` as the report drew them.
        max_new_tokens: per task loader, the answer length limit.
    """
    import time

    from flowkern.eval.sweep.knockout import KnockoutConfig, default_window, run_knockout
    from flowkern.hf.models import get_adapter

    start = time.perf_counter()
    num_layers = len(get_adapter(model).decoder_layers(model))
    k = default_window(num_layers)
    n = QUESTIONS["quick" if quick else "full"]
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for t in TASKS:
        _, folder, images = loaded[t.world]
        result = run_knockout(KnockoutConfig(
            model=model_id, task=t.loader, data=folder, images=images, out=tmp / "sweeps" / f"{t.world}-knockout",
            window=k, layers=_starts(num_layers, k), limit=n, batch_size=batch_size,
            max_new_tokens=max_new_tokens[t.loader], device=device), model=model, processor=processor,
            progress=progress)
        curves[t.label] = {e: {a: v["p_change"] for a, v in c.items()} for e, c in result.curves.items()}
    section = KnockoutSection(curves=curves, window=k, questions=n, seconds=round(time.perf_counter() - start, 2))
    section.figures = [_draw(tmp / "figures", section)]
    section.conclusions = knockout_conclusions(section)
    return section


def _draw(fdir: Path, s: KnockoutSection) -> FigureRecord:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fdir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(s.curves), figsize=(3.2 * len(s.curves), 3.0), sharey=True, squeeze=False)
    for ax, (label, curves) in zip(axes[0], s.curves.items(), strict=True):
        for edge, c in curves.items():
            xs = sorted(c)
            ax.plot([f"{a}-{a + s.window - 1}" for a in xs], [c[a] for a in xs], marker="o",
                    label=EDGE_LABELS.get(edge, edge))
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("cut layers")
    axes[0][0].set_ylabel("answer probability change (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = fdir / "knockout.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return FigureRecord(id="knockout", file="figures/knockout.png", section=SECTION,
                        title="Attention knockout (CVPR 2025 form)",
                        caption=f"Per task, the mean relative change in the probability of the unblocked model's first "
                                f"answer token when one edge is cut in a window of {s.window} layers ({s.questions} "
                                "questions per task; 'last' is the last prompt position).")


def _worst(c: Mapping[int, float]) -> tuple[int, float]:
    a = min(c, key=lambda x: c[x])
    return a, c[a]


def knockout_conclusions(s: KnockoutSection) -> list[Conclusion]:
    """The verdict sentences: does cutting image -> last hurt more than image -> question at some depth (the CVPR
    finding is that it does not: the image reaches the answer through the question tokens, in shallow layers, and
    the question reaches the last position in middle layers)?"""
    rows, through_question, direct, order = [], 0, 0, 0
    for label, c in s.curves.items():
        iq, il, ql = c.get("image->user"), c.get("image->last"), c.get("user->last")
        if not (iq and il and ql):
            continue
        (aq, vq), (al, vl), (aql, vql) = _worst(iq), _worst(il), _worst(ql)
        direct += any(il[a] < iq[a] - MARGIN for a in il if a in iq)
        through_question += vq < vl - MARGIN
        order += aq < aql and vq < -MARGIN and vql < -MARGIN
        rows.append(f"{label}: image \u2192 question {vq:+.0f}% at layers {aq}-{aq + s.window - 1}, image \u2192 last "
                    f"{vl:+.0f}% at {al}-{al + s.window - 1}, question \u2192 last {vql:+.0f}% at {aql}-"
                    f"{aql + s.window - 1}")
    if not rows:
        return [Conclusion(TOPIC, "cannot tell", "No task had all three image / question edges.")]
    n = len(rows)
    verdict = "matches" if through_question == n and order == n else "partly" if through_question or order else \
        "does not match"
    text = (f"Cutting image \u2192 last hurts more than image \u2192 question (by more than {MARGIN:g} point) at some "
            f"depth in {direct} of {n} tasks; the worst image \u2192 question cut is worse than the worst image \u2192 "
            f"last cut in {through_question} of {n}, and both it and the worst question \u2192 last cut hurt, the "
            f"former in earlier layers, in {order} of {n} (the "
            "CVPR 2025 finding: the image flows into the question tokens in shallow layers, the question into the "
            "last position in middle layers). " + "; ".join(rows) + ".")
    return [Conclusion(TOPIC, verdict, text)]


def section_html(figures_html: str, found: Sequence[Conclusion], esc: Any) -> list[str]:
    """The report section (empty without a knockout sentence): the figure and the verdict (``esc``: the page's HTML
    escape)."""
    own = [c for c in found if c.topic == TOPIC]
    if not own:
        return []
    return [f'<section id="{SECTION}"><h2>Attention knockout: what the answer needs (CVPR 2025)</h2>',
            "<p>Computed with <code>flowkern knockout</code>'s engine: one edge cut at a time "
            "(<code>flowkern.knockout</code>, inside the fused kernel) in windows of layers over the depth; an edge "
            "src \u2192 dst means the dst tokens cannot read the src tokens there. Every window's numbers: "
            "<code>sweeps/&lt;task&gt;-knockout/knockout.csv</code>.</p>",
            figures_html,
            "<ul>" + "".join(f"<li><b>{esc(c.verdict)}</b>: {esc(c.text)}</li>" for c in own) + "</ul>",
            "</section>"]
