"""flowkern.plan.PruneSpec: one pruning setting, validated on construction, round-tripped through JSON."""

from __future__ import annotations

import json

import pytest

from flowkern.plan import PRUNE_OPTIONS, PruneSpec


def test_defaults_and_enabled():
    spec = PruneSpec()
    assert (spec.layer, spec.keep, spec.rank, spec.seed, spec.when) == (None, 0, "attention", 0, "prefill")
    assert not spec.enabled and PruneSpec(layer=2).enabled


@pytest.mark.parametrize("kwargs, name", [
    ({"keep": -1}, "keep"), ({"keep": 1.5}, "keep"), ({"keep": True}, "keep"), ({"keep": "0"}, "keep"),
    ({"rank": "topk"}, "rank"), ({"when": "later"}, "when"), ({"seed": 1.0}, "seed"), ({"seed": False}, "seed"),
    ({"layer": 1.0}, "layer"), ({"layer": True}, "layer"),
])
def test_bad_values_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        PruneSpec(**kwargs)


def test_resolve_checks_against_the_model():
    assert PruneSpec(layer=-1).resolve(4) == 3
    assert PruneSpec().resolve(4) is None
    for spec, match in ((PruneSpec(layer=4), "layer must be"), (PruneSpec(layer=-5), "layer must be"),
                        (PruneSpec(layer=0, rank="none", when="decode"), "when='decode'")):
        with pytest.raises(ValueError, match=match):
            spec.resolve(4)
    with pytest.raises(ValueError, match="rank='attention'"):  # refused on construction: no model needed
        PruneSpec(layer=0, keep=2)
    with pytest.raises(NotImplementedError, match="DeepStack"):
        PruneSpec(layer=2, rank="none").resolve(4, deepstack=3, family="qwen3_vl")
    assert PruneSpec(2, 0.5, "grid", 0, "decode").resolve(4) == 2


@pytest.mark.parametrize("spec", [PruneSpec(), PruneSpec(layer=3, keep=0.25, rank="random", seed=7, when="decode"),
                                  PruneSpec(layer=-2, keep=64, rank="grid")])
@pytest.mark.parametrize("options", [False, True])
def test_round_trip(spec, options):
    data = json.loads(json.dumps(spec.to_dict(options=options)))
    assert PruneSpec.from_dict(data, options=options) == spec
    assert set(data) == (set(PRUNE_OPTIONS.values()) if options else set(PRUNE_OPTIONS))


def test_from_dict_refuses_unknown_keys_and_fills_defaults():
    assert PruneSpec.from_dict({"layer": 2}) == PruneSpec(layer=2)
    assert PruneSpec.from_dict({"prune_layer": 2, "prune_seed": 3}, options=True) == PruneSpec(layer=2, seed=3)
    with pytest.raises(ValueError, match="'prune_layer'"):
        PruneSpec.from_dict({"prune_layer": 2})
    with pytest.raises(ValueError, match="keep must be"):
        PruneSpec.from_dict({"keep": -3})
