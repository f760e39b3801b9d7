"""Pruning policy for :mod:`flowkern.prune`, as pure functions: the setting (:class:`PruneSpec`), how many image
tokens to keep, and what is always kept besides the tokens a scorer chooses (:mod:`flowkern.scorers`). Tensors in,
tensors out: no model, no hooks, no transformers (``tests/analysis/test_plan.py``
checks every function on hand-made inputs). What the pruned layers then hold (key maps) is
:mod:`flowkern.keymaps`.

The plan's answer is ``keep_real``, bool ``[B, S]``: the prompt positions a pruned layer keeps (text tokens, kept
image tokens, each row's last position), False for padding.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = [
    "RANKS",
    "WHENS",
    "PruneSpec",
    "PRUNE_OPTIONS",
    "parse_keep",
    "parse_schedule",
    "check_keep",
    "num_to_keep",
    "prompt_keep",
    "is_continuation",
]

RANKS = ("attention", "random", "none", "grid")
"""The ``rank`` values of :func:`flowkern.prune`."""

WHENS = ("prefill", "decode")
"""The ``when`` values of :func:`flowkern.prune`."""

PRUNE_OPTIONS: dict[str, str] = {"layer": "prune_layer", "keep": "keep", "rank": "rank", "seed": "prune_seed",
                                 "when": "prune_when", "schedule": "prune_schedule", "merge": "prune_merge"}
""":class:`PruneSpec` field -> its name where pruning settings sit flat among other options: the CLI's
``--prune-layer --keep --rank --prune-seed --prune-when --prune-schedule --prune-merge`` (``"--" + name`` with ``-``
for ``_``), the lmms-eval
plugin's ``model_args`` and the ``settings`` of an eval folder's ``run.json``."""


# ----------------------------------------------------------------------------------------------------------
# arguments


@dataclass(frozen=True)
class PruneSpec:
    """One pruning setting of :func:`flowkern.prune`, independent of any model: from decoder layer ``layer`` on,
    keep ``keep`` image tokens per sample chosen by ``rank``. ``layer=None`` means no pruning (the other fields
    then describe what a sweep applies at each of its layers). A multi-stage setting gives ``schedule`` instead of
    ``layer`` / ``keep``: each stage keeps, among the image tokens that survived the earlier stages, the best
    ``keep`` by ``rank``.

    Attributes:
        layer: 0-based decoder layer (negative counts from the end), or None.
        keep: an int = at most that many image tokens per sample (0 drops all), a float = that fraction in [0, 1]
            of the sample's image tokens in the prompt.
        rank: a scorer name (:func:`flowkern.scorers.scorer_names`; :data:`RANKS` are the first four) or a
            :class:`flowkern.scorers.Scorer`. seed: seed of ``rank="random"``. when: one of :data:`WHENS`.
        schedule: None, or the stages ``((layer, keep), ...)``, layers strictly increasing (negative layers count
            from the end and are checked by :meth:`resolve`); ``layer`` must then be None and ``keep`` 0.
        merge: average each removed image token's hidden state into its most similar kept image token at each
            stage (VisionZip / PruMerge-style merging; needs ``keep != 0``).

    ``layer``, ``keep`` and ``seed`` given as numpy or 0-d tensor numbers (``numpy.int64(4)``) are stored as the
    Python ``int`` / ``float`` they hold.

    Raises:
        ValueError: naming the bad field (``keep must be ...``), on construction; also a stage at layer 0 that keeps
            image tokens by a scorer that cannot rank before the decoder (``rank="attention"``).
    """

    layer: int | None = None
    keep: int | float = 0
    rank: str = "attention"
    seed: int = 0
    when: str = "prefill"
    schedule: tuple[tuple[int, int | float], ...] | None = None
    merge: bool = False

    def __post_init__(self) -> None:
        for name in ("layer", "keep", "seed"):  # numpy / torch scalars (np.int64(4)) as the Python numbers they are
            object.__setattr__(self, name, _plain_number(getattr(self, name)))
        _check_rank(self.rank)
        if self.when not in WHENS:
            raise ValueError(f"when must be 'prefill' or 'decode', got {self.when!r}")
        _check_keep_value("keep", self.keep)
        if self.schedule is not None:
            object.__setattr__(self, "schedule", _check_schedule(self.schedule))
            if self.layer is not None or self.keep != 0:
                raise ValueError("schedule: pass either layer / keep (one stage) or a schedule, not both")
        if not isinstance(self.merge, bool):
            raise ValueError(f"merge must be True or False, got {self.merge!r}")
        keeps = [k for _, k in self.stages] or [self.keep]  # no stage (a sweep's setting): its keep
        if self.merge and all(k == 0 for k in keeps):
            raise ValueError("merge: every image token is removed (keep=0), so there is no kept token to merge into")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"layer must be a decoder layer index (an int) or None, got {self.layer!r}")
        for layer, keep in self.stages:  # layer 0 as given (a negative one is checked by resolve_stages)
            if layer == 0:
                _check_before_decoder(self.rank, keep)

    @property
    def enabled(self) -> bool:
        """Whether this setting prunes (``layer`` or ``schedule`` is not None)."""
        return self.layer is not None or self.schedule is not None

    @property
    def stages(self) -> tuple[tuple[int, int | float], ...]:
        """The stages ``((layer, keep), ...)``: the ``schedule``, or the one stage ``((layer, keep),)`` (none when
        ``layer`` is None)."""
        if self.schedule is not None:
            return self.schedule
        return () if self.layer is None else ((self.layer, self.keep),)

    def resolve(self, num_layers: int, deepstack: int = 0, family: str = "model") -> int | None:
        """The first pruned layer in ``[0, num_layers)`` (``layer``, or the schedule's first stage; None when
        pruning is off) after the checks that depend on the model (:meth:`resolve_stages`)."""
        stages = self.resolve_stages(num_layers, deepstack, family)
        return stages[0][0] if stages else None

    def resolve_stages(self, num_layers: int, deepstack: int = 0,
                       family: str = "model") -> tuple[tuple[int, int | float], ...]:
        """The stages ``((layer, keep), ...)`` with layers in ``[0, num_layers)`` (negative ones counted from the
        end), after the checks that depend on the model.

        Args:
            num_layers: the model's decoder layers.
            deepstack: decoder layers after which the vision tower still adds image features (Qwen3-VL's DeepStack).
            family: the model family, for the messages.

        Raises:
            ValueError: naming the bad argument. NotImplementedError: pruning before the DeepStack layers end; a
                schedule with ``when="decode"``.
        """
        if self.schedule is not None and self.when == "decode":
            raise NotImplementedError("schedule: when='decode' (compacting the cache after a full prefill) takes one "
                                      "stage; a schedule prunes at the prefill (when='prefill')")
        stages = []
        for layer, keep in self.stages:
            what = "layer" if self.schedule is None else "schedule layer"
            if not -num_layers <= layer < num_layers:
                raise ValueError(f"{what} must be a decoder layer index in [0, {num_layers}) (negative counts from "
                                 f"the end), got {layer!r}")
            layer %= num_layers
            if layer == 0:
                _check_before_decoder(self.rank, keep)
            if layer == 0 and self.when == "decode":
                raise ValueError("when='decode' compacts the cache of layers >= 1: use layer >= 1")
            if deepstack and self.when == "prefill" and layer < deepstack:
                where = "before the decoder" if layer == 0 else f"at layer={layer}"
                raise NotImplementedError(
                    f"{family}: DeepStack adds visual features to the image tokens after decoder layers "
                    f"0..{deepstack - 1}; pruning {where} would have to remove the removed tokens' DeepStack "
                    f"features too, which is not supported: use layer >= {deepstack}"
                )
            stages.append((layer, keep))
        return tuple(stages)

    def to_dict(self, *, options: bool = False) -> dict[str, Any]:
        """The fields as a JSON-ready dict, keyed by field name, or by :data:`PRUNE_OPTIONS` with ``options``
        (``rank`` as :func:`flowkern.scorers.scorer_to_json`, ``schedule`` as a list of ``[layer, keep]``)."""
        from flowkern.scorers import scorer_to_json

        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "rank":
                value = scorer_to_json(value)
            elif f.name == "schedule" and value is not None:
                value = [list(stage) for stage in value]
            out[PRUNE_OPTIONS[f.name] if options else f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, options: bool = False) -> PruneSpec:
        """The inverse of :meth:`to_dict` (same ``options``); a missing key takes the field's default.

        Raises:
            ValueError: a key that names no field, or a bad value (naming the field).
        """
        names = {PRUNE_OPTIONS[f.name] if options else f.name: f.name for f in fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"PruneSpec has no field {', '.join(map(repr, unknown))} (known: {', '.join(names)})")
        values = {names[k]: v for k, v in data.items()}
        if isinstance(values.get("rank"), dict):
            from flowkern.scorers import scorer_from_json

            values["rank"] = scorer_from_json(values["rank"])
        return cls(**values)


def _check_rank(rank: Any) -> None:
    """Refuse a ``rank`` that is neither a registered scorer name nor a :class:`flowkern.scorers.Scorer`."""
    from flowkern.scorers import Scorer, scorer_names

    if isinstance(rank, Scorer):
        return
    names = tuple(dict.fromkeys(RANKS + scorer_names()))
    if not isinstance(rank, str) or rank not in names:
        raise ValueError(f"rank must be one of {names} or a flowkern.scorers.Scorer, got {rank!r}")


def _check_before_decoder(rank: Any, keep: int | float) -> None:
    """Refuse a stage before the decoder (layer 0) that keeps image tokens by a scorer that cannot rank there
    (:attr:`flowkern.scorers.Scorer.before_decoder` False: it reads layer ``L-1``'s attention)."""
    from flowkern.scorers import get_scorer

    if keep != 0 and not get_scorer(rank).before_decoder:
        name = getattr(rank, "name", None) or rank
        raise ValueError(f"rank={name!r} ranks image tokens by the attention they receive at layer L-1, so it needs "
                         "layer >= 1; at layer=0 use keep=0 or a scorer that ranks before the decoder (rank='random', "
                         "'none', 'grid', 'diversity', ...)")


def _check_keep_value(name: str, keep: Any) -> None:
    if (isinstance(keep, bool) or not isinstance(keep, int | float)
            or isinstance(keep, float) and not 0.0 <= keep <= 1.0 or isinstance(keep, int) and keep < 0):
        raise ValueError(f"{name} must be an int >= 0 or a float fraction in [0, 1], got {keep!r}")


def _check_schedule(schedule: Any) -> tuple[tuple[int, int | float], ...]:
    """``schedule`` as a tuple of ``(layer, keep)`` pairs (lists and numpy numbers accepted), checked."""
    if isinstance(schedule, str | bytes) or not hasattr(schedule, "__iter__"):
        raise ValueError(f"schedule must be a sequence of (layer, keep) stages, got {schedule!r}")
    stages: list[tuple[int, int | float]] = []
    for i, stage in enumerate(schedule):
        if isinstance(stage, str | bytes) or not hasattr(stage, "__len__") or len(stage) != 2:
            raise ValueError(f"schedule stage {i} must be a (layer, keep) pair, got {stage!r}")
        layer, keep = (_plain_number(v) for v in stage)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"schedule stage {i}: layer must be an int, got {layer!r}")
        _check_keep_value(f"schedule stage {i}: keep", keep)
        stages.append((layer, keep))
    if not stages:
        raise ValueError("schedule must name at least one (layer, keep) stage (or be None)")
    layers = [layer for layer, _ in stages]
    if any(x < 0 for x in layers) and not all(x < 0 for x in layers):
        raise ValueError(f"schedule layers must be all >= 0 or all negative (from the end), got {layers}")
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"schedule layers must be strictly increasing, got {layers}")
    return tuple(stages)


def parse_schedule(text: str) -> tuple[tuple[int, int | float], ...]:
    """A ``schedule`` written as text: ``"2:0.5,8:0.25,16:0.125"`` (``layer:keep`` stages, ``keep`` as in
    :func:`parse_keep`).

    Raises:
        ValueError: anything else (the message quotes ``text``).
    """
    stages = []
    for part in text.split(","):
        layer, sep, keep = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            stages.append((int(layer), parse_keep(keep)))
        except ValueError:
            raise ValueError(f"{text!r}: expected layer:keep stages separated by commas, e.g. 2:0.5,8:0.25") from None
    return _check_schedule(stages)


def _plain_number(value: Any) -> Any:
    """An integral number (``numpy.int64``, a 0-d integer tensor) as an ``int``, another real one as a ``float``;
    anything else (None, bool, text) unchanged, for the field checks to refuse or keep."""
    if value is None or isinstance(value, bool | str) or type(value).__name__ == "bool_":
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() == 0 and value.dtype != torch.bool:
        return int(value) if not value.is_floating_point() else float(value)
    return value


def parse_keep(text: str) -> int | float:
    """A ``keep`` written as text: ``"0"`` / ``"64"`` (image tokens per sample), ``"0.25"`` or ``"25%"`` (a fraction).

    Raises:
        ValueError: anything else (the message quotes ``text``).
    """
    value = text.strip()
    try:
        if value.endswith("%"):
            frac = float(value[:-1]) / 100.0
        elif any(c in value for c in ".eE"):
            frac = float(value)
        else:
            k = int(value)
            if k < 0:
                raise ValueError
            return k
    except ValueError:
        raise ValueError(
            f"{text!r}: expected a count >= 0 (e.g. 0 or 64) or a fraction in [0, 1] (e.g. 0.25 or 25%)"
        ) from None
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"{text!r}: a fraction must be in [0, 1]")
    return frac


def check_keep(keep: int | float, image_tokens: int, *, what: str = "--keep") -> None:
    """Refuse a ``keep`` that keeps every one of the ``image_tokens`` image tokens a prompt has (a pruned run would
    then drop nothing, and a sweep would report a cliff of an unpruned model): an int ``>= image_tokens``, or a
    fraction that rounds to all of them. ``demo --keep`` and ``sweep --keep`` share it.

    Raises:
        ValueError: naming ``what``, the value and the count.
    """
    kept = int(num_to_keep(keep, torch.tensor([int(image_tokens)]))[0])
    if image_tokens > 0 and kept >= image_tokens:
        fraction = f" (a fraction keeps {kept}: all of them)" if isinstance(keep, float) else ""
        raise ValueError(f"{what} {keep}: the model sees {image_tokens} image tokens per image{fraction}, so nothing "
                         f"would be pruned; expected 0 .. {image_tokens - 1} image tokens, or a smaller fraction")


# ----------------------------------------------------------------------------------------------------------
# which image tokens


def num_to_keep(keep: int | float, n_image: torch.Tensor) -> torch.Tensor:
    """Image tokens to keep per sample: long ``[B]`` from the ``keep`` spec (an int = at most that many, a float =
    that fraction, rounded half up) and the image-token counts ``n_image`` ``[B]``."""
    if isinstance(keep, float):
        return torch.floor(n_image.double() * keep + 0.5).long().clamp(max=n_image)
    return n_image.clamp(max=int(keep))


def prompt_keep(image: torch.Tensor, real: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``keep_real`` bool ``[B, S]``: every real text token, the ``chosen`` image tokens, and each row's last position
    (the row that produces the next token); never padding otherwise.

    Args:
        image: bool ``[B, S]`` the (real) image tokens; real: bool ``[B, S]`` (False = padding).
        chosen: bool ``[B, S]`` the image tokens a scorer chose (:func:`flowkern.scorers.select`).
    """
    keep_real = real & (~image | chosen)
    keep_real[:, -1] = True
    return keep_real


def is_continuation(ids: torch.Tensor | None, prompt_ids: torch.Tensor | None) -> bool:
    """Whether a cache-free forward of ``ids`` ``[B, S']`` re-feeds the prompt ``prompt_ids`` ``[B, S]`` plus
    generated tokens (``generate(use_cache=False)``), rather than a new prompt."""
    if ids is None or prompt_ids is None:
        return False
    S = prompt_ids.shape[1]
    return ids.shape[1] > S and ids.shape[0] == prompt_ids.shape[0] and torch.equal(
        ids[:, :S], prompt_ids.to(ids.device))
