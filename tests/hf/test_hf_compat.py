"""flowkern.hf.compat: the one module that reads transformers' version-dependent internals."""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

from flowkern.cli import main
from flowkern.hf import compat

PACKAGE = Path(__file__).resolve().parents[2] / "flowkern"


def test_cache_keyword_is_what_this_transformers_forward_takes():
    # fails on a release that renames the cache keyword again: compat.CACHE_KWARG must follow it
    for fn in (LlamaModel.forward, LlamaDecoderLayer.forward, LlamaForCausalLM.forward):
        assert compat.CACHE_KWARG in inspect.signature(fn).parameters, fn.__qualname__


def test_call_cache_reads_either_keyword_and_output_cache_either_attribute():
    cache = DynamicCache()
    assert compat.call_cache({"cache": cache}) is cache
    assert compat.call_cache({"past_key_values": cache}) is cache
    assert compat.call_cache({"past_key_values": None, "cache": cache}) is cache
    assert compat.call_cache({"attention_mask": torch.ones(1, 2)}) is None
    assert compat.cache_kwargs(cache) == {compat.CACHE_KWARG: cache}
    assert compat.cache_length(None) == 0
    with pytest.raises(NotImplementedError, match="Cache object"):
        compat.cache_length(((torch.zeros(1), torch.zeros(1)),))

    class Old:
        past_key_values = cache

    class New:
        cache = DynamicCache()
        past_key_values = "deprecated alias: must not be read when the new name is there"

    assert compat.output_cache(Old()) is cache
    assert compat.output_cache(New()) is New.cache
    assert compat.output_cache(object()) is None


def test_real_forward_round_trip_through_compat():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 32, (2, 5))
    seen = []
    handle = model.model.layers[1].register_forward_pre_hook(
        lambda m, a, kw: seen.append(compat.call_cache(kw)), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            cache = compat.output_cache(out)
            assert compat.cache_length(cache) == 5
            model(input_ids=ids[:, :1], use_cache=True, **compat.cache_kwargs(cache))
    finally:
        handle.remove()
    assert seen[0] is cache and seen[1] is cache  # the decoder layers saw the cache through compat.call_cache
    assert compat.cache_length(cache) == 6
    compat.check_dynamic_cache(cache)
    k, v = compat.layer_kv(cache, 1)
    assert k.shape == (2, 1, 6, 8) and v.shape == (2, 1, 6, 8)
    compat.set_layer_kv(cache, 1, k[:, :, :3], v[:, :, :3])
    assert compat.layer_kv(cache, 1)[0].shape[-2] == 3
    assert compat.cache_num_layers(cache) == 2
    assert compat.layer_kv(DynamicCache(config=config), 0) is None


def test_masks_and_layer_inputs():
    m = torch.ones(2, 4, dtype=torch.long)
    assert compat.padding_mask_2d(m, "x") is m
    assert compat.padding_mask_2d({"full_attention": m, "sliding_attention": None}, "x") is m
    assert compat.padding_mask_2d(None, "x") is None
    with pytest.raises(ValueError, match="owner needs a 2D attention_mask"):
        compat.padding_mask_2d(torch.ones(2, 1, 4, 4), "owner")
    for name in ("hidden_states", "position_ids", "text_position_ids", "position_embeddings", compat.CACHE_KWARG):
        assert compat.is_known_layer_input(name)
    assert not compat.is_known_layer_input("deepstack_visual_embeds")
    assert compat.encoder_token_counts({}) == {}

    class Encoded:
        pooler_output = [torch.zeros(6, 4), torch.zeros(9, 4)]

    assert compat.encoder_token_counts({"mm_encoder_outputs": {"image": Encoded()}}) == {"image_token_counts": [6, 9]}


def test_version_range_matches_pyproject_and_warns_outside(monkeypatch, capsys):
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    lo, hi = compat.TESTED_TRANSFORMERS
    major, minor = hi.split(".")
    assert f'"transformers>={lo},<{major}.{int(minor) + 1}"' in text
    version, tested = compat.version_report()
    assert tested, f"the test suite runs on transformers {version}, outside TESTED_TRANSFORMERS {lo}..{hi}"
    assert compat.untested_message() is None

    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", "5.99.0")
    monkeypatch.setattr(compat, "_MINOR", (5, 99))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        msg = compat.warn_if_untested()
    assert msg is not None and "5.99.0" in msg and f"<{major}.{int(minor) + 1}" in msg
    assert any("5.99.0" in str(w.message) for w in caught)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "5.99.0" in out


def test_no_other_module_reads_version_dependent_names():
    pattern = re.compile(
        r"[\"'](past_key_values|cache_position|full_attention|mm_encoder_outputs)[\"']"
        r"|_attn_implementation_internal|transformers\.cache_utils|\.past_key_values\b"
    )
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "compat.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}")
    assert not offenders, "read these through flowkern.hf.compat:\n" + "\n".join(offenders)
