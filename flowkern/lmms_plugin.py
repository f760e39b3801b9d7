"""An lmms-eval model wrapper: run lmms-eval's tasks on any model flowkern loads, optionally with image tokens pruned.

.. code-block:: console

    pip install "flowkern[lmms-eval]"
    lmms-eval --model flowkern --model_args pretrained=llava-hf/llava-1.5-7b-hf,prune_layer=2,keep=0 --tasks pope

``--model flowkern`` is found through the Python entry point group ``lmms_eval.models`` (lmms-eval >= 0.7's plugin
mechanism: the entry point ``flowkern = "flowkern.lmms_plugin:manifest"`` returns a ``ModelManifest`` naming
:class:`FlowkernLMM`). From Python, ``register()`` adds it to lmms-eval's registry without the entry point, or pass
an instance: ``lmms_eval.evaluator.simple_evaluate(model=FlowkernLMM(pretrained=...), tasks=["pope"])``.

Model arguments (``--model_args k=v,...``): ``pretrained`` (a ``save_pretrained`` folder or a cached hub id; never
downloaded), ``prune_layer``, ``keep`` (0, a count, a fraction or ``25%``), ``rank`` (a registered scorer name,
:func:`flowkern.scorers.scorer_names`),
``prune_seed``, ``prune_when`` (prefill|decode), ``prune_schedule`` (multi-stage instead of ``prune_layer`` /
``keep``: ``layer:keep`` stages separated by ``;``, or by ``,`` inside quotes or brackets, which lmms-eval's
``--model_args`` keeps together: ``prune_schedule=2:0.5;8:0.25`` or ``prune_schedule=[2:0.5,8:0.25]``),
``prune_merge`` (true|false): a :class:`flowkern.plan.PruneSpec` for :func:`flowkern.prune`
(:data:`flowkern.plan.PRUNE_OPTIONS`); ``device``, ``dtype``,
``batch_size`` (also lmms-eval's ``--batch_size``), ``max_new_tokens`` (used when a task sets none; default 128).

Prompts: the task's context text goes through the same templating as ``flowkern eval``
(:func:`flowkern.hf.inputs.build_inputs`: the processor's chat template, one image slot per visual), so for
POPE (whose lmms-eval prompt equals LLaVA's) the wrapper's answers are those of ``flowkern eval``. Decoding is greedy
only (a task asking for sampling or beams is refused with a clear error), batched with left padding; ``until``
stop strings cut the answer. ``loglikelihood`` scores a continuation by teacher forcing (with pruning if set).

Offline: with ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` lmms-eval reloads its datasets from the ``datasets``
cache; a run of ``--tasks pope`` so, on the shipped demo model, gives the answers and the accuracy / precision /
recall / F1 of ``flowkern eval --data lmms-lab-encoder/POPE --strict`` (tested; lmms-eval's ``pope_yes_ratio``
counts yes labels, flowkern's ``yes_ratio`` yes answers: ``docs/data.md``).

lmms-eval is an optional dependency: this module imports without it (then :class:`FlowkernLMM` has the same
interface on a plain base class, and ``manifest()`` / ``register()`` raise ``ImportError``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from flowkern.eval.run import generate_answers
from flowkern.hf.inputs import build_inputs, prompt_text
from flowkern.hf.loading import load_model
from flowkern.hf.models import get_adapter
from flowkern.plan import PRUNE_OPTIONS, PruneSpec, parse_keep, parse_schedule
from flowkern.prune import prune

try:  # optional: lmms-eval and its base class
    from lmms_eval.api.model import lmms as _LmmsBase

    HAVE_LMMS_EVAL = True
except ImportError:  # pragma: no cover - depends on the environment
    _LmmsBase = object
    HAVE_LMMS_EVAL = False

__all__ = ["FlowkernLMM", "manifest", "register", "HAVE_LMMS_EVAL", "MODEL_ID"]

MODEL_ID = "flowkern"
_CLASS_PATH = "flowkern.lmms_plugin.FlowkernLMM"


def _require_lmms_eval() -> None:
    if not HAVE_LMMS_EVAL:
        raise ImportError("lmms-eval is not installed: pip install 'flowkern[lmms-eval]' (or pip install lmms-eval)")


def manifest() -> Any:
    """The ``ModelManifest`` of ``--model flowkern`` (the payload of the ``lmms_eval.models`` entry point)."""
    _require_lmms_eval()
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=_CLASS_PATH)


def register(registry: Any = None) -> None:
    """Add ``flowkern`` to lmms-eval's model registry (default: ``lmms_eval.models.MODEL_REGISTRY_V2``), for use
    without the installed entry point."""
    _require_lmms_eval()
    if registry is None:
        import lmms_eval.models as models

        registry = models.MODEL_REGISTRY_V2
        models.AVAILABLE_MODELS.setdefault(MODEL_ID, "FlowkernLMM")
    registry.register_manifest(manifest(), overwrite=True)


class _NoCache:
    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        pass


def _as_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise ValueError(f"flowkern model_args: {name}={value!r}: expected an integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, int):
        return value
    raise ValueError(f"flowkern model_args: {name}={value!r}: expected an integer")


def _as_keep(value: Any) -> int | float:
    if isinstance(value, bool):
        raise ValueError(f"flowkern model_args: keep={value!r}: expected a count or a fraction")
    if isinstance(value, float) and value.is_integer() and value > 1:
        return int(value)
    if isinstance(value, (int, float)):
        value = repr(value)
    try:
        return parse_keep(str(value))
    except ValueError as exc:
        raise ValueError(f"flowkern model_args: keep={value!r}: {exc}") from None


def _as_schedule(value: Any) -> tuple[tuple[int, int | float], ...] | None:
    """``prune_schedule``: None, ``(layer, keep)`` pairs, or text ``2:0.5;8:0.25`` / ``"2:0.5,8:0.25"`` /
    ``[2:0.5,8:0.25]`` (quotes and brackets are what keep commas inside one lmms-eval model argument)."""
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, str):
            return PruneSpec(schedule=value).schedule
        return parse_schedule(value.strip().strip("\"'").strip("[]()").replace(";", ","))
    except ValueError as exc:
        raise ValueError(f"flowkern model_args: prune_schedule={value!r}: {exc}") from None


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"flowkern model_args: {name}={value!r}: expected true or false")


def _settings(spec: PruneSpec, stages: Sequence[tuple[int, int | float]]) -> dict[str, Any]:
    """The whole pruning setting as JSON (:meth:`flowkern.plan.PruneSpec.to_dict`: the scorer with its parameters,
    schedule, merge), its layers as resolved on the model (``stages``: negative layers counted from the end)."""
    from dataclasses import replace

    resolved = replace(spec, layer=stages[0][0]) if spec.schedule is None else replace(spec, schedule=tuple(stages))
    return resolved.to_dict()


class FlowkernLMM(_LmmsBase):
    """lmms-eval model ``flowkern``: a VLM loaded by :func:`flowkern.hf.loading.load_model`, greedy batched answers,
    image tokens optionally pruned (:func:`flowkern.prune`). See the module docstring for the arguments."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        prune_layer: int | None = None,
        keep: int | float | str = 0,
        rank: str = "attention",
        prune_seed: int = 0,
        prune_when: str = "prefill",
        prune_schedule: str | Sequence[Sequence[int | float]] | None = None,
        prune_merge: bool | str = False,
        device: str | None = "auto",
        dtype: str = "auto",
        batch_size: int | str | None = 1,
        max_new_tokens: int = 128,
        max_batch_size: int | None = None,
        model: Any = None,
        processor: Any = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            known = ["pretrained", *PRUNE_OPTIONS.values(), "device", "dtype", "batch_size", "max_new_tokens"]
            raise ValueError(f"flowkern model_args: unknown argument(s) {', '.join(sorted(kwargs))} (known: "
                             f"{', '.join(known)})")
        super().__init__()
        self._process_index, self._world_size = 0, 1  # one process: requests are not sharded
        self.cache_hook = getattr(self, "cache_hook", None) or _NoCache()
        self.task_dict: dict = getattr(self, "task_dict", None) or {}
        self.pretrained = str(pretrained)
        auto = batch_size is None or str(batch_size).startswith("auto")  # lmms-eval's auto batch sizing: 1
        self.batch_size_per_gpu = max(1, _as_int("batch_size", 1 if auto else batch_size))
        self.max_new_tokens = _as_int("max_new_tokens", max_new_tokens)
        if model is None or processor is None:
            model, processor = load_model(self.pretrained, device=device or "auto", dtype=dtype)
        self._model, self._processor = model, processor
        self.pruning = None
        self.prune_spec = PruneSpec(layer=_as_int("prune_layer", prune_layer, allow_none=True), keep=_as_keep(keep),
                                    rank=str(rank), seed=_as_int("prune_seed", prune_seed), when=str(prune_when),
                                    schedule=_as_schedule(prune_schedule),
                                    merge=_as_bool("prune_merge", prune_merge))
        if self.prune_spec.enabled:
            self.pruning = prune(model, self.prune_spec)
        self.prune_settings = None if self.pruning is None else _settings(self.prune_spec, self.pruning.stages)

    # -- what lmms-eval reads -----------------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        return self._model

    @property
    def processor(self) -> Any:
        return self._processor

    @property
    def tokenizer(self) -> Any:
        return getattr(self._processor, "tokenizer", self._processor)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> Any:
        return next(self._model.parameters()).device

    @property
    def rank(self) -> int:
        """lmms-eval's process index (always 0: the wrapper runs as one process); not the pruning ``rank``."""
        return self._process_index

    @property
    def world_size(self) -> int:
        return self._world_size

    # -- requests -----------------------------------------------------------------------------------------------

    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        flat: list = []
        for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return flat

    def _check_visuals(self, visuals: Sequence[Any], task: str, doc_id: Any) -> None:
        from PIL import Image

        if not visuals:
            raise ValueError(f"flowkern: {task} doc {doc_id}: no image; the flowkern model answers image questions")
        if not all(isinstance(v, Image.Image) for v in visuals):
            kinds = sorted({type(v).__name__ for v in visuals})
            raise ValueError(f"flowkern: {task} doc {doc_id}: visuals of type {', '.join(kinds)}; only images")

    @staticmethod
    def _greedy_settings(gen_kwargs: dict, default_new: int) -> tuple[int, tuple[str, ...]]:
        gen = dict(gen_kwargs or {})
        if gen.get("do_sample") or float(gen.get("temperature") or 0) > 0:
            raise ValueError(f"flowkern: the task asks for sampling ({gen}); the flowkern model decodes greedily only")
        if int(gen.get("num_beams") or 1) != 1:
            raise ValueError(f"flowkern: the task asks for beam search ({gen}); the flowkern model is greedy only")
        until = gen.get("until") or ()
        if isinstance(until, str):
            until = (until,)
        return int(gen.get("max_new_tokens") or default_new), tuple(u for u in until if u)

    def generate_until(self, requests: list) -> list[str]:
        """Greedy answers; ``requests[i].args == (context, gen_kwargs, doc_to_visual, doc_id, task, split)``."""
        from tqdm.auto import tqdm

        items = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            new, until = self._greedy_settings(gen_kwargs, self.max_new_tokens)
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            self._check_visuals(visuals, task, doc_id)
            items.append((i, context, visuals, new, until, gen_kwargs))
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list] = {}
        for item in items:
            groups.setdefault((item[3], item[4]), []).append(item)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="flowkern responding", unit="q")
        for (new, until), group in groups.items():
            for start in range(0, len(group), self.batch_size):
                batch = group[start: start + self.batch_size]
                texts = generate_answers(self._model, self._processor, [b[2] for b in batch], [b[1] for b in batch],
                                         max_new_tokens=new, pruning=self.pruning)
                for (i, context, _, _, _, gen_kwargs), text in zip(batch, texts, strict=True):
                    for stop in until:
                        text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(len(batch))
        bar.close()
        return [r if r is not None else "" for r in results]

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        """``(log P(continuation | context, image), is_greedy)`` per request;
        ``args == (context, doc_to_target, doc_to_visual, doc_id, task, split)``."""
        import torch

        out: list[tuple[float, bool]] = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            self._check_visuals(visuals, task, doc_id)
            prompt_ids = build_inputs(self._processor, self._model, [visuals], [context])["input_ids"]
            full = self._full_inputs(visuals, context, continuation)
            n = int(full["input_ids"].shape[1] - prompt_ids.shape[1])
            if n < 1 or not torch.equal(full["input_ids"][0, : prompt_ids.shape[1]].cpu(), prompt_ids[0].cpu()):
                raise ValueError(f"flowkern: {task} doc {doc_id}: the continuation {continuation!r} does not tokenize "
                                 f"as a suffix of the prompt")
            ctx = self.pruning if self.pruning is not None else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                logits = self._model(**full, use_cache=False).logits  # pruned: fewer rows; the text tail is intact
            logprobs = torch.log_softmax(logits[0, -(n + 1): -1].float(), dim=-1)
            targets = full["input_ids"][0, -n:].to(logprobs.device)
            total = float(logprobs.gather(1, targets[:, None]).sum())
            out.append((total, bool((logprobs.argmax(dim=-1) == targets).all())))
        return out

    def _full_inputs(self, visuals: Sequence[Any], context: str, continuation: str) -> Any:
        """Processor inputs of the templated prompt followed by ``continuation``."""
        text = prompt_text(self._processor, get_adapter(self._model).family, context, len(visuals)) + continuation
        inputs = self._processor(images=list(visuals), text=[text], return_tensors="pt")
        param = next(self._model.parameters())
        return inputs.to(device=param.device, dtype=param.dtype)

    def generate_until_multi_round(self, requests: list) -> list[str]:
        """Not supported (single-turn tasks only)."""
        raise NotImplementedError("flowkern: multi-round generation is not supported")
