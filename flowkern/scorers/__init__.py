"""Pruning criteria for :func:`flowkern.prune` (``rank=``): the protocol (:mod:`flowkern.scorers.base`) and the
built-in scorers, one module per family of criteria (each registers its scorers on import)."""

from flowkern.scorers.base import (
    ATTENTION_ROWS,
    NEEDS,
    ScoreInputs,
    Scorer,
    check_scorer,
    get_scorer,
    register,
    scorer_descriptions,
    scorer_from_json,
    scorer_names,
    scorer_to_json,
    select,
)

__all__ = ["ATTENTION_ROWS", "NEEDS", "Scorer", "ScoreInputs", "check_scorer", "get_scorer", "register",
           "scorer_descriptions", "scorer_from_json", "scorer_names", "scorer_to_json", "select"]
