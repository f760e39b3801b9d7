"""The engine behind ``flowkern sweep``: a task scored unpruned (the baseline) and with image tokens removed from each
decoder layer L on, the information-flow cliff layer, resumable, bisecting, sharded under ``torchrun``.

.. code-block:: python

    from flowkern.eval.sweep import SweepConfig, run_sweep

    result = run_sweep(SweepConfig(model="llava-hf/llava-1.5-7b-hf", task="pope", data="pope/coco",
                                   images="pope/val2014", out="runs/pope", layers="all"))
    result.cliff["cliff_layer"], result.curve      # {L: F1 with the image dropped from layer L on}

**Points.** The baseline (no pruning, the model's own attention) and one point per layer ``L`` of ``layers``:
:func:`flowkern.prune` ``(layer=L, keep, rank)`` (k = 0 by default: every image token dropped). ``controls``
(``random``, ``grid``) add a series at the same layers and ``keep`` with that rank: the control that tells a real
ranking from "any k tokens would do" (``random``) or from plain spatial downsampling (``grid``). Each point is an
``flowkern eval`` output folder, ``<out>/points/<name>/`` (``baseline``, ``L05``, ``L05-attention``,
``L05-random``): ``answers.jsonl``, ``run.json``, ``metrics.json`` written by :mod:`flowkern.eval.run`'s machinery,
so ``flowkern score`` on a point's answer file reproduces the sweep's number, and ``flowkern eval`` with the same
settings resumes it.

**The cliff layer** (``cliff.json``, :func:`cliff_report`): the smallest evaluated ``L`` such that every evaluated
``L' >= L`` scores within ``tolerance`` points (default 1; metrics are ratios, 1 point = 0.01) of the baseline on the
task's main metric (:data:`MAIN_METRIC`: POPE F1, ScienceQA-IMG / TextVQA accuracy, CHAIR_S). Also reported: the
first layer from which dropping does not hurt at all (every ``L' >= L`` at least as good as the baseline), the
whole curve, and whether it is monotone enough for the definition to mean something: a curve is monotone within the
tolerance when no later layer is further from the baseline than an earlier one by more than the tolerance.

**Search.** ``search="full"`` evaluates every layer. ``search="bisect"`` evaluates the first and last layers, then
bisects on "within tolerance": O(log layers) points when the curve is monotone. As soon as the evaluated points
contradict monotonicity it says so and evaluates every remaining layer (the points the definition needs).

**Cheaper than independent points.** Answers go batch by batch over all the points that still need that batch. For
one batch, layers ``0 .. L-1`` compute the same thing at every point ``L`` (greedy decoding, same inputs, the same
``flowkern`` attention), so the point with the largest ``L`` runs first and :class:`PrefixShare` records, at its
prefill, each decoder layer's keys and values and the hidden states the other points resume from; every other point
then *skips* its layers below ``L`` at the prefill (their KV cache is filled with the recorded keys and values) and
computes only layers ``>= L`` on the pruned sequence. Decode steps run every layer as usual. The images of a batch
are encoded once for all its points (:class:`ImageCache`: the vision tower and projector do not depend on the point),
the processor's output is built once per batch, and the language model stays on the ``flowkern`` attention across
the pruned points of a batch instead of being switched there and back by each ``flowkern.prune``. The answers are
the ones an independent ``flowkern eval --prune-layer L`` gives (the test suite checks they are identical).
``rank="attention"`` with ``keep > 0`` needs layer ``L-1``'s attention, so those points resume from ``L-1``. What
stays per batch: the baseline's full prefill (the model's own attention, which the points do not use, so it shares
nothing), the recording point's, and ``L = 0``'s (removal by masking from layer 0 on: it shares no layer either).

**Resume and safety.** Answers are appended per (point, batch) and fsync-ed (a killed run loses at most the batch in
flight); a finished point's metrics are appended to ``results.jsonl``; a rerun skips what is done. ``sweep.json``
records the settings that change answers (:data:`SWEEP_SETTINGS`); a rerun under other ones is refused.

**torchrun.** Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1``), batches are dealt round-robin to the ranks
(batch ``j`` to rank ``j % N``: every batch holds the same questions as in a one-process run, so the answers are the
same), each rank appends to its own shard folder ``<out>/.shards/rank<r>/``, and rank 0 merges the shards into the
points' answer files (in question order) and writes every result. ``out`` must be on a filesystem all ranks see.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import inspect
import io
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flowkern.eval.run import (
    ANSWERS_FILE,
    EvalConfig,
    EvalPlan,
    EvalUsageError,
    _append_lines,
    _start_files,
    answer_record,
    build_batch_inputs,
    generate_answers,
    prepare,
)
from flowkern.listener import Listener

__all__ = [
    "SweepConfig",
    "SweepResult",
    "SweepUsageError",
    "Point",
    "PrefixShare",
    "ImageCache",
    "run_sweep",
    "parse_layer_spec",
    "cliff_report",
    "MAIN_METRIC",
    "SWEEP_SETTINGS",
    "RESULTS_FILE",
    "SUMMARY_FILE",
    "CLIFF_FILE",
    "FIGURE_FILE",
    "SWEEP_FILE",
]

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.csv"
CLIFF_FILE = "cliff.json"
FIGURE_FILE = "sweep.png"
SWEEP_FILE = "sweep.json"
POINTS_DIR = "points"
SHARDS_DIR = ".shards"

MAIN_METRIC: dict[str, tuple[str, bool]] = {"pope": ("f1", True), "sqa": ("accuracy", True),
                                            "textvqa": ("accuracy", True), "chair": ("chair_s", False)}
"""Task -> (main metric, higher is better): the paper's Table 1 metrics."""

SWEEP_SETTINGS: tuple[str, ...] = ("model", "task", "data", "images", "split", "ocr", "max_new_tokens", "keep", "rank",
                                   "seed")
"""Settings that change a sweep's answers: a rerun under other values is refused."""

_FLAGS = {"model": "--model", "task": "--task", "data": "--data", "images": "--images", "split": "--split",
          "ocr": "--ocr", "max_new_tokens": "--max-new-tokens", "keep": "--keep", "rank": "--rank", "seed": "--seed"}
_CONTROLS = ("random", "grid", "none", "attention")


class SweepUsageError(EvalUsageError):
    """A mistake the user can fix (bad layers, other settings in --out, ...): one-line message."""


@dataclass(frozen=True)
class Point:
    """One point of a sweep: the baseline (``layer=None``) or pruning from ``layer`` on with ``rank``.

    ``series`` is ``"baseline"``, ``"main"`` or ``"control"``.
    """

    layer: int | None
    rank: str | None = None
    series: str = "baseline"
    keep: int | float = 0

    @property
    def name(self) -> str:
        """Folder name: ``baseline``, ``L05`` (k = 0) or ``L05-<rank>``."""
        if self.layer is None:
            return "baseline"
        return f"L{self.layer:02d}" if self.keep == 0 else f"L{self.layer:02d}-{self.rank}"

    def depth(self) -> int:
        """Decoder layers this point computes exactly like the unpruned prefill (and may skip when shared)."""
        if self.layer is None:
            return 0
        return self.layer - 1 if self.rank == "attention" and self.keep != 0 else self.layer


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep (the options of ``flowkern sweep``).

    Attributes:
        model, task, data, images, limit, batch_size, max_new_tokens, strict, split, ocr, device, dtype: as for
            :class:`flowkern.eval.run.EvalConfig`.
        out: the sweep folder (points/, results.jsonl, summary.csv, cliff.json, sweep.png, sweep.json).
        layers: ``"all"``, or ranges and lists of 0-based decoder layers (``"0-31"``, ``"0,2,4,8-12"``), or a list.
        keep, rank, seed: :func:`flowkern.prune` of the main series (k = 0 drops every image token; rank is then moot).
        controls: extra ranks run at the same layers and ``keep`` (``"random"``, ``"grid"``); need ``keep != 0``.
        search: ``"full"`` (every layer) or ``"bisect"``.
        tolerance: the cliff tolerance in points of the main metric (1 point = 0.01 of a ratio).
        reuse: share the layers below L (:class:`PrefixShare`) and the image encoding (:class:`ImageCache`)
            between points; False runs each point on its own.
        overwrite: discard the folder's previous sweep and start afresh.
    """

    model: str
    task: str
    data: str | os.PathLike[str]
    out: str | os.PathLike[str]
    images: str | os.PathLike[str] | None = None
    layers: str | Sequence[int] = "all"
    keep: int | float = 0
    rank: str = "attention"
    seed: int = 0
    controls: tuple[str, ...] = ()
    search: str = "full"
    tolerance: float = 1.0
    limit: int | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None
    strict: bool = False
    split: str = "test"
    ocr: bool = False
    device: str = "auto"
    dtype: str = "auto"
    reuse: bool = True
    overwrite: bool = False


@dataclass
class SweepResult:
    """What :func:`run_sweep` produced (rank 0; other ranks get the same ``cliff`` and ``curve``)."""

    out: Path
    baseline: float | None
    curve: dict[int, float]
    controls: dict[str, dict[int, float]]
    cliff: dict[str, Any]
    points: list[dict[str, Any]]
    generated: int
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# layers and the cliff


def parse_layer_spec(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Sorted distinct 0-based layers from ``"all"``, ``"0-31"``, ``"0,2,4,8-12"`` or a list of ints.

    Raises:
        SweepUsageError: a malformed spec or a layer outside ``[0, num_layers)``.
    """
    if not isinstance(spec, str):
        layers = [int(x) for x in spec]
    elif spec.strip().lower() == "all":
        return list(range(num_layers))
    else:
        layers = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                a = int(lo)
                b = int(hi) if sep else a
            except ValueError:
                raise SweepUsageError(f"--layers {spec!r}: expected 'all' or comma-separated layers and ranges "
                                      f"such as 0-31 or 0,2,4,8-12") from None
            if b < a:
                raise SweepUsageError(f"--layers {spec!r}: range {part} goes backwards")
            layers.extend(range(a, b + 1))
    if not layers:
        raise SweepUsageError(f"--layers {spec!r}: no layer given")
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise SweepUsageError(f"--layers: layer {bad[0]} is out of range; the model has {num_layers} decoder layers "
                              f"(0..{num_layers - 1})")
    return sorted(set(layers))


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


# ----------------------------------------------------------------------------------------------------------
# sharing the layers below L between points


class _AttentionHold(Listener):
    """A listener that only asks for the ``flowkern`` attention (``flowkern.hf.attention.ATTENTION_NAME``): held
    across a batch's pruned points, it keeps the language model switched and the model's session alive."""

    owner = "flowkern.sweep"
    attention = "flowkern"



class PrefixShare:
    """Record the unpruned prefill's per-layer keys/values and hidden states once; let later generate calls skip
    those layers at their prefill.

    .. code-block:: python

        share = PrefixShare(model)
        with share.capture(kv_layers=range(6), out_layers={2, 5}):   # while the point with the largest L runs
            generate(...)
        with share.replay(depth=3):                                    # a point L=3: layers 0..2 are skipped
            generate(...)

    At the prefill (the outermost forward on an empty cache) of a replay, decoder layers ``0 .. depth-1`` do not
    compute: each appends its recorded keys and values ``[B, Hkv, S, D]`` to the cache, and layer ``depth-1``
    returns (a copy of) its recorded output ``[B, S, D]``. Decode steps run every layer. The recorded prefill must be
    of the same inputs (same batch) and the same attention implementation; shapes are checked.
    """

    def __init__(self, model: Any) -> None:
        from flowkern.hf.models import get_adapter

        self.model = model
        self.layers = get_adapter(model).decoder_layers(model)  # index = layer_idx
        self.kv: dict[int, tuple[Any, Any]] = {}
        self.outputs: dict[int, Any] = {}
        self.tuple_output = False
        self.shape: tuple[int, int] | None = None
        self._prefill = False

    def clear(self) -> None:
        """Drop the recording."""
        self.kv, self.outputs, self.shape = {}, {}, None

    @contextlib.contextmanager
    def _watch(self, on_return: Any = None) -> Iterator[None]:
        from flowkern.hf import compat

        def pre(module: Any, args: tuple, kwargs: dict) -> None:
            self._prefill = compat.cache_length(compat.call_cache(kwargs)) == 0

        def post(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            if self._prefill and on_return is not None:
                on_return(compat.output_cache(output) or compat.call_cache(kwargs))
            self._prefill = False

        handles = [self.model.register_forward_pre_hook(pre, with_kwargs=True),
                   self.model.register_forward_hook(post, with_kwargs=True, always_call=True)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._prefill = False

    @contextlib.contextmanager
    def capture(self, kv_layers: Sequence[int] | range, out_layers: set[int]) -> Iterator[None]:
        """Record, at the next prefill, the keys/values of ``kv_layers`` and the outputs of ``out_layers``."""
        from flowkern.hf import compat

        self.clear()
        kv_layers = list(kv_layers)

        def make_hook(i: int) -> Any:
            def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
                if not self._prefill:
                    return
                hidden = args[0] if args else kwargs["hidden_states"]
                self.shape = (int(hidden.shape[0]), int(hidden.shape[1]))
                if i in out_layers:
                    self.tuple_output = isinstance(output, tuple)
                    self.outputs[i] = (output[0] if self.tuple_output else output).clone()
            return hook

        def on_return(cache: Any) -> None:
            for i in kv_layers:
                kv = compat.layer_kv(cache, i) if cache is not None else None
                if kv is None:
                    raise RuntimeError(f"flowkern sweep: layer {i}'s cache is empty after the prefill")
                self.kv[i] = kv

        handles = [self.layers[i].register_forward_hook(make_hook(i), with_kwargs=True)
                   for i in sorted(set(kv_layers) | set(out_layers))]
        try:
            with self._watch(on_return):
                yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def replay(self, depth: int) -> Iterator[None]:
        """Skip decoder layers ``0 .. depth-1`` at the next prefills, from the recording."""
        from flowkern.hf import compat

        if depth <= 0:
            yield
            return
        missing = [i for i in range(depth) if i not in self.kv] + ([] if depth - 1 in self.outputs else ["out"])
        if missing:
            raise RuntimeError(f"flowkern sweep: nothing recorded to replay layers 0..{depth - 1} ({missing})")
        saved: list[tuple[Any, bool, Any]] = []

        def make_stub(i: int, layer: Any, orig: Any) -> Any:
            def stub(*args: Any, **kwargs: Any) -> Any:
                if not self._prefill:
                    return orig(*args, **kwargs)
                hidden = args[0] if args else kwargs["hidden_states"]
                if self.shape is not None and (int(hidden.shape[0]), int(hidden.shape[1])) != self.shape:
                    raise RuntimeError(f"flowkern sweep: replayed layer {i} got hidden states {tuple(hidden.shape)}, "
                                       f"recorded {self.shape}")
                cache = compat.call_cache(kwargs)
                if cache is not None:
                    compat.append_layer_kv(cache, i, *self.kv[i])
                out = self.outputs[i].clone() if i == depth - 1 else hidden
                return (out,) if self.tuple_output else out
            return stub

        try:
            for i in range(depth):
                layer = self.layers[i]
                had = "forward" in layer.__dict__
                saved.append((layer, had, layer.__dict__.get("forward")))
                layer.forward = make_stub(i, layer, layer.forward)
            with self._watch():
                yield
        finally:
            for layer, had, prev in saved:
                if had:
                    layer.forward = prev
                else:
                    del layer.forward


class ImageCache:
    """Encode a batch's images once for all the points that answer it.

    .. code-block:: python

        images = ImageCache(model)
        with images.active():       # every point of one batch: the vision tower + projector run at the first only
            for p in points:
                generate(...)
        images.clear()

    Inside :meth:`active`, the model's image encoder (:func:`flowkern.hf.compat.image_encoder`: the vision tower and
    the projector as one call) is memoised: a call whose arguments equal an earlier one's (tensors compared by
    value: dtype, shape, device and every element) returns that call's output object instead of computing it
    again. Every point runs the same vision tower (pruning and the baseline change only the language model's
    attention), so its output is the same at every point; the memo only saves the computation. The arguments are
    kept as copies, so an input changed in place later is not mistaken for the one recorded. Holds one batch's
    image features (and whatever else the encoder returns) until :meth:`clear`.

    Attributes:
        computed, reused: encoder calls that ran, and calls answered from the memo.
    """

    def __init__(self, model: Any) -> None:
        from flowkern.hf import compat

        self.where = compat.image_encoder(model)
        self.entries: list[tuple[Any, Any]] = []
        self.computed = 0
        self.reused = 0

    def clear(self) -> None:
        """Drop the memo."""
        self.entries = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Memoise the image encoder inside the block (a no-op when the model has none)."""
        if self.where is None:
            yield
            return
        owner, name = self.where
        had = name in owner.__dict__
        prev = owner.__dict__.get(name)
        orig = getattr(owner, name)
        try:
            signature = inspect.signature(orig)
        except (TypeError, ValueError):
            yield
            return

        @functools.wraps(orig)
        def memo(*args: Any, **kwargs: Any) -> Any:
            try:
                key = dict(signature.bind(*args, **kwargs).arguments)
            except TypeError:
                return orig(*args, **kwargs)
            for old, output in self.entries:
                if _same_value(old, key):
                    self.reused += 1
                    return output
            output = orig(*args, **kwargs)
            self.computed += 1
            self.entries.append((_copy_value(key), output))
            return output

        setattr(owner, name, memo)
        try:
            yield
        finally:
            if had:
                setattr(owner, name, prev)
            else:
                delattr(owner, name)


def _copy_value(x: Any) -> Any:
    """``x`` with its tensors cloned (through dicts, lists and tuples)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _copy_value(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_copy_value(v) for v in x) if type(x) in (list, tuple) else x
    return x


def _same_value(a: Any, b: Any) -> bool:
    """Whether two call arguments are equal: tensors by dtype, shape, device and value, containers item by item."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_same_value(a[k], b[k]) for k in a))
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return (type(a) is type(b) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True)))
    try:
        return bool(type(a) is type(b) and a == b)
    except Exception:  # an argument whose == is not a plain bool
        return a is b


# ----------------------------------------------------------------------------------------------------------
# distributed


class _Dist:
    """Rank and world size under torchrun (torch.distributed, gloo on CPU / nccl on CUDA), or one process."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        self.device = device
        if self.world > 1:
            import torch
            import torch.distributed as dist

            cuda = torch.cuda.is_available() and device != "cpu"
            if cuda and device in ("auto", "cuda"):
                self.device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(self.local_rank)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if cuda else "gloo")
                self.owned = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# the engine


def _num_layers(model: str) -> int | None:
    """Decoder layers from the checkpoint's config.json (no weights loaded), or None if not found there."""
    from flowkern.hf.loading import _locate
    from flowkern.hf.models import ADAPTERS

    try:
        _, raw = _locate(str(model))
    except (FileNotFoundError, ValueError) as exc:
        raise SweepUsageError(str(exc)) from None
    for adapter in ADAPTERS.values():
        if raw.get("model_type") in adapter.model_types:
            n = (raw.get(adapter.text_config_key) or {}).get("num_hidden_layers")
            return int(n) if n is not None else None
    return None


class _Sweep:
    """One sweep run: points, their plans and writers, the model, the progress bar."""

    def __init__(self, config: SweepConfig, dist: _Dist) -> None:
        self.config = config
        self.dist = dist
        self.out = Path(config.out).expanduser().absolute()
        self.model: Any = None
        self.processor: Any = None
        self.share: PrefixShare | None = None
        self.images: ImageCache | None = None
        self.generated = 0
        self.metric, self.higher = MAIN_METRIC[config.task]
        self.rank = config.rank if config.keep != 0 else "none"

    # -- configs ------------------------------------------------------------------------------------------

    def eval_config(self, point: Point, out: Path | None = None) -> EvalConfig:
        c = self.config
        pruned = point.layer is not None
        return EvalConfig(
            model=c.model, task=c.task, data=c.data, out=out or self.out / POINTS_DIR / point.name, images=c.images,
            limit=c.limit, batch_size=c.batch_size, max_new_tokens=c.max_new_tokens,
            prune_layer=point.layer, keep=c.keep if pruned else 0, rank=point.rank if pruned else "attention",
            prune_seed=c.seed if pruned else 0, strict=c.strict, split=c.split, ocr=c.ocr, device=self.dist.device,
            dtype=c.dtype, overwrite=False)

    def shard_dir(self, rank: int) -> Path:
        return self.out / SHARDS_DIR / f"rank{rank}"

    # -- shards -------------------------------------------------------------------------------------------

    def merge_shards(self, points: Sequence[Point]) -> None:
        """Rank 0: move every shard's answers of these points into the points' answer files, in question order."""
        from flowkern._io import atomic_write_text

        shards = sorted((self.out / SHARDS_DIR).glob("rank*")) if (self.out / SHARDS_DIR).is_dir() else []
        if not shards:
            return
        for point in points:
            files = [s / POINTS_DIR / point.name / ANSWERS_FILE for s in shards]
            files = [f for f in files if f.is_file() and f.stat().st_size]
            if not files:
                continue
            plan = prepare(self.eval_config(point))
            task, records = plan.task, {}
            main = plan.answers_path
            for f in ([main] if main.is_file() else []) + files:
                data = f.read_bytes()
                data = data[: data.rfind(b"\n") + 1]
                for raw in data.split(b"\n"):
                    if raw.strip():
                        obj = json.loads(raw)
                        records.setdefault(task.prediction_key(_prediction(task, obj)), obj)
            order = [s.key for s in plan.task.samples if s.key in records]
            _start_files(replace(plan, fresh=not plan.answered, torn_line=plan.torn_line))
            atomic_write_text(main, "".join(json.dumps(records[k], ensure_ascii=False) + "\n" for k in order))
        for s in shards:
            for point in points:
                shutil.rmtree(s / POINTS_DIR / point.name, ignore_errors=True)

    # -- running points -----------------------------------------------------------------------------------

    def run_points(self, points: Sequence[Point], progress: bool) -> None:
        """Answer every remaining question of ``points`` (this rank's batches), batch-major, sharing prefixes."""
        c, dist = self.config, self.dist
        if dist.rank == 0:
            self.merge_shards(points)
        dist.barrier()
        plans = {p: prepare(self.eval_config(p)) for p in points}
        samples = next(iter(plans.values())).samples
        by_key = {s.key: s for s in samples}
        batch_of = {s.key: i // c.batch_size for i, s in enumerate(samples)}
        writers: dict[Point, EvalPlan] = {}
        todo: dict[Point, set[str]] = {}
        for p, plan in plans.items():
            keys = {s.key for s in plan.todo if batch_of[s.key] % dist.world == dist.rank}
            if dist.world > 1:
                writer = prepare(self.eval_config(p, self.shard_dir(dist.rank) / POINTS_DIR / p.name))
                keys -= writer.answered
            else:
                writer = plan
            if keys or dist.world == 1:
                writers[p] = writer
                todo[p] = keys
        work = sum(len(k) for k in todo.values())
        if work == 0:
            return
        self.load_model()
        for writer in writers.values():
            _start_files(writer)
        model_id = Path(str(c.model).rstrip("/")).name or str(c.model)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=work, unit="answer", desc=f"sweep {c.task} ({len(todo)} points)", dynamic_ncols=True,
                       smoothing=0.05)
        n_batches = math.ceil(len(samples) / c.batch_size)
        max_new = plans[next(iter(plans))].settings["max_new_tokens"]
        task = plans[next(iter(plans))].task
        try:
            for j in range(n_batches):
                if j % dist.world != dist.rank:
                    continue
                grid = samples[j * c.batch_size:(j + 1) * c.batch_size]
                groups: dict[tuple[str, ...], list[Point]] = {}
                for p, keys in todo.items():
                    sub = tuple(s.key for s in grid if s.key in keys)
                    if sub:
                        groups.setdefault(sub, []).append(p)
                for keys, group in groups.items():
                    batch = [by_key[k] for k in keys]
                    inputs = build_batch_inputs(self.processor, self.model, [s.image for s in batch],
                                                [s.prompt for s in batch])
                    with contextlib.closing(self.run_group(group, batch, inputs, max_new)) as answered:
                        for p, texts in answered:
                            _append_lines(writers[p].answers_path, [answer_record(task, s, t, model_id)
                                                                    for s, t in zip(batch, texts, strict=True)])
                            todo[p] -= set(keys)
                            self.generated += len(batch)
                            if bar is not None:
                                bar.set_postfix_str(f"{p.name}, batch {j + 1}/{n_batches}", refresh=False)
                                bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
            if self.share is not None:
                self.share.clear()
            if self.images is not None:
                self.images.clear()

    def run_group(self, group: Sequence[Point], batch: Sequence[Any], inputs: Any,
                  max_new: int) -> Iterator[tuple[Point, list[str]]]:
        """Answers of one batch at each point of ``group``: the baseline first, then the pruned points by L
        descending, the first of those recording the shared prefix for the others (:class:`PrefixShare`). With
        reuse, the images are encoded once for all of them (:class:`ImageCache`) and the language model stays on
        the ``flowkern`` attention across the pruned points (each ``flowkern.prune`` would switch it there and back:
        the same computation, without the switches)."""
        import flowkern

        images, prompts = [s.image for s in batch], [s.prompt for s in batch]

        def answer(p: Point) -> list[str]:
            pruning = None
            if p.layer is not None:
                pruning = flowkern.prune(self.model, layer=p.layer, keep=self.config.keep, rank=p.rank,
                                         seed=self.config.seed)
            return generate_answers(self.model, self.processor, images, prompts, max_new_tokens=max_new,
                                    pruning=pruning, inputs=inputs)

        reuse = self.config.reuse and self.share is not None
        pruned = sorted((p for p in group if p.layer is not None), key=lambda p: (-p.layer, p.depth()))
        with contextlib.ExitStack() as stack:
            if reuse and self.images is not None:
                stack.callback(self.images.clear)
                stack.enter_context(self.images.active())
            for p in group:
                if p.layer is None:
                    yield p, answer(p)
            if not pruned:
                return
            first, rest = pruned[0], pruned[1:]
            depths = [p.depth() for p in rest if p.depth() >= 1]
            if not reuse:
                for p in pruned:
                    yield p, answer(p)
                return
            stack.enter_context(self._flowkern_attention())
            if not depths:
                for p in pruned:
                    yield p, answer(p)
                return
            assert self.share is not None
            stack.callback(self.share.clear)
            with self.share.capture(range(max(depths)), {d - 1 for d in depths}):
                texts = answer(first)
            yield first, texts
            for p in rest:
                with self.share.replay(p.depth()):
                    texts = answer(p)
                yield p, texts

    @contextlib.contextmanager
    def _flowkern_attention(self) -> Iterator[None]:
        """The language model on the ``flowkern`` attention inside the block (what ``flowkern.prune`` selects),
        held by a listener on the model's session: the session, and the decoder layers and attention modules it
        found, then last across the block's ``flowkern.prune`` enters instead of being found again at each one."""
        from flowkern.hf.session import Session

        session = Session.of(self.model)
        hold = _AttentionHold()
        session.add(hold)
        try:
            yield
        finally:
            session.remove(hold)

    def load_model(self) -> None:
        if self.model is not None:
            return
        from flowkern.hf.loading import load_model

        try:
            self.model, self.processor = load_model(self.config.model, device=self.dist.device,
                                                    dtype=self.config.dtype)
        except (FileNotFoundError, ValueError, ImportError) as exc:
            raise SweepUsageError(str(exc)) from None
        self.share = PrefixShare(self.model) if self.config.reuse else None
        self.images = ImageCache(self.model) if self.config.reuse else None

    # -- results ------------------------------------------------------------------------------------------

    def finish(self, points: Sequence[Point]) -> dict[str, dict[str, Any]]:
        """Rank 0: merge shards, score each point's answer file, write metrics.json, append results.jsonl."""
        from flowkern._io import atomic_write_json

        out: dict[str, dict[str, Any]] = {}
        if self.dist.rank == 0:
            self.merge_shards(points)
            previous = _read_results(self.out / RESULTS_FILE)
            lines = []
            for p in points:
                plan = prepare(self.eval_config(p))
                if plan.todo:
                    raise RuntimeError(f"flowkern sweep: point {p.name} still has {len(plan.todo)} questions to answer")
                metrics = plan.task.score(plan.task.read_predictions(plan.answers_path))
                atomic_write_json(plan.metrics_path, metrics)
                record = {"point": p.name, "series": p.series, "layer": p.layer, "rank": p.rank,
                          "keep": self.config.keep if p.layer is not None else None, "metric": self.metric,
                          "value": metrics.get(self.metric), "n": metrics.get("n"),
                          "answers": f"{POINTS_DIR}/{p.name}/{ANSWERS_FILE}", "metrics": metrics}
                if previous.get(p.name) != record:
                    lines.append(record)
                out[p.name] = record
            if lines:
                _append_lines(self.out / RESULTS_FILE, lines)
        return self.dist.broadcast(out)


def _prediction(task: Any, obj: dict) -> Any:
    from flowkern.eval.tasks.base import Prediction

    return Prediction(obj[task.id_field], obj[task.text_field], obj)


def _read_results(path: Path) -> dict[str, dict[str, Any]]:
    """Last record per point of a results.jsonl (a torn last line is ignored)."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    out = {}
    for raw in data.split(b"\n"):
        if raw.strip():
            with contextlib.suppress(json.JSONDecodeError):
                obj = json.loads(raw)
                out[obj["point"]] = obj
    return out


def _check(config: SweepConfig) -> None:
    from flowkern.eval import TASKS

    if config.task not in TASKS:
        raise SweepUsageError(f"--task: unknown task {config.task!r} (choose from {', '.join(TASKS)})")
    if config.search not in ("full", "bisect"):
        raise SweepUsageError(f"--search {config.search!r}: expected full or bisect")
    if isinstance(config.tolerance, bool) or not isinstance(config.tolerance, int | float) or not (
            config.tolerance >= 0 and math.isfinite(config.tolerance)):
        raise SweepUsageError(f"--tolerance {config.tolerance!r}: expected a number of points >= 0")
    for r in config.controls:
        if r not in _CONTROLS:
            raise SweepUsageError(f"--control {r!r}: expected one of {', '.join(_CONTROLS)}")
    if config.controls and config.keep == 0:
        raise SweepUsageError("--control needs --keep K (K != 0): with k = 0 every rank drops the same tokens")
    if config.keep != 0 and config.rank in config.controls:
        raise SweepUsageError(f"--control {config.rank} is the main --rank already")
    if len(set(config.controls)) != len(config.controls):
        raise SweepUsageError(f"--control {','.join(config.controls)}: a rank is given twice")
    if config.rank not in _CONTROLS:
        raise SweepUsageError(f"--rank {config.rank!r}: expected one of {', '.join(_CONTROLS)}")


def _settings(config: SweepConfig, plan: EvalPlan) -> dict[str, Any]:
    s = plan.settings
    return {"model": s["model"], "task": s["task"], "data": s["data"], "images": s["images"], "split": s["split"],
            "ocr": s["ocr"], "max_new_tokens": s["max_new_tokens"], "keep": config.keep,
            "rank": config.rank if config.keep != 0 else None, "seed": config.seed}


def _start_sweep(sweep: _Sweep, settings: dict[str, Any]) -> None:
    """Refuse other settings in --out; (re)write sweep.json; --overwrite clears the sweep's files (rank 0)."""
    from flowkern._io import atomic_write_json

    out, config = sweep.out, sweep.config
    path = out / SWEEP_FILE
    if config.overwrite:
        if sweep.dist.rank == 0:
            for name in (POINTS_DIR, SHARDS_DIR):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in (RESULTS_FILE, SUMMARY_FILE, CLIFF_FILE, FIGURE_FILE, SWEEP_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
        sweep.dist.barrier()
    elif path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
        except (ValueError, AttributeError):
            raise SweepUsageError(f"--out: {path}: not valid JSON; pass --overwrite to start afresh") from None
        diffs = [f"{_FLAGS[k]} was {old.get(k)!r}, now {settings[k]!r}" for k in SWEEP_SETTINGS
                 if old.get(k) != settings[k]]
        if diffs:
            raise SweepUsageError(f"--out: the sweep in {out} was run under other settings ({'; '.join(diffs)}): use "
                                  f"another --out, rerun with the same settings to resume, or pass --overwrite")
    elif (out / POINTS_DIR).is_dir() and any((out / POINTS_DIR).iterdir()):
        raise SweepUsageError(f"--out: {out} has points but no {SWEEP_FILE}: pass --overwrite to start afresh")
    sweep.dist.barrier()
    if sweep.dist.rank == 0:
        import flowkern

        atomic_write_json(path, {"settings": settings, "flowkern": flowkern.__version__,
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    sweep.dist.barrier()


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SweepUsageError(f"--out: {out} is a file, expected a folder")
    ancestor = out
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SweepUsageError(f"--out: cannot write in {ancestor}")


def _within(value: float, baseline: float, tol_points: float) -> bool:
    return abs(value - baseline) <= tol_points / 100.0 + 1e-12


def _bisect_violation(curve: Mapping[int, float], baseline: float, tol: float) -> str | None:
    """Why the evaluated points contradict a monotone curve, or None."""
    rep = cliff_report(curve, baseline, tolerance=tol)
    layers = sorted(curve)
    for i, a in enumerate(layers):
        for b in layers[i + 1:]:
            if _within(curve[a], baseline, tol) and not _within(curve[b], baseline, tol):
                return f"layer {a} is within tolerance but the later layer {b} is not"
    if rep["violations"]:
        v = rep["violations"][0]
        return f"layer {v['to']} is {v['gap_to_points']:.2f} points from the baseline, layer {v['from']} only " \
               f"{v['gap_from_points']:.2f}"
    return None


def run_sweep(config: SweepConfig, *, model: Any = None, processor: Any = None,
              progress: bool = False) -> SweepResult:
    """Run (or resume) a sweep and write its results (see the module docstring).

    Args:
        config: what to sweep (:class:`SweepConfig`).
        model, processor: an already loaded model (None: loaded from ``config.model`` once there is work).
        progress: a tqdm bar over (point, question) answers with an ETA, on stderr.

    Returns:
        a :class:`SweepResult` (``cliff`` is also in ``<out>/cliff.json``).

    Raises:
        SweepUsageError: bad options, bad inputs (:func:`flowkern.eval.run.prepare`'s checks) or other settings in
            ``out``; before any model is loaded.
    """
    _check(config)
    dist = _Dist(config.device)
    try:
        result = _run(config, dist, model, processor, progress)
        # every rank past its last collective before any tears the process group down: a rank that exits while
        # its peer still reads from it makes gloo abort the peer ("Connection closed by peer", SIGABRT)
        dist.barrier()
        return result
    finally:
        dist.close()


def _run(config: SweepConfig, dist: _Dist, model: Any, processor: Any, progress: bool) -> SweepResult:
    start = time.perf_counter()
    sweep = _Sweep(config, dist)
    _check_out(sweep.out)
    sweep.model, sweep.processor = model, processor
    if model is not None:
        sweep.share = PrefixShare(model) if config.reuse else None
        sweep.images = ImageCache(model) if config.reuse else None
        num_layers = int(PrefixShare(model).layers.__len__())
    else:
        n = _num_layers(config.model)
        if n is None:
            sweep.load_model()
            n = len(PrefixShare(sweep.model).layers)
        num_layers = n
    layers = parse_layer_spec(config.layers, num_layers)
    skipped_attention = config.rank == "attention" and config.keep != 0 and 0 in layers
    ranks = [(sweep.rank, "main")] + [(r, "control") for r in config.controls]

    def points_at(ls: Sequence[int]) -> list[Point]:
        return [Point(x, r, s, config.keep) for r, s in ranks for x in ls
                if not (x == 0 and r == "attention" and config.keep != 0)]

    main_layers = [x for x in layers if not (x == 0 and skipped_attention)]
    if not main_layers:
        raise SweepUsageError("--layers: rank 'attention' with --keep != 0 needs layers >= 1 (layer 0 has no previous "
                              "layer to rank by)")
    baseline_point = Point(None)
    try:
        first_plan = prepare(sweep.eval_config(baseline_point))  # validates task, data, images, --out of a point
    except EvalUsageError as exc:
        raise SweepUsageError(str(exc)) from None
    _start_sweep(sweep, _settings(config, first_plan))

    done: dict[str, dict[str, Any]] = {}

    def evaluate(ps: Sequence[Point]) -> None:
        try:
            sweep.run_points(ps, progress)
        except EvalUsageError as exc:
            raise SweepUsageError(str(exc)) from None
        dist.barrier()
        done.update(sweep.finish(ps))

    search: dict[str, Any] = {"mode": config.search, "layers": main_layers}
    if config.search == "full":
        evaluate([baseline_point, *points_at(main_layers)])
    else:
        evaluate([baseline_point, *points_at(sorted({main_layers[0], main_layers[-1]}))])
        base = done["baseline"]["value"]

        def value(x: int) -> float:
            return done[Point(x, sweep.rank, "main", config.keep).name]["value"]

        lo, hi = 0, len(main_layers) - 1
        reason = None
        if _within(value(main_layers[hi]), base, config.tolerance) and not _within(
                value(main_layers[lo]), base, config.tolerance):
            while hi - lo > 1:
                mid = (lo + hi) // 2
                evaluate(points_at([main_layers[mid]]))
                if _within(value(main_layers[mid]), base, config.tolerance):
                    hi = mid
                else:
                    lo = mid
                curve = {x: value(x) for x in main_layers if Point(x, sweep.rank, "main", config.keep).name in done}
                reason = _bisect_violation(curve, base, config.tolerance)
                if reason:
                    break
        if reason:
            rest = [x for x in main_layers if Point(x, sweep.rank, "main", config.keep).name not in done]
            evaluate(points_at(rest))
        search.update(fallback=bool(reason), reason=reason, note=(
            f"not monotone ({reason}): evaluated every layer" if reason else
            "bisection assumes a monotone curve: layers not evaluated are assumed to lie between their neighbours"))

    result = _write_outputs(sweep, done, main_layers, ranks, search, skipped_attention)
    result.generated = sweep.generated
    result.seconds = time.perf_counter() - start
    return result


def _write_outputs(sweep: _Sweep, done: dict[str, dict[str, Any]], layers: Sequence[int],
                   ranks: Sequence[tuple[str, str]], search: dict[str, Any], skipped_attention: bool) -> SweepResult:
    from flowkern._io import atomic_write_json, atomic_write_text

    config, out = sweep.config, sweep.out
    base = done["baseline"]["value"]
    series: dict[str, dict[int, float]] = {}
    for r, kind in ranks:
        key = "main" if kind == "main" else r
        series[key] = {x: done[n]["value"] for x in layers if (n := Point(x, r, kind, config.keep).name) in done}
    curve = series.pop("main")
    cliff = cliff_report(curve, base, tolerance=config.tolerance, higher_is_better=sweep.higher)
    cliff = {"task": config.task, "metric": sweep.metric, "keep": config.keep, "rank": sweep.rank,
             "layers": "0-based decoder layer L = first layer without the image (the paper's layer L+1)",
             **cliff, "search": search,
             "controls": {r: cliff_report(c, base, tolerance=config.tolerance, higher_is_better=sweep.higher)
                          ["cliff_layer"] for r, c in series.items()},
             "control_curves": {r: {str(x): v for x, v in sorted(c.items())} for r, c in series.items()}}
    if skipped_attention:
        cliff["skipped"] = "layer 0 (rank 'attention' with keep != 0 needs layer L-1 to rank by)"
    files = {"results": out / RESULTS_FILE, "summary": out / SUMMARY_FILE, "cliff": out / CLIFF_FILE,
             "figure": out / FIGURE_FILE}
    records = [done["baseline"]] + [done[n] for r, k in ranks for x in layers
                                    if (n := Point(x, r, k, config.keep).name) in done]
    if sweep.dist.rank == 0:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["point", "series", "layer", "rank", "keep", "n", sweep.metric, "delta_points", "within_tolerance"])
        for r in records:
            delta = (r["value"] - base) * 100.0
            w.writerow([r["point"], r["series"], "" if r["layer"] is None else r["layer"], r["rank"] or "",
                        "" if r["keep"] is None else r["keep"], r["n"], f"{r['value']:.6f}", f"{delta:.4f}",
                        _within(r["value"], base, config.tolerance)])
        atomic_write_text(files["summary"], buf.getvalue())
        atomic_write_json(files["cliff"], cliff)
        from flowkern.viz import plot_sweep

        fig = plot_sweep(curve, base, controls=series, cliff=cliff["cliff_layer"], tolerance=config.tolerance,
                         metric=sweep.metric, title=f"{config.task}: {Path(str(config.model).rstrip('/')).name}, "
                                                    f"keep={config.keep}")
        tmp = out / f".{FIGURE_FILE}.tmp.png"
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, files["figure"])
    return SweepResult(out=out, baseline=base, curve=curve, controls=series, cliff=cliff, points=records,
                       generated=0, seconds=0.0, files=files)
