"""The engine behind ``flowkern knockout``: a task answered unblocked (the baseline) and with one attention edge cut
(:func:`flowkern.knockout`) in a window of ``k`` decoder layers, for each edge and each window start over the depth:
the CVPR 2025 "cross-modal information flow" curves, resumable and sharded like ``flowkern sweep``.

.. code-block:: python

    from flowkern.eval.sweep.knockout import KnockoutConfig, run_knockout

    result = run_knockout(KnockoutConfig(model="llava-hf/llava-1.5-7b-hf", task="pope", data="pope/coco",
                                         images="pope/val2014", out="runs/pope-knockout"))
    result.curves["image->last"]        # {window start: {"p_change": %, "value": F1}}

**Points.** The baseline and, for each edge ``src->dst`` of ``edges`` (default :data:`flowkern.knockout.CVPR_EDGES`)
and each window start ``a`` of ``layers`` (default every start with a full window, ``0 .. L - k``), the point
``<src>-<dst>-L<a>``: ``flowkern.knockout(model, [(src, dst)], layers=range(a, a + k))`` around greedy ``generate``.
The window ``k`` defaults to the CVPR protocol's 9 layers of 32, scaled to the model's depth ``L``:
``k = max(1, round(9 * L / 32))`` (9 for 32 layers, 2 for the demo model's 8). Each point is an ``flowkern eval``
output folder (``answers.jsonl``, ``run.json``, ``metrics.json``) under ``<out>/points/``.

**What is measured per point.** The task metric of its answers (:data:`flowkern.eval.sweep.MAIN_METRIC`), and the
*relative change in the probability of the model's own unblocked answer*: for each question, ``t`` is the first
token the unblocked model generates (greedy), ``p0`` its probability (softmax over the vocabulary at the last prompt
position) without cuts and ``p`` under the point's cuts; ``p_change = 100 * mean_q(p / p0 - 1)`` percent (-100: the
answer's first token is gone; 0: unchanged). Each answer line carries ``answer_token``, ``p_answer`` (``p``) and
``p_unblocked`` (``p0``), so the number is recomputed from the point's file alone.

**Reuse, resume, torchrun.** The engine of :mod:`flowkern.eval.sweep` (:class:`flowkern.eval.sweep.engine.Engine`)
runs the points: batch-major, the images encoded once per batch, the layers below each window shared
(:class:`flowkern.hf.reuse.PrefixShare`: below its window a point computes exactly the unblocked prefill; the point
with the latest window records them, the others skip them); answers appended and fsync-ed per (point, batch); a
rerun resumes; ``sweep.json`` holds the settings, the knockout spec (``edges``, ``window``) among them, and a rerun
under other ones is refused; batches dealt to ``torchrun`` processes and merged on process 0.

**Outputs.** ``results.jsonl`` (one record per scored point), ``knockout.csv``, ``knockout.json`` (the curves, the
definitions) and ``knockout.png`` (:func:`plot_knockout`: one curve per edge vs the window's first layer, the
probability change above and the task metric below).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowkern.eval.run import EvalConfig, EvalPlan, EvalUsageError, prepare
from flowkern.eval.sweep.dist import Dist
from flowkern.eval.sweep.engine import Engine
from flowkern.eval.sweep.files import POINTS_DIR, RESULTS_FILE, claim_out, start_sweep
from flowkern.eval.sweep.points import (
    MAIN_METRIC,
    SWEEP_SETTINGS,
    Point,
    RunOptions,
    SweepUsageError,
    parse_layer_spec,
)
from flowkern.knockout import CVPR_EDGES, parse_edge

__all__ = ["KnockoutConfig", "KnockoutResult", "run_knockout", "default_window", "KNOCKOUT_CSV", "KNOCKOUT_JSON",
           "KNOCKOUT_FIGURE"]

KNOCKOUT_CSV = "knockout.csv"
KNOCKOUT_JSON = "knockout.json"
KNOCKOUT_FIGURE = "knockout.png"


def default_window(num_layers: int) -> int:
    """The CVPR protocol's window of 9 layers (of 32) scaled to ``num_layers``: ``max(1, round(9 * L / 32))``."""
    return max(1, round(9 * num_layers / 32))


@dataclass(frozen=True)
class KnockoutConfig(RunOptions):
    """What to sweep (the options of ``flowkern knockout``).

    Attributes (besides :class:`flowkern.eval.sweep.points.RunOptions`; ``out`` also gets knockout.csv,
    knockout.json and knockout.png):
        edges: ``"src->dst"`` edges, one series each (default the CVPR four).
        window: layers per window (None: :func:`default_window`).
        layers: the window starts: ``"all"`` (every start with a full window) or a layer spec / list.
    """

    edges: tuple[str, ...] = tuple(f"{s}->{d}" for s, d in CVPR_EDGES)
    window: int | None = None
    layers: str | Sequence[int] = "all"


@dataclass
class KnockoutResult:
    """What :func:`run_knockout` produced: the baseline metric, per edge ``{start: {"p_change", "value"}}``."""

    out: Path
    window: int
    baseline: float | None
    curves: dict[str, dict[int, dict[str, float]]]
    generated: int
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


class KnockoutEngine(Engine):
    """The sweep engine with knockout points: answers carry the first answer token's probabilities."""

    def __init__(self, config: KnockoutConfig, dist: Dist, model: Any = None, processor: Any = None) -> None:
        super().__init__(config, dist, model, processor)  # type: ignore[arg-type]
        self._reference: Any = None

    def eval_config(self, point: Point, out: Path | None = None) -> EvalConfig:
        c = self.config
        return EvalConfig(model=c.model, task=c.task, data=c.data, out=out or self.out / POINTS_DIR / point.name,
                          images=c.images, limit=c.limit, batch_size=c.batch_size, max_new_tokens=c.max_new_tokens,
                          strict=c.strict, split=c.split, ocr=c.ocr, device=self.dist.device, dtype=c.dtype)

    def run_group(self, group: Sequence[Point], batch: Sequence[Any], inputs: Any, max_new: int) -> Any:
        """:meth:`Engine.run_group`, with the unblocked first-token probabilities of the batch at hand: from the
        baseline's answers when it is in the group (it runs first), else from one plain forward of the prompt."""
        self._reference = None
        if not any(p.layer is None for p in group):
            import torch

            with torch.inference_mode():
                self._reference = self.model(**inputs).logits[:, -1].float().softmax(-1).cpu()
        try:
            yield from super().run_group(group, batch, inputs, max_new)
        finally:
            self._reference = None

    def answer(self, p: Point, images: Sequence[Any], prompts: Sequence[str], inputs: Any,
               max_new: int) -> tuple[list[str], list[dict[str, Any]]]:
        from flowkern.knockout import knockout

        cut = contextlib.nullcontext()
        if p.edge is not None:
            cut = knockout(self.model, [parse_edge(p.edge)], layers=range(p.layer, p.layer + p.window))
        texts, probs = _generate(self.model, self.processor, inputs, max_new, cut)
        if p.layer is None:
            self._reference = probs
        ref = self._reference
        token = ref.argmax(-1)
        p0 = ref.gather(1, token[:, None])[:, 0]
        pk = probs.gather(1, token[:, None])[:, 0]
        extras = [{"answer_token": int(t), "p_answer": float(a), "p_unblocked": float(b)}
                  for t, a, b in zip(token, pk, p0, strict=True)]
        return texts, extras

    def point_record(self, p: Point, plan: EvalPlan, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"point": p.name, "series": p.series, "edge": p.edge, "layer": p.layer,
                "layers": None if p.layer is None else [p.layer, p.layer + p.window - 1], "metric": self.metric,
                "value": metrics.get(self.metric), "p_change": _p_change(plan.answers_path), "n": metrics.get("n"),
                "answers": f"{POINTS_DIR}/{p.name}/answers.jsonl", "metrics": metrics}


def _generate(model: Any, processor: Any, inputs: Any, max_new: int, cut: Any) -> tuple[list[str], Any]:
    """Greedy answers (as :func:`flowkern.eval.run.generate_answers` decodes them) and the first step's probabilities
    float32 ``[B, vocab]`` (CPU), under ``cut``."""
    import torch

    kwargs: dict[str, Any] = dict(max_new_tokens=max_new, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    tokenizer = getattr(processor, "tokenizer", processor)
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None and gen_cfg.pad_token_id is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        kwargs["pad_token_id"] = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    with torch.inference_mode(), cut:
        out = model.generate(**inputs, **kwargs)
    new = out.sequences[:, inputs["input_ids"].shape[1]:].cpu()
    decoder = processor if hasattr(processor, "batch_decode") else tokenizer
    texts = [t.strip() for t in decoder.batch_decode(new, skip_special_tokens=True)]
    return texts, out.logits[0].float().softmax(-1).cpu()


def _p_change(path: Path) -> float | None:
    """``100 * mean(p_answer / p_unblocked - 1)`` over an answer file's lines (None without such lines)."""
    changes = []
    for raw in path.read_bytes().split(b"\n"):
        if raw.strip():
            obj = json.loads(raw)
            if obj.get("p_unblocked"):
                changes.append(obj["p_answer"] / obj["p_unblocked"] - 1.0)
    return 100.0 * sum(changes) / len(changes) if changes else None


def check_knockout_config(config: KnockoutConfig) -> tuple[tuple[str, ...], int | None]:
    """The edges as ``src->dst`` strings (distinct, in order) and the window, checked before any work.

    Raises:
        SweepUsageError: an unknown task, a malformed edge, a window that is not an int >= 1.
    """
    from flowkern.eval import TASKS

    if config.task not in TASKS:
        raise SweepUsageError(f"--task: unknown task {config.task!r} (choose from {', '.join(TASKS)})")
    try:
        edges = tuple(dict.fromkeys("->".join(parse_edge(e, "--edges")) for e in config.edges))
    except ValueError as exc:
        raise SweepUsageError(str(exc)) from None
    if not edges:
        raise SweepUsageError("--edges: no edge given")
    w = config.window
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
        raise SweepUsageError(f"--window {w!r}: expected an integer >= 1")
    return edges, w


def run_knockout(config: KnockoutConfig, *, model: Any = None, processor: Any = None,
                 progress: bool = False) -> KnockoutResult:
    """Run (or resume) a knockout sweep and write its results (see the module docstring).

    Raises:
        SweepUsageError: bad options, bad inputs or another sweep in ``out``; before any model is loaded.
    """
    edges, window = check_knockout_config(config)
    dist = Dist(config.device)
    try:
        with claim_out(config, dist) or contextlib.nullcontext():  # type: ignore[arg-type]
            result = _run(config, edges, window, dist, model, processor, progress)
        dist.barrier()
        return result
    finally:
        dist.close()


def _run(config: KnockoutConfig, edges: tuple[str, ...], window: int | None, dist: Dist, model: Any, processor: Any,
         progress: bool) -> KnockoutResult:
    start = time.perf_counter()
    engine = KnockoutEngine(config, dist, model, processor)
    num_layers = engine.num_layers()
    k = window if window is not None else default_window(num_layers)
    if k > num_layers:
        raise SweepUsageError(f"--window {k}: the model has only {num_layers} decoder layers")
    starts = parse_layer_spec(config.layers, num_layers) if config.layers != "all" else \
        list(range(num_layers - k + 1))
    if any(a + k > num_layers for a in starts):
        raise SweepUsageError(f"--layers: a window of {k} layers starting at {max(starts)} runs past the last "
                              f"decoder layer ({num_layers - 1})")
    baseline = Point(None)
    try:
        plan = prepare(engine.eval_config(baseline))
    except EvalUsageError as exc:
        raise SweepUsageError(str(exc)) from None
    spec = {"edges": list(edges), "window": k}
    if config.overwrite and dist.index == 0:
        for name in (KNOCKOUT_CSV, KNOCKOUT_JSON, KNOCKOUT_FIGURE):
            with contextlib.suppress(FileNotFoundError):
                (engine.out / name).unlink()
    # the sweep's settings (no pruning: keep / rank / seed None) with the knockout spec among them
    settings = {**{k: plan.settings.get(k) for k in SWEEP_SETTINGS}, "knockout": spec}
    start_sweep(engine.out, config, dist, settings, flags={"knockout": "--edges / --window"})  # type: ignore[arg-type]
    points = [baseline] + [Point(a, None, "knockout", 0, e, k) for e in edges for a in starts]
    done = engine.run_and_score(points, progress)
    result = _write_outputs(engine.out, config, dist, done, edges, starts, k, num_layers)
    result.generated, result.seconds = engine.generated, time.perf_counter() - start
    return result


def _write_outputs(out: Path, config: KnockoutConfig, dist: Dist, done: dict[str, dict[str, Any]],
                   edges: Sequence[str], starts: Sequence[int], k: int, num_layers: int) -> KnockoutResult:
    from flowkern._io import atomic_write_json, atomic_write_text

    metric, higher = MAIN_METRIC[config.task]
    base = done["baseline"]["value"]
    curves: dict[str, dict[int, dict[str, float]]] = {}
    for e in edges:
        curves[e] = {a: {"p_change": done[n]["p_change"], "value": done[n]["value"]}
                     for a in starts if (n := Point(a, None, "knockout", 0, e, k).name) in done}
    files = {"results": out / RESULTS_FILE, "csv": out / KNOCKOUT_CSV, "json": out / KNOCKOUT_JSON,
             "figure": out / KNOCKOUT_FIGURE}
    if dist.index == 0:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["point", "edge", "first_layer", "last_layer", "n", "p_change_percent", metric, "delta_points"])
        for e in edges:
            for a, v in curves[e].items():
                r = done[Point(a, None, "knockout", 0, e, k).name]
                w.writerow([r["point"], e, a, a + k - 1, r["n"], f"{v['p_change']:.4f}", f"{v['value']:.6f}",
                            f"{(v['value'] - base) * 100.0:.4f}"])
        atomic_write_text(files["csv"], buf.getvalue())
        atomic_write_json(files["json"], {
            "task": config.task, "metric": metric, "higher_is_better": higher, "baseline": base,
            "n": done["baseline"]["n"], "window": k, "num_layers": num_layers, "edges": list(edges),
            "definitions": {
                "edge": "src->dst: the queries of segment dst cannot read the keys of segment src",
                "window": f"decoder layers first_layer .. first_layer + {k - 1} (0-based)",
                "p_change": "100 * mean over questions of (p / p0 - 1): p0, p = probability of the unblocked model's "
                            "first answer token at the last prompt position, without and with the cut"},
            "curves": {e: {str(a): v for a, v in c.items()} for e, c in curves.items()}})
        fig = plot_knockout(curves, base, metric=metric, window=k,
                            title=f"{config.task}: {Path(str(config.model).rstrip('/')).name}, window {k}")
        tmp = out / f".{KNOCKOUT_FIGURE}.tmp.png"
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, files["figure"])
        import matplotlib.pyplot as plt

        plt.close(fig)
    return KnockoutResult(out=out, window=k, baseline=base, curves=curves, generated=0, seconds=0.0, files=files)


def plot_knockout(curves: dict[str, dict[int, dict[str, float]]], baseline: float | None, *, metric: str, window: int,
                  title: str = "") -> Any:
    """The CVPR figure form: per edge, the relative change in the answer's probability (top) and the task metric
    (bottom) against the window's first layer. Returns a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    for e, c in curves.items():
        xs = sorted(c)
        top.plot(xs, [c[x]["p_change"] for x in xs], marker="o", label=e)
        bottom.plot(xs, [c[x]["value"] for x in xs], marker="o", label=e)
    top.axhline(0.0, color="grey", lw=0.8)
    if baseline is not None:
        bottom.axhline(baseline, color="grey", lw=0.8, ls="--", label="unblocked")
    top.set_ylabel("answer probability change (%)")
    bottom.set_ylabel(metric)
    bottom.set_xlabel(f"first layer of the {window}-layer window (0-based)")
    top.legend(fontsize=8)
    top.set_title(title)
    fig.tight_layout()
    return fig
