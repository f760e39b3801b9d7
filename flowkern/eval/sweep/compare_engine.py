"""The sweep engine answering ``flowkern compare``'s points (:mod:`flowkern.eval.sweep.compare`): each batch under
its point's :class:`~flowkern.plan.PruneSpec` (or a :class:`flowkern.timer.ForwardTimer` for the baseline), each
answer line extended with what the point measures: tokens per layer, new tokens, estimated FLOPs, its share of the
batch's prefill and decode times, and the kept cells of its image grid."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowkern.eval.run import EvalPlan
from flowkern.eval.sweep.engine import Engine
from flowkern.eval.sweep.files import POINTS_DIR
from flowkern.eval.sweep.points import Point, SweepUsageError
from flowkern.plan import PruneSpec, num_to_keep

__all__ = ["CompareEngine", "generate_counted", "layer_tokens", "point_stats", "bits", "point_record"]


def generate_counted(model: Any, processor: Any, inputs: Any, max_new: int, listener: Any) -> tuple[list[str],
                                                                                                     list[int]]:
    """Greedy answers (decoded as :func:`flowkern.eval.run.generate_answers` decodes them) under ``listener`` (a
    context manager), and per answer the tokens it generated up to and including its first end-of-sequence
    token."""
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new, do_sample=False)
    tokenizer = getattr(processor, "tokenizer", processor)
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None and gen_cfg.pad_token_id is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        kwargs["pad_token_id"] = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    with torch.inference_mode(), listener:
        sequences = model.generate(**inputs, **kwargs)
    new = sequences[:, inputs["input_ids"].shape[1]:].cpu()
    decoder = processor if hasattr(processor, "batch_decode") else tokenizer
    texts = [t.strip() for t in decoder.batch_decode(new, skip_special_tokens=True)]
    eos = getattr(gen_cfg, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    counts = []
    for row in new:
        ends = torch.nonzero(torch.isin(row, torch.tensor(eos, dtype=row.dtype))).flatten() if eos else []
        counts.append(int(ends[0]) + 1 if len(ends) else int(row.shape[0]))
    return texts, counts


def layer_tokens(num_layers: int, real: int, image: int, stages: Sequence[tuple[int, int | float]],
                 kept: int) -> list[int]:
    """Prompt tokens decoder layer ``l`` holds for a row of ``real`` tokens with ``image`` image tokens: all of them
    below the first stage; from stage ``i``'s layer on, the text tokens plus the image tokens it keeps (its keep of
    the ``image`` tokens, at most the previous stage's; ``kept``, as measured, for the last stage)."""
    out = [real] * num_layers
    previous = image
    for i, (layer, keep) in enumerate(stages):
        count = kept if i == len(stages) - 1 else min(previous, int(num_to_keep(keep, torch.tensor([image]))[0]))
        previous = count
        for x in range(layer, num_layers):
            out[x] = real - image + count
    return out


class CompareEngine(Engine):
    """The sweep engine with ``flowkern compare``'s points: answers carry the point's measurements.

    Attributes:
        methods: point name -> method name (set by :func:`flowkern.eval.sweep.compare.run_compare`).
    """

    def __init__(self, config: Any, dist: Any, model: Any = None, processor: Any = None) -> None:
        super().__init__(config, dist, model, processor)
        self.methods: dict[str, str] = {}
        self._shape: Any = None

    def answer(self, p: Point, images: Sequence[Any], prompts: Sequence[str], inputs: Any,
               max_new: int) -> tuple[list[str], list[dict[str, Any]]]:
        from flowkern.prune import prune
        from flowkern.timer import ForwardTimer

        spec = self.point_spec(p)
        try:
            listener = prune(self.model, spec) if spec.enabled else ForwardTimer(self.model)
        except (ValueError, NotImplementedError) as exc:
            raise SweepUsageError(f"--methods {self.methods.get(p.name, p.name)}: {exc}") from None
        texts, counts = generate_counted(self.model, self.processor, inputs, max_new, listener)
        return texts, self.measurements(spec, listener, inputs, counts)

    def measurements(self, spec: PruneSpec, listener: Any, inputs: Any, new_tokens: list[int]) -> list[dict[str, Any]]:
        """Per answer of a batch: what the point measures (:mod:`flowkern.eval.sweep.compare`)."""
        from flowkern.flops import DecoderShape, answer_flops
        from flowkern.hf.models import get_adapter

        adapter = get_adapter(self.model)
        if self._shape is None:
            self._shape = DecoderShape.from_config(self.model.config)
        ids = inputs["input_ids"].cpu()
        mask = inputs.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.cpu().bool()
        image = torch.isin(ids, torch.tensor(adapter.placeholder_token_ids(self.model.config))) & real
        if spec.enabled:
            kept = [x.cpu() for x in listener.kept_image_positions]
        else:
            kept = [torch.nonzero(row).flatten() for row in image]
        stages = [(x % self._shape.layers, k) for x, k in spec.stages]
        grids = self._kept_grids(adapter, ids, image, inputs, kept)
        B = ids.shape[0]
        prefill = float(listener.prefill_seconds or 0.0) / B
        decode = sum(listener.decode_seconds) / B
        out = []
        for b in range(B):
            n_image, n_kept = int(image[b].sum()), int(kept[b].numel())
            tokens = layer_tokens(self._shape.layers, int(real[b].sum()), n_image, stages, n_kept)
            out.append({"image_tokens": n_image, "kept_image_tokens": n_kept, "layer_tokens": tokens,
                        "new_tokens": new_tokens[b], "flops": answer_flops(self._shape, tokens, new_tokens[b]),
                        "prefill_seconds": prefill, "decode_seconds": decode,
                        "decode_tokens": len(listener.decode_seconds), "grid": grids[b]})
        return out

    def _kept_grids(self, adapter: Any, ids: torch.Tensor, image: torch.Tensor, inputs: Any,
                    kept: list[torch.Tensor]) -> list[dict[str, Any] | None]:
        """Per row, the kept cells of its drawn image grid (the first whole-image view, else the first view):
        ``{"shape": [rows, cols], "kept": hex bits, "present": hex bits}``, or None without a grid."""
        from flowkern.hf.segments import IMAGE, USER

        layout = {k: v.cpu() if isinstance(v, torch.Tensor) else v
                  for k in adapter.layout_inputs if (v := inputs.get(k)) is not None}
        try:
            grids = adapter.image_grids(self.model.config, ids, torch.where(image, IMAGE, USER), layout)
        except (ValueError, NotImplementedError):
            return [None] * ids.shape[0]
        out: list[dict[str, Any] | None] = []
        for b, views in enumerate(grids):
            view = next((g for g in views if g.whole), views[0] if views else None)
            if view is None:
                out.append(None)
                continue
            is_kept = torch.isin(torch.nonzero(image[b]).flatten(), kept[b])
            index = view.index
            present = index >= 0
            cells = present & is_kept[index.clamp(min=0)] if is_kept.numel() else present & False
            out.append({"shape": list(view.shape), "kept": bits(cells.numpy()), "present": bits(present.numpy())})
        return out

    def point_record(self, p: Point, plan: EvalPlan, metrics: dict[str, Any]) -> dict[str, Any]:
        return point_record(self, p, plan, metrics)


def point_stats(path: Path) -> dict[str, Any]:
    """The means (and sums) of a point's answer lines: image tokens, kept, tokens per layer, new tokens, FLOPs per
    answer, prefill seconds (sum and per answer), decode tokens per second (see the module docstring)."""
    lines = [json.loads(raw) for raw in path.read_bytes().split(b"\n") if raw.strip()]
    lines = [x for x in lines if "flops" in x]
    if not lines:
        return {}
    n = len(lines)

    def mean(key: str) -> float:
        return sum(float(x[key]) for x in lines) / n

    layer_tokens = np.asarray([x["layer_tokens"] for x in lines], dtype=np.float64).mean(axis=0)
    decode_seconds = sum(float(x["decode_seconds"]) for x in lines)
    prefill = sum(float(x["prefill_seconds"]) for x in lines)
    return {"image_tokens": mean("image_tokens"), "kept_image_tokens": mean("kept_image_tokens"),
            "layer_tokens": [float(v) for v in layer_tokens], "tokens_per_layer": float(layer_tokens.mean()),
            "new_tokens": mean("new_tokens"), "flops_per_answer": mean("flops"), "prefill_seconds": prefill,
            "prefill_seconds_per_answer": prefill / n,
            "decode_tokens_per_second": sum(float(x["decode_tokens"]) for x in lines) / decode_seconds
            if decode_seconds > 0 else None}


def bits(mask: Any) -> str:
    """A bool array as hex bits (row-major, :func:`numpy.packbits`)."""
    return np.packbits(np.asarray(mask, dtype=np.uint8).ravel()).tobytes().hex()


def point_record(engine: Any, p: Point, plan: EvalPlan, metrics: dict[str, Any]) -> dict[str, Any]:
    """The results.jsonl record of a scored point: its setting, the metric and :func:`point_stats`."""
    return {"point": p.name, "series": p.series, "method": engine.methods.get(p.name),
            "budget": p.keep if p.spec is not None else None,
            "spec": p.spec.to_dict() if p.spec is not None else None, "metric": engine.metric,
            "value": metrics.get(engine.metric), "n": metrics.get("n"), **point_stats(plan.answers_path),
            "answers": f"{POINTS_DIR}/{p.name}/answers.jsonl", "metrics": metrics}
