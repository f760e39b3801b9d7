"""``flowkern demo``: the paper's analysis end to end on the shipped shapes model, offline on a CPU, in one report.

.. code-block:: python

    from flowkern.demo.report import DemoConfig, run_demo

    result = run_demo(DemoConfig(out="runs/demo", quick=True))
    result.out / "report.html", result.summary["headline"]

What one run does, on fresh shapes sets (:mod:`flowkern.eval.shapes`, seed ``seed``) of the four task analogues
(shapes-POPE, -SQA, -TextVQA and captions scored by CHAIR), with the model loaded once:

1. **Attention** (paper Figure 2A/2B): a sample of questions per task answered greedily under
   :func:`flowkern.trace`; the answer's attention share of system / image / user / generated tokens per decoder
   layer, averaged over the questions (each question weighs the same), and the answer -> image attention maps of a
   few of them on their images.
2. **LLaVA-CAM** (Figures 3/4): :func:`flowkern.cam` of a few questions per task, every layer.
3. **Truncation** (Figure 5, Table 1): per task a :func:`flowkern.eval.sweep.run_sweep` over every layer with
   k = 0 (every image token dropped from layer L on), and one at ``keep`` image tokens ranked by attention with the
   random-rank control; the cliff layer (:func:`flowkern.eval.sweep.cliff_report`) and a Table-1 style table
   (baseline vs at the cliff layer).
4. **Speed**: prefill time and decode tokens/s of the model pruned at each task's cliff layer vs unpruned (the
   model's own attention), batch 1 and 16, timed by :class:`flowkern.prune.ForwardTimer` round-robin, medians.
5. **In plain words**: :func:`flowkern.demo.report_words.conclusions` turns the numbers into sentences -- where
   they match the paper's claims and where they do not.

Everything is written through :class:`flowkern._io.AtomicDir`: ``out`` gets ``report.html`` (figures embedded as
data URIs, each also linked to its PNG), ``figures/*.png``, ``tables/*.csv|json``, ``summary.json`` and the sweep
folders ``sweeps/<task>[-keep<K>]/`` (answer files per point) all at once, or not at all. The shapes sets are drawn in
a scratch folder and removed (``summary.json`` gives the ``flowkern shapes`` commands that redraw them).

The tolerance of the cliff layer is, per task, the larger of 1 point and one question's worth of the metric
(``100 / n`` points for ``n`` questions), unless ``tolerance`` is given: with few questions a single changed
answer moves a metric by more than 1 point.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "DemoTask", "DemoSizes", "DemoConfig", "DemoResult", "TASKS", "FULL", "QUICK", "REPORT_FILE", "SUMMARY_FILE",
    "run_demo", "load", "check_config", "check_model", "model_id_of", "spread", "tables", "table1_rows",
    "attention_stage", "cam_stage", "truncation_stage", "speed_stage",
]

REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class DemoTask:
    """One task analogue of the demo.

    Attributes:
        world: the :mod:`flowkern.eval.shapes` task name (``"caption"``).
        loader: the :mod:`flowkern.eval` task that reads and scores it (``"chair"``).
        label: the name shown in the report.
        kind: what it asks of the model, in words.
    """

    world: str
    loader: str
    label: str
    kind: str


TASKS: tuple[DemoTask, ...] = (
    DemoTask("pope", "pope", "shapes-POPE", "perception: is this object in the image?"),
    DemoTask("sqa", "sqa", "shapes-SQA", "reasoning: spatial relations, counts, colours, context"),
    DemoTask("textvqa", "textvqa", "shapes-TextVQA", "reading the label in the image"),
    DemoTask("caption", "chair", "shapes-CHAIR", "captioning, scored for hallucinated objects"),
)
"""The four tasks, in report order."""


@dataclass(frozen=True)
class DemoSizes:
    """How much work a run does.

    Attributes:
        images: shapes images per task (POPE asks 6 questions per image: 3 splits x yes/no; the others 1).
        trace: questions per task traced for the attention shares (evenly spread over the set).
        map_examples: examples per task drawn as answer -> image attention maps.
        cam_examples: examples per task explained by LLaVA-CAM.
        cam_samples: SmoothGrad copies per LLaVA-CAM.
        speed_repeats: timed repeats per speed point (after one warm-up; medians reported).
        speed_new_tokens: tokens decoded per timed run (end-of-sequence suppressed).
        speed_batches: batch sizes timed.
        batch_size: questions per ``generate`` in the sweeps and the traces.
    """

    images: Mapping[str, int]
    trace: int
    map_examples: int
    cam_examples: int
    cam_samples: int
    speed_repeats: int
    speed_new_tokens: int = 16
    speed_batches: tuple[int, ...] = (1, 16)
    batch_size: int = 16


FULL = DemoSizes(images={"pope": 50, "sqa": 200, "textvqa": 200, "caption": 100}, trace=32, map_examples=3,
                 cam_examples=3, cam_samples=8, speed_repeats=5)
"""``flowkern demo``: 300 POPE questions, 200 SQA, 200 TextVQA, 100 captions."""

QUICK = DemoSizes(images={"pope": 8, "sqa": 32, "textvqa": 32, "caption": 16}, trace=8, map_examples=2,
                  cam_examples=2, cam_samples=4, speed_repeats=2)
"""``flowkern demo --quick``: 48 POPE questions, 32 SQA, 32 TextVQA, 16 captions."""


@dataclass(frozen=True)
class DemoConfig:
    """The options of ``flowkern demo``.

    Attributes:
        out: the report folder (replaced as a whole; a previous result only with ``overwrite``).
        model: ``"demo"`` (the shipped model) or a directory of another shapes-trained model.
        quick: :data:`QUICK` sizes instead of :data:`FULL` (ignored when ``sizes`` is given).
        sizes: explicit sizes.
        seed: seed of the shapes sets (the same seed draws the same sets on every machine).
        keep: image tokens kept by the top-K (attention) and random-control sweeps (1 .. image tokens - 1).
        tolerance: cliff tolerance in points for every task; None: per task ``max(1, 100 / n)``.
        threads: torch CPU threads during the run (None: leave torch's setting; 1 is fastest for this tiny model
            on a shared machine).
        device: ``"cpu"``, ``"cuda"``, ``"auto"``.
        overwrite: replace a previous report in ``out``.
    """

    out: str | os.PathLike[str] = "runs/demo"
    model: str = "demo"
    quick: bool = False
    sizes: DemoSizes | None = None
    seed: int = 1000
    keep: int = 16
    tolerance: float | None = None
    threads: int | None = 1
    device: str = "cpu"
    overwrite: bool = False

    def resolved_sizes(self) -> DemoSizes:
        """``sizes``, or :data:`QUICK` / :data:`FULL` by ``quick``."""
        return self.sizes or (QUICK if self.quick else FULL)


@dataclass
class DemoResult:
    """What :func:`run_demo` wrote: the folder, the summary (also ``summary.json``) and the wall time."""

    out: Path
    summary: dict[str, Any]
    seconds: float
    files: list[str] = field(default_factory=list)

    @property
    def report(self) -> Path:
        """``out / report.html``."""
        return self.out / REPORT_FILE


# ----------------------------------------------------------------------------------------------------------
# checks


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_config(config: DemoConfig) -> Path:
    """Check every option before any work; return the absolute report folder.

    Raises:
        ValueError: naming the option (``--keep``, ``--threads``, ``--tolerance``, ``--out``, ...).
    """
    from flowkern import _io

    sizes = config.resolved_sizes()
    if not _is_int(config.seed):
        raise ValueError(f"--seed {config.seed!r}: expected an integer")
    if not _is_int(config.keep) or config.keep < 1:
        raise ValueError(f"--keep {config.keep!r}: expected a number of image tokens >= 1")
    if config.threads is not None and (not _is_int(config.threads) or config.threads < 1):
        raise ValueError(f"--threads {config.threads!r}: expected an integer >= 1")
    if config.tolerance is not None and (isinstance(config.tolerance, bool) or not isinstance(
            config.tolerance, int | float) or not math.isfinite(config.tolerance) or config.tolerance < 0):
        raise ValueError(f"--tolerance {config.tolerance!r}: expected a number of points >= 0")
    missing = [t.world for t in TASKS if t.world not in sizes.images]
    if missing:
        raise ValueError(f"sizes.images: no count for {', '.join(missing)}")
    for name, value in [*(("images[" + k + "]", v) for k, v in sizes.images.items()), ("trace", sizes.trace),
                        ("cam_samples", sizes.cam_samples), ("speed_repeats", sizes.speed_repeats),
                        ("speed_new_tokens", sizes.speed_new_tokens), ("batch_size", sizes.batch_size)]:
        if not _is_int(value) or value < 1:
            raise ValueError(f"sizes.{name} {value!r}: expected an integer >= 1")
    for name, value in (("map_examples", sizes.map_examples), ("cam_examples", sizes.cam_examples)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"sizes.{name} {value!r}: expected an integer >= 0")
    if not sizes.speed_batches or any(not _is_int(b) or b < 1 for b in sizes.speed_batches):
        raise ValueError(f"sizes.speed_batches {sizes.speed_batches!r}: expected batch sizes >= 1")
    return _io.check_output_dir(config.out, overwrite=config.overwrite, what="--out")


# ----------------------------------------------------------------------------------------------------------
# helpers


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items evenly spread over ``items`` (all of them when ``n >= len(items)``), in order."""
    if n >= len(items):
        return list(items)
    if n <= 0:
        return []
    return [items[(i * len(items)) // n] for i in range(n)]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _pad_id(processor: Any) -> int | None:
    tok = getattr(processor, "tokenizer", processor)
    pad = getattr(tok, "pad_token_id", None)
    return pad if pad is not None else getattr(tok, "eos_token_id", None)


def _decode(processor: Any, ids: Any) -> list[str]:
    decoder = processor if hasattr(processor, "batch_decode") else processor.tokenizer
    return [t.strip() for t in decoder.batch_decode(ids, skip_special_tokens=True)]


def _question(sample: Any, task: DemoTask) -> str:
    """The question as a person would read it (SQA with its options and context)."""
    if task.loader == "chair":
        return sample.prompt
    text = str(sample.meta.get("question", sample.prompt.split("\n")[0]))
    if task.loader == "sqa":
        first = sample.prompt.split("\n")[0]
        context = first + " " if first.startswith("Context:") else ""
        options = "  ".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(sample.meta.get("choices", [])))
        text = f"{context}{text}  {options}"
    return text


def _reference(sample: Any, task: DemoTask) -> str:
    ref = sample.reference
    if task.loader == "textvqa":
        return str(ref[0]) if ref else ""
    if task.loader == "chair":
        objects = ref.get("classes", ()) if isinstance(ref, Mapping) else ref
        return ", ".join(sorted(objects)) if isinstance(objects, set | frozenset | list | tuple) else str(objects)
    if task.loader == "sqa":
        choices = sample.meta.get("choices", [])
        return f"{ref} ({choices[ord(str(ref)) - 65]})" if isinstance(ref, str) and len(ref) == 1 and \
            0 <= ord(ref) - 65 < len(choices) else str(ref)
    return str(ref)


def _finite(x: Any) -> Any:
    """JSON-safe: NaN / inf -> None, recursively; NumPy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, str | bytes):
        with contextlib.suppress(Exception):
            x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, set | frozenset):
        return sorted(_finite(v) for v in x)
    return x


class _Progress:
    """Stage lines on stderr (``flowkern demo: [2/5] ...``) and tqdm bars for the loops inside a stage."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self.index = 0
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.index += 1
        if self.enabled:
            print(f"flowkern demo: [{self.index}/{self.total}] {what}  (at {time.perf_counter() - self.t0:.0f} s)",
                  file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)

    def bar(self, total: int, desc: str, unit: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not self.enabled, dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------------------------------------
# the stages


def attention_stage(model: Any, processor: Any, samples: Sequence[Any], *, max_new_tokens: int, batch_size: int,
                    examples: int, bar: Any = None) -> dict[str, Any]:
    """Figure 2A/2B: answer ``samples`` greedily under :func:`flowkern.trace`, batch by batch.

    Returns:
        ``shares`` float ``[num_layers, 4]`` (mean over questions of each question's share, valid answer rows
        only), ``image_sd`` ``[num_layers]`` (standard deviation of the image share over questions),
        ``per_question`` ``[n, num_layers, 4]``, ``segment_names``, ``n``, ``image_tokens`` (of the first prompt),
        and ``examples``: the first ``examples`` questions with ``sample``, ``answer``, ``maps`` (one ``[gh, gw]``
        answer -> image map per layer, averaged over answer rows) and ``image_share`` per layer.
    """
    import numpy as np
    import torch

    import flowkern
    from flowkern.hf.inputs import build_inputs
    from flowkern.hf.models import get_adapter

    per_question: list[Any] = []
    shown: list[dict[str, Any]] = []
    names: list[str] = []
    image_tokens = 0
    placeholders = torch.tensor(get_adapter(model).placeholder_token_ids(model.config))
    for chunk in _chunks(samples, batch_size):
        inputs = build_inputs(processor, model, [s.image for s in chunk], [s.prompt for s in chunk])
        if not image_tokens:
            image_tokens = int(torch.isin(inputs["input_ids"][0].cpu(), placeholders).sum())
        with torch.inference_mode(), flowkern.trace(model, image_inputs=inputs) as flow:
            sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=_pad_id(processor))
        answers = _decode(processor, sequences[:, inputs["input_ids"].shape[1]:].cpu())
        names = list(flow.segment_names)
        col = names.index("image")
        ss = flow.sample_shares.numpy()  # [L, B, 4]
        for b, sample in enumerate(chunk):
            per_question.append(ss[:, b])
            if len(shown) < examples:
                maps = [flow.image_attention(layer, sample=b).numpy() for layer in range(ss.shape[0])]
                shown.append(dict(sample=sample, answer=answers[b], maps=maps, image_share=ss[:, b, col].tolist()))
        if bar is not None:
            bar.update(len(chunk))
    stack = np.stack(per_question)  # [n, L, 4]
    return dict(shares=stack.mean(axis=0), image_sd=stack[:, :, names.index("image")].std(axis=0),
                per_question=stack, segment_names=names, n=len(per_question), examples=shown,
                image_tokens=image_tokens)


def cam_stage(model: Any, processor: Any, samples: Sequence[Any], *, max_new_tokens: int, copies: int,
              bar: Any = None) -> list[dict[str, Any]]:
    """Figures 3/4: :func:`flowkern.cam` of each sample (its own greedy answer, every layer, SmoothGrad over
    ``copies`` noisy copies, noise std 0.1, maps max-normalised per layer).

    Returns:
        per sample: ``sample``, ``answer``, ``heatmaps`` float ``[num_layers, gh, gw]`` in [0, 1] and ``peaks``
        (``(layer, row, col, value)``), or ``error`` when there is nothing to explain (an empty answer).
    """
    import flowkern
    from flowkern.hf.inputs import build_inputs

    out = []
    for sample in samples:
        inputs = build_inputs(processor, model, [sample.image], [sample.prompt])
        try:
            result = flowkern.cam(model, inputs, processor=processor, samples=copies, noise_std=0.1,
                                  batch_size=copies, max_new_tokens=max_new_tokens, seed=0)
        except ValueError as exc:  # e.g. the model answers nothing but an end-of-sequence token
            out.append(dict(sample=sample, answer="", heatmaps=None, peaks=[], error=str(exc)))
        else:
            answer = _decode(processor, result.answer_ids.view(1, -1).cpu())[0]
            out.append(dict(sample=sample, answer=answer, heatmaps=result.heatmaps.numpy(), peaks=result.peaks(),
                            error=None))
        if bar is not None:
            bar.update(1)
    return out


def _tolerance(config: DemoConfig, n: int) -> float:
    if config.tolerance is not None:
        return float(config.tolerance)
    return max(1.0, 100.0 / max(1, n))


def truncation_stage(model: Any, processor: Any, task: DemoTask, *, model_id: str, data: Path,
                     images: Path | None, out: Path, keep: int, tolerance: float, batch_size: int,
                     max_new_tokens: int, device: str, progress: bool) -> dict[str, Any]:
    """Figure 5 / Table 1: :func:`flowkern.eval.sweep.run_sweep` over every layer at k = 0 into ``out``, and at
    ``keep`` tokens ranked by attention with the random control into ``out-keep<K>``.

    Returns:
        ``k0`` and ``keepk``: the two :class:`flowkern.eval.sweep.SweepResult`.
    """
    from flowkern.eval.sweep import SweepConfig, run_sweep

    common = dict(model=model_id, task=task.loader, data=data, images=images, layers="all", batch_size=batch_size,
                  max_new_tokens=max_new_tokens, tolerance=tolerance, device=device)
    k0 = run_sweep(SweepConfig(out=out, **common), model=model, processor=processor, progress=progress)
    keepk = run_sweep(SweepConfig(out=out.parent / f"{out.name}-keep{keep}", keep=keep, rank="attention",
                                  controls=("random",), **common), model=model, processor=processor,
                      progress=progress)
    return dict(k0=k0, keepk=keepk)


def _time_generate(model: Any, inputs: Any, *, layer: int | None, new_tokens: int,
                   pad: int | None) -> tuple[float, float]:
    """One timed greedy ``generate`` (``new_tokens`` forced): (prefill seconds, decode tokens/s)."""
    import torch

    import flowkern
    from flowkern.prune import ForwardTimer

    ctx = flowkern.prune(model, layer=layer, keep=0) if layer is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx, ForwardTimer(model) as timer:
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=pad)
    tps = timer.decode_tokens_per_second
    return float(timer.prefill_seconds or float("nan")), float(tps if tps is not None else float("nan"))


def speed_stage(model: Any, processor: Any, points: Sequence[tuple[str, int, Sequence[Any]]], *,
                batches: Sequence[int], new_tokens: int, repeats: int, bar: Any = None) -> list[dict[str, Any]]:
    """Prefill time and decode speed, pruned (k = 0) at a layer vs unpruned (the model's own attention).

    Args:
        points: ``(label, layer, samples)``: the prompts of a task and the layer to prune it at.
        batches: batch sizes (the first ``b`` samples, repeated if there are fewer).
        new_tokens: tokens decoded per run (end-of-sequence suppressed, so every run decodes as many).
        repeats: timed runs per method after one warm-up, unpruned and pruned alternating; medians.

    Returns:
        one row per (point, batch): ``label``, ``layer``, ``batch``, ``prompt_tokens``, ``unpruned_prefill_ms``,
        ``pruned_prefill_ms``, ``prefill_speedup``, ``unpruned_decode_tok_s``, ``pruned_decode_tok_s``,
        ``decode_speedup``, ``repeats``, ``new_tokens``.
    """
    from flowkern.hf.inputs import build_inputs

    pad = _pad_id(processor)
    rows = []
    for label, layer, samples in points:
        for b in batches:
            chosen = [samples[i % len(samples)] for i in range(b)]
            inputs = build_inputs(processor, model, [s.image for s in chosen], [s.prompt for s in chosen])
            times: dict[str, list[tuple[float, float]]] = {"unpruned": [], "pruned": []}
            for r in range(repeats + 1):
                for method, at in (("unpruned", None), ("pruned", layer)):
                    t = _time_generate(model, inputs, layer=at, new_tokens=new_tokens, pad=pad)
                    if r > 0:
                        times[method].append(t)
                    if bar is not None:
                        bar.update(1)
            med = {m: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v))
                   for m, v in times.items()}
            rows.append(dict(
                label=f"{label} L={layer} B={b}", task=label, layer=layer, batch=b,
                prompt_tokens=int(inputs["input_ids"].shape[1]),
                unpruned_prefill_ms=med["unpruned"][0] * 1e3, pruned_prefill_ms=med["pruned"][0] * 1e3,
                prefill_speedup=med["unpruned"][0] / med["pruned"][0],
                unpruned_decode_tok_s=med["unpruned"][1], pruned_decode_tok_s=med["pruned"][1],
                decode_speedup=med["pruned"][1] / med["unpruned"][1], repeats=repeats, new_tokens=new_tokens))
    return rows


# ----------------------------------------------------------------------------------------------------------
# the run


def _model_facts(model: Any, model_id: str, name: str) -> dict[str, Any]:
    from flowkern.hf.models import get_adapter

    text = get_adapter(model).text_config(model.config)
    return dict(name=name, path=model_id, model_type=str(getattr(model.config, "model_type", "")),
                num_layers=int(text.num_hidden_layers), hidden_size=int(getattr(text, "hidden_size", 0)),
                parameters=int(sum(p.numel() for p in model.parameters())))


def _chance(task: DemoTask, samples: Sequence[Any]) -> float | None:
    """The main metric of answering at random (POPE F1 of a coin flip is ~0.5; SQA: mean 1 / options)."""
    if task.loader == "sqa":
        opts = [len(s.meta.get("choices", [])) for s in samples]
        return statistics.fmean(1.0 / k for k in opts if k) if opts else None
    if task.loader == "pope":
        return 0.5
    return None


def _sweep_record(result: Any, layer: int | None, rank: str | None = None) -> dict[str, Any] | None:
    for r in result.points:
        if r["layer"] == layer and (rank is None or r["rank"] == rank):
            return r
    return None


def model_id_of(config: DemoConfig) -> str:
    """What ``config.model`` names: the shipped model's folder for ``"demo"``, else the string as given."""
    from flowkern.demo import DEMO_MODEL_NAME, demo_model_path

    return str(demo_model_path()) if config.model == DEMO_MODEL_NAME else str(config.model)


def load(config: DemoConfig) -> tuple[Any, Any]:
    """Load ``config.model`` (:func:`flowkern.hf.loading.load_model`) and check it suits the demo
    (:func:`check_model`).

    Raises:
        FileNotFoundError / ValueError: no such model, an unsupported one, or too few image tokens for ``keep``.
    """
    from flowkern.hf.loading import load_model

    model, processor = load_model(model_id_of(config), device=config.device)
    check_model(config, model, processor)
    return model, processor


def check_model(config: DemoConfig, model: Any, processor: Any) -> int:
    """Check that the model takes a shapes prompt with an image slot and has more than ``keep`` image tokens;
    returns its image-token count.

    Raises:
        ValueError: naming ``--model`` or ``--keep``.
    """
    import torch
    from PIL import Image

    from flowkern.eval import shapes as world
    from flowkern.hf.inputs import build_inputs
    from flowkern.hf.models import get_adapter

    try:
        inputs = build_inputs(processor, model, [Image.new("RGB", (world.CANVAS, world.CANVAS), "white")],
                                    ["Is there a red circle in the image?"])
    except ValueError as exc:
        raise ValueError(f"--model {config.model}: cannot build a shapes prompt: {exc}") from None
    placeholders = torch.tensor(get_adapter(model).placeholder_token_ids(model.config))
    n = int(torch.isin(inputs["input_ids"][0].cpu(), placeholders).sum())
    if not 1 <= config.keep < n:
        raise ValueError(f"--keep {config.keep}: the model sees {n} image tokens per image; expected 1 .. {n - 1}")
    return n


def run_demo(config: DemoConfig, *, model: Any = None, processor: Any = None, progress: bool = True) -> DemoResult:
    """Run the demo and write the report folder (see the module docstring).

    Args:
        config: the options (:class:`DemoConfig`).
        model, processor: the model already loaded by :func:`load` (None: loaded here).
        progress: stage lines and tqdm bars on stderr.

    Returns:
        a :class:`DemoResult`.

    Raises:
        ValueError / FileNotFoundError: a bad option, an output folder that cannot be written, a model that cannot
            be loaded or has too few image tokens for ``keep`` -- all before anything is written.
    """
    import torch

    import flowkern
    from flowkern import _io

    start = time.perf_counter()
    target = check_config(config)
    sizes = config.resolved_sizes()
    model_id = model_id_of(config)
    old_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        if model is None or processor is None:
            model, processor = load(config)
        facts = _model_facts(model, model_id, config.model)
        facts["image_tokens"] = check_model(config, model, processor)
        steps = _Progress(progress, 6)
        info = dict(command="flowkern demo", config=_finite(asdict(replace(config, out=str(target)))),
                    flowkern=flowkern.__version__)
        with _io.AtomicDir(target, info=info) as tmp, tempfile.TemporaryDirectory(prefix="flowkern-demo-") as scratch:
            summary = _run(config, sizes, model, processor, model_id, facts, Path(tmp), Path(scratch), steps,
                           progress)
            summary["timings"] = dict(steps.timings, total=round(time.perf_counter() - start, 2))
            with steps.stage("write", "writing the report"):
                _write(Path(tmp), summary)
            files = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.is_file())
    finally:
        torch.set_num_threads(old_threads)
    return DemoResult(out=target, summary=summary, seconds=time.perf_counter() - start, files=files)


def _run(config: DemoConfig, sizes: DemoSizes, model: Any, processor: Any, model_id: str, facts: dict[str, Any],
         tmp: Path, scratch: Path, steps: _Progress, progress: bool) -> dict[str, Any]:
    """The five analysis stages; figures need the shapes images, so they are drawn here too."""
    from flowkern.demo import report_figures as figs
    from flowkern.demo.quality import MAX_NEW_TOKENS as max_new
    from flowkern.demo.report_words import image_use, standard_error_points
    from flowkern.eval import get_task
    from flowkern.eval import shapes as world

    num_layers = facts["num_layers"]
    tasks: dict[str, dict[str, Any]] = {}
    loaded: dict[str, Any] = {}
    with steps.stage("data", f"drawing the shapes sets (seed {config.seed})"):
        for t in TASKS:
            folder = scratch / t.world
            world.write_task(t.world, folder, seed=config.seed, num=sizes.images[t.world])
            images = folder / "images" if t.loader == "pope" else None
            loaded[t.world] = (get_task(t.loader, folder, images), folder, images)

    attention: dict[str, dict[str, Any]] = {}
    with steps.stage("attention", f"attention shares per layer, {sizes.trace} questions per task (flowkern.trace)"):
        total = sum(min(sizes.trace, len(loaded[t.world][0].samples)) for t in TASKS)
        with steps.bar(total, "trace", "q") as bar:
            for t in TASKS:
                task = loaded[t.world][0]
                attention[t.world] = attention_stage(
                    model, processor, spread(task.samples, sizes.trace), max_new_tokens=max_new[t.loader],
                    batch_size=sizes.batch_size, examples=max(sizes.map_examples, sizes.cam_examples), bar=bar)

    cams: dict[str, list[dict[str, Any]]] = {}
    with steps.stage("cam", f"LLaVA-CAM, {sizes.cam_examples} questions per task ({sizes.cam_samples} noisy copies)"):
        with steps.bar(sizes.cam_examples * len(TASKS), "cam", "q") as bar:
            for t in TASKS:
                picks = [e["sample"] for e in attention[t.world]["examples"][:sizes.cam_examples]]
                cams[t.world] = cam_stage(model, processor, picks, max_new_tokens=max_new[t.loader],
                                          copies=sizes.cam_samples, bar=bar)

    sweeps: dict[str, dict[str, Any]] = {}
    with steps.stage("truncation", f"truncation sweeps over all {num_layers} layers: k = 0, and keep {config.keep} "
                                   "by attention vs random"):
        for t in TASKS:
            task, folder, images = loaded[t.world]
            tol = _tolerance(config, len(task.samples))
            sweeps[t.world] = truncation_stage(
                model, processor, t, model_id=model_id, data=folder, images=images, out=tmp / "sweeps" / t.world,
                keep=config.keep, tolerance=tol, batch_size=sizes.batch_size, max_new_tokens=max_new[t.loader],
                device=config.device, progress=progress)
            sweeps[t.world]["tolerance"] = tol

    for t in TASKS:
        task = loaded[t.world][0]
        k0, kk = sweeps[t.world]["k0"], sweeps[t.world]["keepk"]
        cliff = k0.cliff
        base_rec = _sweep_record(k0, None)
        at = cliff["cliff_layer"]
        at_rec = _sweep_record(k0, at) if at is not None else None
        higher = bool(cliff["higher_is_better"])
        no_image = k0.curve.get(0)
        effect = None if no_image is None else (k0.baseline - no_image) * 100.0 * (1 if higher else -1)
        a = attention[t.world]
        col = a["segment_names"].index("image")
        tasks[t.world] = dict(
            label=t.label, kind=t.kind, loader=t.loader, metric=cliff["metric"], higher_is_better=higher,
            n=len(task.samples), tolerance=sweeps[t.world]["tolerance"], baseline=k0.baseline,
            baseline_metrics=base_rec["metrics"] if base_rec else {}, chance=_chance(t, task.samples),
            curve={str(k): v for k, v in sorted(k0.curve.items())},
            attention_k={str(k): v for k, v in sorted(kk.curve.items())},
            random_k={str(k): v for k, v in sorted(kk.controls.get("random", {}).items())},
            keepk_baseline=kk.baseline,
            cliff_layer=at, no_harm_layer=cliff["no_harm_layer"], monotone=cliff["monotone"], note=cliff["note"],
            keepk_cliff=kk.cliff["cliff_layer"], random_cliff=kk.cliff["controls"].get("random"),
            at_cliff=None if at_rec is None else at_rec["value"],
            at_cliff_metrics=None if at_rec is None else at_rec["metrics"],
            no_image=no_image, image_effect_points=effect,
            se_points=standard_error_points(k0.baseline, len(task.samples)),
            shares=a["shares"].tolist(), image_share=a["shares"][:, col].tolist(), image_sd=a["image_sd"].tolist(),
            traced=a["n"], segment_names=a["segment_names"],
            shapes_command=f"flowkern shapes --task {t.world} --seed {config.seed} --num {sizes.images[t.world]} "
                           f"--out shapes-{t.world}",
            sweep_seconds=round(k0.seconds + kk.seconds, 2),
        )
        tasks[t.world]["image_use"] = image_use(effect, tasks[t.world]["tolerance"], tasks[t.world]["se_points"])

    speed_points = [(t.label, max(1, tasks[t.world]["cliff_layer"]), loaded[t.world][0].samples) for t in TASKS
                    if tasks[t.world]["cliff_layer"] is not None]
    notes = []
    if any(tasks[t.world]["cliff_layer"] == 0 for t in TASKS):
        notes.append("a cliff at L = 0 is timed at L = 1: flowkern.prune removes the image at layer 0 by masking "
                     "(layer 0's cache stays whole, so no speed-up by design), L = 1 is the earliest layer it "
                     "compacts")
    if not speed_points:
        mid = num_layers // 2
        speed_points = [(TASKS[0].label, mid, loaded[TASKS[0].world][0].samples)]
        notes.append(f"no task has a cliff layer; timed at the middle layer L = {mid} for scale")
    speed_note = "; ".join(notes) or None
    runs = len(speed_points) * len(sizes.speed_batches) * 2 * (sizes.speed_repeats + 1)
    with steps.stage("speed", f"speed: pruned at the cliff layer vs unpruned ({runs} timed generate calls)"):
        with steps.bar(runs, "speed", "run") as bar:
            speed = speed_stage(model, processor, speed_points, batches=sizes.speed_batches,
                                new_tokens=sizes.speed_new_tokens, repeats=sizes.speed_repeats, bar=bar)
    cliff_of = {t.label: tasks[t.world]["cliff_layer"] for t in TASKS}
    for r in speed:
        r["cliff_layer"] = cliff_of.get(r["task"])

    import torch

    summary: dict[str, Any] = dict(
        settings=dict(quick=config.sizes is None and config.quick, seed=config.seed, keep=config.keep,
                      tolerance=config.tolerance, tolerance_rule="per task max(1, 100 / n) points"
                      if config.tolerance is None else f"{config.tolerance:g} points for every task",
                      threads=torch.get_num_threads(), device=config.device, sizes=_finite(asdict(sizes)),
                      max_new_tokens={t.world: max_new[t.loader] for t in TASKS}),
        environment=dict(flowkern=_version(), torch=torch.__version__, python=platform.python_version(),
                         machine=platform.machine(), cpu_count=os.cpu_count(), platform=platform.platform(),
                         load_average=_load_average(), created=time.strftime("%Y-%m-%d %H:%M:%S")),
        model=facts, tasks=tasks, speed=speed, speed_note=speed_note,
    )
    from flowkern.demo.report_words import conclusions, headline

    summary["examples"] = {t.world: _examples(t, attention[t.world]["examples"], cams[t.world]) for t in TASKS}
    summary["headline"] = headline(summary)
    summary["conclusions"] = conclusions(summary)
    summary["figures"] = _figures(tmp, summary, attention, cams, figs)
    return _finite(summary)


def _examples(task: DemoTask, shown: Sequence[Mapping[str, Any]],
              cams: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """JSON records of the drawn examples: question, answer, reference, per-layer image share, the attention maps
    and (where computed) the LLaVA-CAM maps and peaks."""
    out = []
    for i, e in enumerate(shown):
        s = e["sample"]
        rec: dict[str, Any] = dict(id=s.id, image=Path(str(s.image)).name, question=_question(s, task),
                                   answer=e["answer"], reference=_reference(s, task), image_share=e["image_share"],
                                   attention_maps=[m.tolist() for m in e["maps"]])
        if i < len(cams):
            c = cams[i]
            rec.update(cam_answer=c["answer"], cam_error=c["error"], cam_peaks=[list(p) for p in c["peaks"]],
                       cam_maps=None if c["heatmaps"] is None else c["heatmaps"].tolist())
        out.append(rec)
    return out


def _version() -> str:
    import flowkern

    return flowkern.__version__


def _load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


# ----------------------------------------------------------------------------------------------------------
# figures and tables


def _figures(tmp: Path, summary: dict[str, Any], attention: Mapping[str, dict[str, Any]],
             cams: Mapping[str, list[dict[str, Any]]], figs: Any) -> list[dict[str, Any]]:
    """Draw every figure into ``tmp/figures``; returns their records (``id``, ``file``, ``title``, ``section``,
    ``caption``) for the report."""
    from flowkern import viz

    fdir = tmp / "figures"
    fdir.mkdir(parents=True, exist_ok=True)
    tasks = summary["tasks"]
    labels = {t.world: t.label for t in TASKS}
    num_layers = summary["model"]["num_layers"]
    out: list[dict[str, Any]] = []

    def add(fid: str, section: str, title: str, caption: str, half: bool = False) -> None:
        out.append(dict(id=fid, file=f"figures/{fid}.png", section=section, title=title, caption=caption,
                        half=half))

    names = attention[TASKS[0].world]["segment_names"]
    figs.shares_by_task({labels[w]: a["shares"] for w, a in attention.items()}, names, fdir / "attention_shares.png",
                        counts={labels[w]: a["n"] for w, a in attention.items()})
    add("attention_shares", "attention", "Attention share of the answer per layer, by task (Figure 2A analogue)",
        "Each panel: the mean over the task's traced questions of the share of the answer's attention (head mean, "
        "every answer row) that falls on the system prompt, the image tokens, the user's question and the tokens "
        "generated so far, per decoder layer.")
    figs.image_share_by_task({labels[w]: a["shares"][:, names.index("image")] for w, a in attention.items()},
                             fdir / "image_share.png",
                             spread={labels[w]: a["image_sd"] for w, a in attention.items()})
    add("image_share", "attention", "Image share per layer, tasks overlaid",
        "The image column of the panels above, one line per task; the band is one standard deviation over the "
        "questions.")
    cols = [f"layer {i}" for i in range(num_layers)]
    for t in TASKS:
        ex = attention[t.world]["examples"][:summary["settings"]["sizes"]["map_examples"]]
        if ex:
            imgs = [_open_rgb(e["sample"].image) for e in ex]
            rows = [f"Q: {_question(e['sample'], t)}  |  model: {e['answer'] or '(empty)'}" for e in ex]
            figs.example_grid(imgs, [e["maps"] for e in ex], rows, cols, fdir / f"attention_maps_{t.world}.png",
                              suptitle=f"{t.label}: the answer's attention to each image token, per layer "
                                       "(each map scaled to its own maximum)")
            add(f"attention_maps_{t.world}", "maps", f"{t.label}: answer -> image attention maps (Figure 2B analogue)",
                "One row per question, one column per decoder layer: the attention each image token receives from "
                "the answer rows (head mean, averaged over the answer's tokens), over the image; each map is "
                "scaled to its own maximum, so compare where, not how much (the image share above says how much).")
        done = [c for c in cams[t.world] if c["heatmaps"] is not None]
        if done:
            imgs = [_open_rgb(c["sample"].image) for c in done]
            rows = [f"Q: {_question(c['sample'], t)}  |  model: {c['answer']}" for c in done]
            figs.example_grid(imgs, [list(c["heatmaps"]) for c in done], rows, cols, fdir / f"cam_{t.world}.png",
                              normalize=None, suptitle=f"{t.label}: LLaVA-CAM per layer")
            add(f"cam_{t.world}", "cam", f"{t.label}: LLaVA-CAM grid (Figures 3/4 analogue)",
                "One row per question, one column per decoder layer: LLaVA-CAM of the model's own answer "
                "(gradient-weighted image-token features after each layer's post-attention norm, SmoothGrad over "
                f"{summary['settings']['sizes']['cam_samples']} noisy copies, max-normalised per layer). The last "
                "layer's map is always 0: after its attention the image tokens cannot reach the answer.")
    for t in TASKS:
        s = tasks[t.world]
        curve = {int(k): v for k, v in s["curve"].items()}
        k = summary["settings"]["keep"]
        controls = {f"attention top-{k}": {int(x): v for x, v in s["attention_k"].items()},
                    f"random {k}": {int(x): v for x, v in s["random_k"].items()}}
        viz.plot_sweep(curve, s["baseline"], controls=controls, cliff=s["cliff_layer"],
                       tolerance=round(s["tolerance"], 2), metric=s["metric"],
                       title=f"{t.label} (n = {s['n']}): image dropped from layer L on",
                       path=fdir / f"truncation_{t.world}.png")
        add(f"truncation_{t.world}", "truncation", f"{t.label}: truncation sweep (Figure 5 analogue)",
            f"{s['metric']} with every image token dropped from decoder layer L on (k = 0, blue), and with "
            f"{summary['settings']['keep']} image tokens kept, chosen by attention or at random (dashed); the grey "
            f"band is the baseline \u00b1 {s['tolerance']:.3g} points, the red arrow the cliff layer.", half=True)
    figs.truncation_deltas({labels[w]: {int(k): v for k, v in s["curve"].items()} for w, s in tasks.items()},
                           {labels[w]: s["baseline"] for w, s in tasks.items()},
                           {labels[w]: s["higher_is_better"] for w, s in tasks.items()}, fdir / "truncation_all.png",
                           cliffs={labels[w]: s["cliff_layer"] for w, s in tasks.items()},
                           tolerances={labels[w]: s["tolerance"] for w, s in tasks.items()})
    add("truncation_all", "truncation", "All tasks: change from the baseline when the image is dropped from layer L on",
        "k = 0 curves of the four sweeps as the change from each baseline in points, signed so that below 0 is "
        "worse (CHAIR_S, lower is better, is flipped); stars mark the cliff layers.")
    if summary["speed"]:
        figs.speed_bars(summary["speed"], fdir / "speed.png")
        add("speed", "speed", "Speed: pruned at the cliff layer vs unpruned",
            "Median prefill time and decode speed over the timed runs of each row (same prompts, same run).")
    return out


def _open_rgb(path: Any) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _csv(rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for r in rows:
        w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in r])
    return buf.getvalue()


def tables(summary: Mapping[str, Any]) -> dict[str, list[list[Any]]]:
    """The report's tables as rows (the first row is the header): ``shares``, ``truncation``, ``cliff``,
    ``table1``, ``speed``; each is written as ``tables/<name>.csv`` and ``.json``."""
    tasks = summary["tasks"]
    keep = summary["settings"]["keep"]
    out: dict[str, list[list[Any]]] = {}
    names = next(iter(tasks.values()))["segment_names"]
    rows: list[list[Any]] = [["task", "layer", *names, "image_sd", "questions"]]
    for s in tasks.values():
        for layer, (row, sd) in enumerate(zip(s["shares"], s["image_sd"], strict=True)):
            rows.append([s["label"], layer, *row, sd, s["traced"]])
    out["shares"] = rows
    rows = [["task", "series", "layer", "keep", "rank", "metric", "value", "delta_points", "within_tolerance"]]
    for s in tasks.values():
        rows.append([s["label"], "baseline", None, None, None, s["metric"], s["baseline"], 0.0, True])
        for series, key, k, rank in (("k=0", "curve", 0, None), (f"attention, keep {keep}", "attention_k", keep,
                                                                  "attention"),
                                     (f"random, keep {keep}", "random_k", keep, "random")):
            for layer, v in s[key].items():
                delta = (v - s["baseline"]) * 100.0
                rows.append([s["label"], series, int(layer), k, rank, s["metric"], v, delta,
                             abs(delta) <= s["tolerance"] + 1e-9])
    out["truncation"] = rows
    rows = [["task", "metric", "higher_is_better", "n", "tolerance_points", "baseline", "without_image_L0",
             "image_effect_points", "se_points", "image_use", "cliff_layer", "paper_layer", "no_harm_layer", "monotone",
             f"cliff_attention_keep{keep}", f"cliff_random_keep{keep}", "note"]]
    for s in tasks.values():
        rows.append([s["label"], s["metric"], s["higher_is_better"], s["n"], s["tolerance"], s["baseline"],
                     s["no_image"], s["image_effect_points"], s["se_points"], s["image_use"], s["cliff_layer"],
                     None if s["cliff_layer"] is None else s["cliff_layer"] + 1, s["no_harm_layer"], s["monotone"],
                     s["keepk_cliff"], s["random_cliff"], s["note"]])
    out["cliff"] = rows
    out["table1"] = table1_rows(summary)
    rows = [["task", "layer", "batch", "prompt_tokens", "new_tokens", "repeats", "unpruned_prefill_ms",
             "pruned_prefill_ms", "prefill_speedup", "unpruned_decode_tok_s", "pruned_decode_tok_s",
             "decode_speedup"]]
    for r in summary["speed"]:
        rows.append([r["task"], r["layer"], r["batch"], r["prompt_tokens"], r["new_tokens"], r["repeats"],
                     r["unpruned_prefill_ms"], r["pruned_prefill_ms"], r["prefill_speedup"],
                     r["unpruned_decode_tok_s"], r["pruned_decode_tok_s"], r["decode_speedup"]])
    out["speed"] = rows
    return out


def table1_rows(summary: Mapping[str, Any]) -> list[list[Any]]:
    """The paper's Table 1 form: dataset, metric, baseline and the score with the image truncated at the cliff
    layer, in percent (POPE: accuracy and F1; CHAIR: CHAIR_S, lower is better)."""
    rows: list[list[Any]] = [["dataset", "metric", "baseline", "at the cliff layer", "cliff layer L", "n"]]
    for s in summary["tasks"].values():
        keys = [("accuracy", "Acc \u2191"), ("f1", "F1 \u2191")] if s["loader"] == "pope" else \
            [("chair_s", "CHAIR_S \u2193")] if s["loader"] == "chair" else [("accuracy", "Acc \u2191")]
        for key, name in keys:
            base = s["baseline_metrics"].get(key)
            at = None if s["at_cliff_metrics"] is None else s["at_cliff_metrics"].get(key)
            rows.append([s["label"], name, None if base is None else round(100 * base, 2),
                         None if at is None else round(100 * at, 2), s["cliff_layer"], s["n"]])
    return rows


def _write(tmp: Path, summary: dict[str, Any]) -> list[str]:
    """Tables (CSV + JSON), ``summary.json`` and ``report.html`` into ``tmp`` (figures are already there)."""
    from flowkern import _io
    from flowkern.demo.report_html import render

    written = []
    tdir = tmp / "tables"
    for name, rows in tables(summary).items():
        _io.atomic_write_text(tdir / f"{name}.csv", _csv(rows))
        header, body = rows[0], rows[1:]
        _io.atomic_write_json(tdir / f"{name}.json", _finite([dict(zip(header, r, strict=True)) for r in body]))
        written += [f"tables/{name}.csv", f"tables/{name}.json"]
    _io.atomic_write_json(tdir / "examples.json", _finite(summary.get("examples", {})))
    written.append("tables/examples.json")
    summary["tables"] = written
    lean = dict(summary, examples={w: [{k: v for k, v in e.items() if not k.endswith("_maps")} for e in ex]
                                   for w, ex in summary.get("examples", {}).items()})
    _io.atomic_write_json(tmp / SUMMARY_FILE, _finite(lean))
    _io.atomic_write_text(tmp / REPORT_FILE, render(summary, tmp))
    return [*written, SUMMARY_FILE, REPORT_FILE]
