"""The tables of ``flowkern demo``'s report, as rows computed from the run's records.

Each table is a list of rows whose first row is the header; :func:`tables` gives every one (written as
``tables/<name>.csv`` and ``.json``), :func:`table1_rows` the paper's Table 1 form, :func:`to_csv` the CSV text.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from flowkern.demo.report.methods import methods_rows
from flowkern.demo.report.records import DemoSummary, SpeedRow, TaskResult

__all__ = ["tables", "table1_rows", "shares_rows", "truncation_rows", "cliff_rows", "speed_rows", "lens_rows",
           "head_rows", "to_csv"]


def tables(summary: DemoSummary) -> dict[str, list[list[Any]]]:
    """The report's tables as rows (the first row is the header): ``shares``, ``truncation``, ``cliff``,
    ``table1``, ``speed``, ``lens`` and ``heads`` when the run measured the flow, and ``methods`` when it compared
    the pruning methods (:func:`flowkern.demo.report.methods.methods_rows`)."""
    tasks = list(summary.tasks.values())
    keep = summary.settings.keep
    out = {"shares": shares_rows(tasks), "truncation": truncation_rows(tasks, keep), "cliff": cliff_rows(tasks, keep),
           "table1": table1_rows(tasks), "speed": speed_rows(summary.speed)}
    if any(s.flow is not None for s in tasks):
        out["lens"] = lens_rows(tasks)
        out["heads"] = head_rows(tasks, summary.model.guided_heads)
    if summary.methods is not None:
        out["methods"] = methods_rows(summary.methods)
    return out


def lens_rows(tasks: Sequence[TaskResult]) -> list[list[Any]]:
    """Per task and layer: the logit lens's mean probability of the answer token at the last prompt position, the
    fraction of questions whose lens top-1 is it, and the task's decodable layer."""
    rows: list[list[Any]] = [["task", "layer", "p_answer", "top1_is_answer", "decodable_layer", "questions"]]
    for s in tasks:
        if s.flow is not None:
            f = s.flow
            rows += [[s.label, layer, p, top1, f.decodable_layer, f.traced]
                     for layer, (p, top1) in enumerate(zip(f.answer_prob, f.answer_top1, strict=True))]
    return rows


def head_rows(tasks: Sequence[TaskResult], guided: Sequence[Sequence[int]]) -> list[list[Any]]:
    """Per task, layer and head: the image share of the answer's attention and whether training guided the head."""
    marked = {(int(layer), int(head)) for layer, head in guided}
    rows: list[list[Any]] = [["task", "layer", "head", "image_share", "guided"]]
    for s in tasks:
        if s.flow is not None:
            rows += [[s.label, layer, head, v, (layer, head) in marked]
                     for layer, per_head in enumerate(s.flow.head_image) for head, v in enumerate(per_head)]
    return rows


def shares_rows(tasks: Sequence[TaskResult]) -> list[list[Any]]:
    """Per task and layer: the answer's attention share of each segment, the image share's spread, questions."""
    names = tasks[0].segment_names
    rows: list[list[Any]] = [["task", "layer", *names, "image_sd", "questions"]]
    for s in tasks:
        for layer, (row, sd) in enumerate(zip(s.shares, s.image_sd, strict=True)):
            rows.append([s.label, layer, *row, sd, s.traced])
    return rows


def truncation_rows(tasks: Sequence[TaskResult], keep: int) -> list[list[Any]]:
    """Every sweep point: the baseline, then the k = 0, attention-ranked and random series per layer, with the
    change from the baseline in points and whether it is within the tolerance."""
    rows: list[list[Any]] = [["task", "series", "layer", "keep", "rank", "metric", "value", "delta_points",
                              "within_tolerance"]]
    for s in tasks:
        rows.append([s.label, "baseline", None, None, None, s.metric, s.baseline, 0.0, True])
        for series, curve, k, rank in (("k=0", s.curve, 0, None), (f"attention, keep {keep}", s.attention_k, keep,
                                                                    "attention"),
                                       (f"random, keep {keep}", s.random_k, keep, "random")):
            for layer, v in curve.items():
                delta = (v - s.baseline) * 100.0
                rows.append([s.label, series, int(layer), k, rank, s.metric, v, delta,
                             abs(delta) <= s.tolerance + 1e-9])
    return rows


def cliff_rows(tasks: Sequence[TaskResult], keep: int) -> list[list[Any]]:
    """Per task: the baseline, the image's effect and its use, the cliff layers of the three series."""
    rows: list[list[Any]] = [[
        "task", "metric", "higher_is_better", "n", "tolerance_points", "baseline", "without_image_L0",
        "image_effect_points", "se_points", "image_use", "cliff_layer", "paper_layer", "no_harm_layer", "monotone",
        f"cliff_attention_keep{keep}", f"cliff_random_keep{keep}", "note"]]
    for s in tasks:
        rows.append([s.label, s.metric, s.higher_is_better, s.n, s.tolerance, s.baseline, s.no_image,
                     s.image_effect_points, s.se_points, s.image_use, s.cliff_layer,
                     None if s.cliff_layer is None else s.cliff_layer + 1, s.no_harm_layer, s.monotone,
                     s.keepk_cliff, s.random_cliff, s.note])
    return rows


def table1_rows(tasks: Sequence[TaskResult]) -> list[list[Any]]:
    """The paper's Table 1 form: dataset, metric, baseline and the score with the image truncated at the cliff
    layer, in percent (POPE: accuracy and F1; CHAIR: CHAIR_S, lower is better)."""
    rows: list[list[Any]] = [["dataset", "metric", "baseline", "at the cliff layer", "cliff layer L", "n"]]
    for s in tasks:
        keys = [("accuracy", "Acc \u2191"), ("f1", "F1 \u2191")] if s.loader == "pope" else \
            [("chair_s", "CHAIR_S \u2193")] if s.loader == "chair" else [("accuracy", "Acc \u2191")]
        for key, name in keys:
            base = s.baseline_metrics.get(key)
            at = None if s.at_cliff_metrics is None else s.at_cliff_metrics.get(key)
            rows.append([s.label, name, None if base is None else round(100 * base, 2),
                         None if at is None else round(100 * at, 2), s.cliff_layer, s.n])
    return rows


def speed_rows(speed: Sequence[SpeedRow]) -> list[list[Any]]:
    """The timings: per task and batch, prefill ms and decode tokens/s unpruned and pruned, and the speed-ups."""
    rows: list[list[Any]] = [["task", "layer", "batch", "prompt_tokens", "new_tokens", "repeats",
                              "unpruned_prefill_ms", "pruned_prefill_ms", "prefill_speedup", "unpruned_decode_tok_s",
                              "pruned_decode_tok_s", "decode_speedup"]]
    for r in speed:
        rows.append([r.task, r.layer, r.batch, r.prompt_tokens, r.new_tokens, r.repeats, r.unpruned_prefill_ms,
                     r.pruned_prefill_ms, r.prefill_speedup, r.unpruned_decode_tok_s, r.pruned_decode_tok_s,
                     r.decode_speedup])
    return rows


def to_csv(rows: Sequence[Sequence[Any]]) -> str:
    """CSV text of ``rows`` (None -> empty, floats with 6 significant digits)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for r in rows:
        w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in r])
    return buf.getvalue()
