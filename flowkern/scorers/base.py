"""The scorer protocol of :func:`flowkern.prune`: which image tokens a pruning stage keeps.

A scorer is a small dataclass with one :meth:`Scorer.score` method. At each pruning stage (decoder layer ``L``, or
``L = 0``: before the decoder) :mod:`flowkern.prune` computes only what the scorer's :attr:`Scorer.needs` name,
packs it into a :class:`ScoreInputs`, and keeps, per sample, the ``k`` image tokens with the highest scores
(:func:`select`: ties go to the earlier token). Text tokens and each row's last position are always kept.

.. code-block:: python

    from dataclasses import dataclass
    import torch
    from flowkern.scorers import Scorer, ScoreInputs, register

    @register
    @dataclass(frozen=True)
    class Norm(Scorer):
        '''Keep the image tokens whose hidden state entering layer L has the largest norm.'''
        name = "norm"
        needs = frozenset({"hidden"})

        def score(self, inputs: ScoreInputs) -> torch.Tensor:
            return inputs.hidden.float().norm(dim=-1)           # [B, S]

    with flowkern.prune(model, layer=2, keep=64, rank="norm"): ...   # or rank=Norm()

Everything a criterion may ask for (:data:`NEEDS`) is indexed by the *rows of the sequence entering the stage*
(``S`` rows; after an earlier stage of a schedule these are the survivors, whose original prompt positions are
:attr:`ScoreInputs.positions`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, ClassVar

import torch

__all__ = ["NEEDS", "ATTENTION_ROWS", "ScoreInputs", "Scorer", "register", "check_scorer", "get_scorer",
           "scorer_names", "scorer_descriptions", "scorer_to_json", "scorer_from_json", "select"]

NEEDS = frozenset({
    "attention",           # float32 [B, S]: head-mean softmax probability each row (as a key) receives at layer L-1
                           # from the query rows named by Scorer.attention_rows
    "prerope_attention",   # float32 [B, S]: the same with queries and keys taken before the rotary embedding
    "hidden",              # [B, S, D]: the hidden states entering layer L (L = 0: the input embeddings)
    "features",            # [B, S, D]: the input embeddings of the prompt rows (projected image features at image rows)
    "grids",               # per sample, its image grids as long [rows, cols] of row indices (-1 = no token)
    "cls_attention",       # float32 [B, S]: the vision tower's [CLS] -> patch attention at each image row
})
"""What a scorer may ask for in :attr:`Scorer.needs` (each becomes the :class:`ScoreInputs` field of that name)."""

ATTENTION_ROWS = ("last", "text")
"""Which query rows ``attention`` averages over: ``"last"`` the last prompt row (FastV), ``"text"`` every text row
after the first image token (the question and the chat template's tail; SparseVLM-style relevance)."""


@dataclass(frozen=True)
class ScoreInputs:
    """What one pruning stage knows about a batch, for :meth:`Scorer.score`. Fields not in the scorer's
    :attr:`Scorer.needs` are None.

    Attributes:
        layer: the stage's decoder layer ``L`` (0 = before the decoder).
        image: bool ``[B, S]``: the image tokens still in the sequence (the candidates).
        real: bool ``[B, S]``: real rows (False = padding or a hidden filler).
        k: long ``[B]``: image tokens this stage keeps per sample.
        positions: long ``[B, S]``: original prompt position of each row.
        seed: the pruning seed (``PruneSpec.seed``).
        segments: long ``[B, S]`` segment ids (:mod:`flowkern.hf.segments`) of each row, -1 = padding, or None.
        attention, prerope_attention, hidden, features, grids, cls_attention: see :data:`NEEDS`.
    """

    layer: int
    image: torch.Tensor
    real: torch.Tensor
    k: torch.Tensor
    positions: torch.Tensor
    seed: int = 0
    segments: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    prerope_attention: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    features: torch.Tensor | None = None
    grids: list[list[torch.Tensor]] | None = None
    cls_attention: torch.Tensor | None = None


class Scorer:
    """Base class of a pruning criterion. Subclass it as a frozen dataclass (its fields are the criterion's
    parameters, recorded with every result), set :attr:`name` and :attr:`needs`, and implement :meth:`score`.

    Class attributes:
        name: the name ``rank=`` / ``--rank`` use (:func:`register`).
        needs: subset of :data:`NEEDS`: what :meth:`score` reads.
        attention_rows: one of :data:`ATTENTION_ROWS` (with ``"attention"`` / ``"prerope_attention"`` in needs).
        before_decoder: whether it can rank at ``L = 0`` (False for criteria that need layer ``L-1``'s attention).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    attention_rows: ClassVar[str] = "last"
    before_decoder: ClassVar[bool] = True

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """float ``[B, S]``: higher = keep. Only the entries at ``inputs.image`` are read; no NaN there.

        Args:
            inputs: the stage's :class:`ScoreInputs`.
        """
        raise NotImplementedError(f"{type(self).__name__}.score")

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., <parameters>}``: the setting as recorded in results (:func:`scorer_from_json`)."""
        params = asdict(self) if is_dataclass(self) else {}
        return {"name": self.name, **params}


_REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make ``cls`` (a :class:`Scorer` with a unique :attr:`Scorer.name`) nameable by
    ``rank=<name>`` and ``--rank <name>``.

    Raises:
        ValueError: no name, a name already taken by another class, or ``needs`` outside :data:`NEEDS`.
    """
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise ValueError(f"register: expected a Scorer subclass, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"register: {cls.__name__}.name must be a non-empty string")
    if not isinstance(cls.needs, property):  # a property (a combination of scorers) is checked per object
        _check_needs(f"register: {cls.__name__}", cls.needs, cls.attention_rows)
    other = _REGISTRY.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"register: the scorer name {cls.name!r} is taken by {other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def check_scorer(scorer: Scorer) -> Scorer:
    """``scorer`` itself, after checking what it declares (:attr:`Scorer.needs` within :data:`NEEDS`, a known
    :attr:`Scorer.attention_rows`): the check :func:`register` makes on a class, for an object whose declarations
    depend on its fields.

    Raises:
        ValueError: not a Scorer, or a bad declaration (naming the scorer).
    """
    if not isinstance(scorer, Scorer):
        raise ValueError(f"rank: expected a flowkern.scorers.Scorer, got {type(scorer).__name__}")
    _check_needs(f"scorer {scorer.name or type(scorer).__name__!r}", scorer.needs, scorer.attention_rows)
    return scorer


def _check_needs(who: str, needs: Any, rows: Any) -> None:
    if isinstance(needs, str) or not hasattr(needs, "__iter__"):
        raise ValueError(f"{who}: needs must be a set of names from {sorted(NEEDS)}, got {needs!r}")
    unknown = sorted(set(needs) - NEEDS)
    if unknown:
        raise ValueError(f"{who}: needs names {unknown}; known: {sorted(NEEDS)}")
    if rows not in ATTENTION_ROWS:
        raise ValueError(f"{who}: attention_rows must be one of {ATTENTION_ROWS}, got {rows!r}")


def scorer_names() -> tuple[str, ...]:
    """The registered scorer names, built-ins first."""
    _load_builtins()
    return tuple(_REGISTRY)


def scorer_descriptions() -> dict[str, str]:
    """``{name: the first paragraph of its class docstring, as plain text}`` of every registered scorer, in
    :func:`scorer_names` order."""
    import re

    _load_builtins()
    out = {}
    for name, cls in _REGISTRY.items():
        first = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        out[name] = re.sub(r":\w+:`~?([^`]+)`", r"\1", first).replace("``", "")
    return out


def get_scorer(rank: str | Scorer, **params: Any) -> Scorer:
    """The scorer a ``rank`` names: a registered name (built with ``params``), or a :class:`Scorer` as is.

    Raises:
        ValueError: an unknown name (the message lists the known ones) or bad parameters.
    """
    if isinstance(rank, Scorer):
        if params:
            raise ValueError("rank: parameters go into the Scorer object, not beside it")
        return check_scorer(rank)
    _load_builtins()
    cls = _REGISTRY.get(rank) if isinstance(rank, str) else None
    if cls is None:
        raise ValueError(f"rank must be a Scorer or one of {', '.join(_REGISTRY)}, got {rank!r}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"rank {rank!r}: {exc}") from None


def scorer_to_json(rank: str | Scorer) -> str | dict[str, Any]:
    """A ``rank`` for JSON: a name stays a name; a :class:`Scorer` becomes its bare name when its parameters are
    the defaults, else :meth:`Scorer.to_json`."""
    if isinstance(rank, str):
        return rank
    try:
        if type(rank)() == rank:
            return rank.name
    except TypeError:  # a scorer with required parameters
        pass
    return rank.to_json()


def scorer_from_json(data: str | dict[str, Any]) -> str | Scorer:
    """The inverse of :func:`scorer_to_json`.

    Raises:
        ValueError: an unknown name or bad parameters.
    """
    if isinstance(data, str):
        get_scorer(data)  # checks the name
        return data
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError(f"rank: expected a scorer name or {{'name': ..., <parameters>}}, got {data!r}")
    params = {k: v for k, v in data.items() if k != "name"}
    return get_scorer(data["name"], **params)


def select(scores: torch.Tensor, image: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """bool ``[B, S]``: the ``k[b]`` image tokens of row b with the highest scores (stable: ties go to the earlier
    token).

    Args:
        scores: float ``[B, S]`` (only entries at ``image`` are read). image: bool ``[B, S]``. k: long ``[B]``.

    Raises:
        ValueError: scores of another shape, or NaN at an image token.
    """
    B, S = image.shape
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (B, S):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a float tensor [B={B}, S={S}], got {got}")
    s = scores.float().to(image.device)
    if bool(torch.isnan(s[image]).any()):
        raise ValueError("scores are NaN at some image tokens: a scorer must give every candidate a number")
    s = s.masked_fill(~image, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    place = torch.empty_like(order).scatter_(1, order, torch.arange(S, device=image.device).expand(B, S))
    return image & (place < k.to(image.device)[:, None])


def _load_builtins() -> None:
    """Import the built-in scorers' modules (each registers its scorers on import)."""
    import importlib
    import pkgutil
    from pathlib import Path

    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):  # this package's modules, without importing it
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")
