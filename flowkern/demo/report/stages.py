"""The measuring stages of ``flowkern demo`` and the records they produce.

Each stage runs the model on shapes samples and returns a typed result: :func:`attention_stage`
(:func:`flowkern.trace`, Figure 2A/2B) -> :class:`AttentionResult`; :func:`cam_stage` (:func:`flowkern.cam`,
Figures 3/4) -> :class:`CamResult` per sample; :func:`truncation_stage` (:func:`flowkern.eval.sweep.run_sweep`,
Figure 5 / Table 1) -> :class:`TruncationResult`; :func:`speed_stage` (:class:`flowkern.timer.ForwardTimer`) ->
:class:`flowkern.demo.report.records.SpeedRow` rows. :func:`task_result` and :func:`example_records` turn them into
the report's records. :func:`load` and :func:`check_model` load and check the model.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowkern.demo.report.config import DemoConfig, DemoTask
from flowkern.demo.report.flow import flow_record, guided_heads
from flowkern.demo.report.records import Example, ExampleCam, ModelFacts, SpeedRow, TaskResult
from flowkern.demo.report.words import image_use, standard_error_points

__all__ = ["TracedExample", "AttentionResult", "CamResult", "TruncationResult", "attention_stage", "cam_stage",
           "truncation_stage", "speed_stage", "chance", "task_result", "example_records", "question_text",
           "reference_text", "spread", "model_id_of", "load", "check_model", "model_facts"]


@dataclass(frozen=True)
class TracedExample:
    """A traced question kept for the figures: the ``sample``, its greedy ``answer``, ``maps`` (one ``[gh, gw]``
    answer -> image map per layer, averaged over the answer rows) and ``image_share`` per layer; ``lens_maps``: per
    layer the logit lens's top-1 token id of each image token on the grid (-1: no token), ``words`` their words."""

    sample: Any
    answer: str
    maps: Sequence[Any]
    image_share: Sequence[float]
    lens_maps: Sequence[Any] = ()
    words: Mapping[int, str] | None = None


@dataclass(frozen=True)
class AttentionResult:
    """What :func:`attention_stage` measured.

    Attributes:
        shares: float ``[num_layers, 4]``: mean over questions of each question's share (valid answer rows only).
        image_sd: ``[num_layers]``: standard deviation of the image share over the questions.
        per_question: ``[n, num_layers, 4]``.
        segment_names: the share columns; n: questions traced; image_tokens: image tokens of the first prompt.
        examples: the first questions, kept for the figures.
        answer_prob, answer_top1: ``[n, num_layers]``: the logit lens at the last prompt position: probability of
            the question's first answer token, and whether it is the lens's top-1 (:func:`flowkern.lens`).
        head_image: ``[n, num_layers, heads]``: image share of the answer's attention per head.
        segment_flow: ``[n, num_layers, 4, 4]``: each question's segment x segment flow (NaN: no row).
    """

    shares: Any
    image_sd: Any
    per_question: Any
    segment_names: Sequence[str]
    n: int
    examples: Sequence[TracedExample]
    image_tokens: int
    answer_prob: Any = None
    answer_top1: Any = None
    head_image: Any = None
    segment_flow: Any = None


@dataclass(frozen=True)
class CamResult:
    """LLaVA-CAM of one sample: ``answer``, ``heatmaps`` float ``[num_layers, gh, gw]`` in [0, 1] and ``peaks``
    ``(layer, row, col, value)``, or ``error`` (and no heatmaps) when there was nothing to explain."""

    sample: Any
    answer: str
    heatmaps: Any
    peaks: Sequence[Sequence[Any]]
    error: str | None


@dataclass(frozen=True)
class TruncationResult:
    """A task's two :class:`flowkern.eval.sweep.SweepResult`: ``k0`` (every image token dropped) and ``keepk``
    (``keep`` tokens by attention, random control), swept at ``tolerance`` points."""

    k0: Any
    keepk: Any
    tolerance: float


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


def question_text(sample: Any, task: DemoTask) -> str:
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


def reference_text(sample: Any, task: DemoTask) -> str:
    """The reference answer as a person would read it (SQA's letter with its option, CHAIR's objects)."""
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


def _image_token_count(model: Any, inputs: Any) -> int:
    import torch

    from flowkern.hf.models import get_adapter

    placeholders = torch.tensor(get_adapter(model).placeholder_token_ids(model.config))
    return int(torch.isin(inputs["input_ids"][0].cpu(), placeholders).sum())


# ----------------------------------------------------------------------------------------------------------
# the stages


def attention_stage(model: Any, processor: Any, samples: Sequence[Any], *, max_new_tokens: int, batch_size: int,
                    examples: int, bar: Any = None) -> AttentionResult:
    """Figure 2A/2B: answer ``samples`` greedily under :func:`flowkern.trace` (with per-head shares and the
    segment x segment flow), batch by batch, then read each prompt once more under :func:`flowkern.lens` (the last
    position for the answer token; the image tokens of the examples); the first ``examples`` questions are kept with
    their answer -> image maps and image lens maps (:class:`AttentionResult`)."""
    import numpy as np
    import torch

    from flowkern.hf.inputs import build_inputs
    from flowkern.trace import trace

    per_question: list[Any] = []
    shown: list[TracedExample] = []
    names: list[str] = []
    flows: dict[str, list[Any]] = {"answer_prob": [], "answer_top1": [], "head_image": [], "segment_flow": []}
    image_tokens = 0
    for chunk in _chunks(samples, batch_size):
        inputs = build_inputs(processor, model, [s.image for s in chunk], [s.prompt for s in chunk])
        if not image_tokens:
            image_tokens = _image_token_count(model, inputs)
        with torch.inference_mode(), trace(model, image_inputs=inputs, per_head=True, segment_flow=True) as flow:
            sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=_pad_id(processor))
        prompt_len = inputs["input_ids"].shape[1]
        answers = _decode(processor, sequences[:, prompt_len:].cpu())
        lens_last, lens_image = _lens(model, inputs, sequences[:, prompt_len], image=len(shown) < examples)
        names = list(flow.segment_names)
        col = names.index("image")
        ss = flow.sample_shares.numpy()  # [L, B, 4]
        heads, seg = flow.sample_head_shares[..., col].numpy(), flow.sample_segment_flow.numpy()  # [L, B, H], [L, B..]
        first = sequences[:, prompt_len].cpu()
        for b, sample in enumerate(chunk):
            per_question.append(ss[:, b])
            flows["answer_prob"].append(lens_last.token_probs[:, b, 0, 0].numpy())
            flows["answer_top1"].append((lens_last.top_ids[:, b, 0, 0] == first[b]).numpy())
            flows["head_image"].append(heads[:, b])
            flows["segment_flow"].append(seg[:, b])
            if len(shown) < examples:
                maps = [flow.image_attention(layer, sample=b).numpy() for layer in range(ss.shape[0])]
                lens_maps = [lens_image.image_map(layer, sample=b).numpy() for layer in range(ss.shape[0])]
                ids = sorted({int(v) for m in lens_maps for v in m.ravel() if v >= 0})
                words = dict(zip(ids, _tokens(processor, ids), strict=True))
                shown.append(TracedExample(sample, answers[b], maps, ss[:, b, col].tolist(), lens_maps, words))
        if bar is not None:
            bar.update(len(chunk))
    stack = np.stack(per_question)  # [n, L, 4]
    return AttentionResult(shares=stack.mean(axis=0), image_sd=stack[:, :, names.index("image")].std(axis=0),
                           per_question=stack, segment_names=names, n=len(per_question), examples=shown,
                           image_tokens=image_tokens, **{k: np.stack(v) for k, v in flows.items()})


def _tokens(processor: Any, ids: Sequence[int]) -> list[str]:
    tok = getattr(processor, "tokenizer", processor)
    return [str(t) for t in tok.convert_ids_to_tokens(list(ids))]


def _lens(model: Any, inputs: Any, answer: Any, *, image: bool) -> tuple[Any, Any]:
    """One prompt forward under two logit lenses: the last prompt position (top-1 and the probability of each
    sample's first answer token ``answer [B]``) and, when ``image``, every image token (top-1)."""
    import torch

    from flowkern.lens import lens

    with contextlib.ExitStack() as stack, torch.inference_mode():
        last = stack.enter_context(lens(model, positions="last", top_k=1, token_ids=answer[:, None]))
        grid = stack.enter_context(lens(model, positions="image", top_k=1, image_inputs=inputs)) if image else None
        model(**inputs)
    return last, grid


def cam_stage(model: Any, processor: Any, samples: Sequence[Any], *, max_new_tokens: int, copies: int,
              bar: Any = None) -> list[CamResult]:
    """Figures 3/4: :func:`flowkern.cam` of each sample (its own greedy answer, every layer, SmoothGrad over
    ``copies`` noisy copies, noise std 0.1, maps max-normalised per layer); one :class:`CamResult` per sample."""
    from flowkern.cam import cam
    from flowkern.hf.inputs import build_inputs

    out = []
    for sample in samples:
        inputs = build_inputs(processor, model, [sample.image], [sample.prompt])
        try:
            result = cam(model, inputs, processor=processor, samples=copies, noise_std=0.1,
                                  batch_size=copies, max_new_tokens=max_new_tokens, seed=0)
        except ValueError as exc:  # e.g. the model answers nothing but an end-of-sequence token
            out.append(CamResult(sample=sample, answer="", heatmaps=None, peaks=[], error=str(exc)))
        else:
            answer = _decode(processor, result.answer_ids.view(1, -1).cpu())[0]
            out.append(CamResult(sample=sample, answer=answer, heatmaps=result.heatmaps.numpy(),
                                 peaks=result.peaks(), error=None))
        if bar is not None:
            bar.update(1)
    return out


def truncation_stage(model: Any, processor: Any, task: DemoTask, *, model_id: str, data: Path,
                     images: Path | None, out: Path, keep: int, tolerance: float, batch_size: int,
                     max_new_tokens: int, device: str, progress: bool) -> TruncationResult:
    """Figure 5 / Table 1: :func:`flowkern.eval.sweep.run_sweep` over every layer at k = 0 into ``out``, and at
    ``keep`` tokens ranked by attention with the random control into ``out-keep<K>``."""
    from flowkern.eval.sweep import SweepConfig, run_sweep
    from flowkern.plan import PruneSpec

    common = dict(model=model_id, task=task.loader, data=data, images=images, layers="all", batch_size=batch_size,
                  max_new_tokens=max_new_tokens, tolerance=tolerance, device=device)
    k0 = run_sweep(SweepConfig(out=out, **common), model=model, processor=processor, progress=progress)
    keepk = run_sweep(SweepConfig(out=out.parent / f"{out.name}-keep{keep}",
                                  prune=PruneSpec(keep=keep, rank="attention"), controls=("random",), **common),
                      model=model, processor=processor,
                      progress=progress)
    return TruncationResult(k0=k0, keepk=keepk, tolerance=tolerance)


def _time_generate(model: Any, inputs: Any, *, layer: int | None, new_tokens: int,
                   pad: int | None) -> tuple[float, float]:
    """One timed greedy ``generate`` (``new_tokens`` forced): (prefill seconds, decode tokens/s)."""
    import torch

    from flowkern.prune import prune
    from flowkern.timer import ForwardTimer

    ctx = prune(model, layer=layer, keep=0) if layer is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx, ForwardTimer(model) as timer:
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=pad)
    tps = timer.decode_tokens_per_second
    return float(timer.prefill_seconds or float("nan")), float(tps if tps is not None else float("nan"))


def speed_stage(model: Any, processor: Any, points: Sequence[tuple[str, int, Sequence[Any]]], *,
                batches: Sequence[int], new_tokens: int, repeats: int, bar: Any = None) -> list[SpeedRow]:
    """Prefill time and decode speed, pruned (k = 0) at a layer vs unpruned (the model's own attention).

    Args:
        points: ``(label, layer, samples)``: the prompts of a task and the layer to prune it at.
        batches: batch sizes (the first ``b`` samples, repeated if there are fewer).
        new_tokens: tokens decoded per run (end-of-sequence suppressed, so every run decodes as many).
        repeats: timed runs per method after one warm-up, unpruned and pruned alternating; medians.

    Returns:
        one :class:`flowkern.demo.report.records.SpeedRow` per (point, batch), ``cliff_layer`` unset.
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
            (pre0, dec0), (pre1, dec1) = ((statistics.median(p for p, _ in v), statistics.median(d for _, d in v))
                                          for v in (times["unpruned"], times["pruned"]))
            rows.append(SpeedRow(
                label=f"{label} L={layer} B={b}", task=label, layer=layer, batch=b,
                prompt_tokens=int(inputs["input_ids"].shape[1]), unpruned_prefill_ms=pre0 * 1e3,
                pruned_prefill_ms=pre1 * 1e3, prefill_speedup=pre0 / pre1, unpruned_decode_tok_s=dec0,
                pruned_decode_tok_s=dec1, decode_speedup=dec1 / dec0, repeats=repeats, new_tokens=new_tokens))
    return rows


# ----------------------------------------------------------------------------------------------------------
# records from the stages


def chance(task: DemoTask, samples: Sequence[Any]) -> float | None:
    """The main metric of answering at random (POPE F1 of a coin flip is ~0.5; SQA: mean 1 / options)."""
    if task.loader == "sqa":
        opts = [len(s.meta.get("choices", [])) for s in samples]
        return statistics.fmean(1.0 / k for k in opts if k) if opts else None
    if task.loader == "pope":
        return 0.5
    return None


def _point(result: Any, layer: int | None) -> dict[str, Any] | None:
    """The sweep point at ``layer`` (None: the baseline)."""
    return next((r for r in result.points if r["layer"] == layer), None)


def task_result(task: DemoTask, samples: Sequence[Any], truncation: TruncationResult, attention: AttentionResult,
                *, shapes_command: str) -> TaskResult:
    """A task's record from its sweeps and traces (``samples``: the task's whole set)."""
    k0, kk = truncation.k0, truncation.keepk
    cliff = k0.cliff
    base = _point(k0, None)
    at = cliff["cliff_layer"]
    at_point = _point(k0, at) if at is not None else None
    higher = bool(cliff["higher_is_better"])
    no_image = k0.curve.get(0)
    effect = None if no_image is None else (k0.baseline - no_image) * 100.0 * (1 if higher else -1)
    col = attention.segment_names.index("image")
    se = standard_error_points(k0.baseline, len(samples))
    return TaskResult(
        label=task.label, kind=task.kind, loader=task.loader, metric=cliff["metric"], higher_is_better=higher,
        n=len(samples), tolerance=truncation.tolerance, baseline=k0.baseline,
        baseline_metrics=base["metrics"] if base else {}, chance=chance(task, samples),
        curve=dict(sorted(k0.curve.items())), attention_k=dict(sorted(kk.curve.items())),
        random_k=dict(sorted(kk.controls.get("random", {}).items())), keepk_baseline=kk.baseline,
        cliff_layer=at, no_harm_layer=cliff["no_harm_layer"], monotone=cliff["monotone"], note=cliff["note"],
        keepk_cliff=kk.cliff["cliff_layer"], random_cliff=kk.cliff["controls"].get("random"),
        at_cliff=None if at_point is None else at_point["value"],
        at_cliff_metrics=None if at_point is None else at_point["metrics"],
        no_image=no_image, image_effect_points=effect, se_points=se,
        shares=attention.shares.tolist(), image_share=attention.shares[:, col].tolist(),
        image_sd=attention.image_sd.tolist(), traced=attention.n, segment_names=list(attention.segment_names),
        shapes_command=shapes_command, sweep_seconds=round(k0.seconds + kk.seconds, 2),
        image_use=image_use(effect, truncation.tolerance, se),
        flow=None if attention.answer_prob is None else flow_record(
            attention.answer_prob, attention.answer_top1, attention.head_image, attention.segment_flow))


def example_records(task: DemoTask, shown: Sequence[TracedExample], cams: Sequence[CamResult]) -> list[Example]:
    """The drawn examples as records: question, answer, reference, per-layer image share, the attention maps and
    (where computed) the LLaVA-CAM maps and peaks."""
    out = []
    for i, e in enumerate(shown):
        s = e.sample
        cam = None
        if i < len(cams):
            c = cams[i]
            cam = ExampleCam(answer=c.answer, error=c.error, peaks=[list(p) for p in c.peaks],
                             maps=None if c.heatmaps is None else c.heatmaps.tolist())
        out.append(Example(id=s.id, image=Path(str(s.image)).name, question=question_text(s, task), answer=e.answer,
                           reference=reference_text(s, task), image_share=e.image_share,
                           attention_maps=[m.tolist() for m in e.maps], cam=cam))
    return out


# ----------------------------------------------------------------------------------------------------------
# the model


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
    from PIL import Image

    from flowkern import shapes as world
    from flowkern.hf.inputs import build_inputs
    from flowkern.plan import check_keep

    try:
        inputs = build_inputs(processor, model, [Image.new("RGB", (world.CANVAS, world.CANVAS), "white")],
                                    ["Is there a red circle in the image?"])
    except ValueError as exc:
        raise ValueError(f"--model {config.model}: cannot build a shapes prompt: {exc}") from None
    n = _image_token_count(model, inputs)
    check_keep(config.keep, n)  # the check `sweep --keep` makes (keep >= 1 is the demo's own, in check_config)
    return n


def model_facts(model: Any, model_id: str, name: str, image_tokens: int) -> ModelFacts:
    """The model's record: ``name`` as given to ``--model``, its folder, type, sizes and image tokens."""
    from flowkern.hf.models import get_adapter

    text = get_adapter(model).text_config(model.config)
    layers, heads = int(text.num_hidden_layers), int(getattr(text, "num_attention_heads", 0))
    return ModelFacts(name=name, path=model_id, model_type=str(getattr(model.config, "model_type", "")),
                      num_layers=layers, hidden_size=int(getattr(text, "hidden_size", 0)),
                      parameters=int(sum(p.numel() for p in model.parameters())), image_tokens=image_tokens,
                      num_heads=heads, guided_heads=guided_heads(model_id, layers, heads))
