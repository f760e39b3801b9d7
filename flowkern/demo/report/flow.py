"""The causal-flow section's numbers, from the records: guided heads, unguided-head shares, the decodable layer.

Pure functions over plain numbers and records (no model, no figure): :func:`guided_heads` reads which attention
heads a shapes model's training guided (its folder's ``training.json``), :func:`head_mask` turns them into a
``[layers, heads]`` table, :func:`share_over_heads` averages a per-head share over all or over the unguided heads,
:func:`decodable_layer` finds where the logit lens starts to give the answer, and :func:`flow_record` makes a task's
:class:`flowkern.demo.report.records.FlowResult` from the attention stage's per-question arrays.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowkern.demo.report.records import FlowResult, ModelFacts

__all__ = ["TRAINING_FILE", "DECODABLE", "guided_heads", "head_mask", "share_over_heads", "decodable_layer",
           "flow_record"]

TRAINING_FILE = "training.json"
"""The training settings a shapes model ships with; its ``guides`` map a guide name to ``[layers, [first, last)]``
(the heads trained, with an extra loss, to attend where the guide says)."""

DECODABLE = 0.5
"""The answer is *decodable* at a layer when at least this fraction of the questions' logit-lens top-1 token there is
their final answer token (:func:`decodable_layer`)."""


def guided_heads(model_dir: str | Path, num_layers: int, num_heads: int) -> list[list[int]]:
    """The ``[layer, head]`` pairs a model's attention guides trained, sorted; empty when the folder has no
    ``training.json`` or it names no guide. Pairs outside ``num_layers x num_heads`` are ignored."""
    path = Path(model_dir) / TRAINING_FILE
    if not path.is_file():
        return []
    try:
        guides = json.loads(path.read_text()).get("guides") or {}
    except (OSError, ValueError, AttributeError):
        return []
    pairs = set()
    for spec in guides.values():
        try:
            layers, (first, last) = spec
            pairs |= {(int(layer), h) for layer in layers for h in range(int(first), int(last))}
        except (TypeError, ValueError):
            continue
    return [[layer, h] for layer, h in sorted(pairs) if 0 <= layer < num_layers and 0 <= h < num_heads]


def head_mask(model: ModelFacts) -> np.ndarray:
    """bool ``[num_layers, num_heads]``: True for the heads the model's training guided."""
    mask = np.zeros((model.num_layers, model.num_heads), dtype=bool)
    for layer, head in model.guided_heads:
        mask[layer, head] = True
    return mask


def share_over_heads(head_share: Any, guided: np.ndarray, *, unguided: bool) -> list[float | None]:
    """Per layer, the mean of ``head_share`` ``[layers, heads]`` over every head (``unguided=False``) or over the heads
    not in ``guided`` (None for a layer whose heads are all guided)."""
    h = np.asarray(head_share, dtype=float)
    keep = ~guided if unguided else np.ones_like(guided)
    return [float(h[i, keep[i]].mean()) if keep[i].any() else None for i in range(h.shape[0])]


def decodable_layer(top1: Sequence[float], threshold: float = DECODABLE) -> int | None:
    """The first layer from which ``top1`` (per layer, the fraction of questions whose lens top-1 is their answer)
    stays ``>= threshold`` to the last layer; None when the last layer is below it."""
    found = None
    for layer in range(len(top1) - 1, -1, -1):
        value = top1[layer]
        if value is None or not math.isfinite(value) or value < threshold:
            break
        found = layer
    return found


def flow_record(answer_prob: Any, answer_top1: Any, head_image: Any, segment_flow: Any) -> FlowResult:
    """A task's :class:`FlowResult` from per-question arrays: ``answer_prob`` and ``answer_top1`` ``[n, layers]``,
    ``head_image`` ``[n, layers, heads]``, ``segment_flow`` ``[n, layers, 4, 4]`` (NaN where a question has no row of
    a segment). Every mean is over the questions."""
    prob = np.asarray(answer_prob, dtype=float)
    top1 = np.asarray(answer_top1, dtype=float).mean(axis=0)
    flow = np.asarray(segment_flow, dtype=float)
    finite = np.isfinite(flow)
    count = finite.sum(axis=0)
    mean_flow = np.where(count > 0, np.where(finite, flow, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)
    return FlowResult(traced=int(prob.shape[0]), answer_prob=prob.mean(axis=0).tolist(), answer_top1=top1.tolist(),
                      decodable_layer=decodable_layer(top1.tolist()),
                      head_image=np.asarray(head_image, dtype=float).mean(axis=0).tolist(),
                      segment_flow=[[[None if not math.isfinite(v) else v for v in row] for row in layer]
                                    for layer in mean_flow.tolist()])
