"""Bad arguments raise ValueError naming the argument, before any kernel runs (docs/ops.md)."""

from __future__ import annotations

import pytest
import torch

import flowkern
from tests.fixtures import backend


def _args(**over):
    b, hq, hkv, sq, sk, d = 2, 4, 2, 5, 9, 64
    a = dict(q=torch.randn(b, hq, sq, d), k=torch.randn(b, hkv, sk, d), v=torch.randn(b, hkv, sk, d),
             segment_ids=torch.zeros(b, sk, dtype=torch.long), num_segments=3)
    a.update(over)
    return a


def _call(**over):
    a = _args(**{k: v for k, v in over.items() if k not in ("causal", "key_padding_mask", "scale")})
    kw = {k: v for k, v in over.items() if k in ("causal", "key_padding_mask", "scale")}
    return flowkern.segment_attention(a["q"], a["k"], a["v"], a["segment_ids"], a["num_segments"], **kw)


BAD = {
    "q rank": (dict(q=torch.randn(4, 5, 64)), "q must have 4 dims"),
    "q dtype": (dict(q=torch.randn(2, 4, 5, 64, dtype=torch.float64)), "q must be float32"),
    "k dtype mismatch": (dict(k=torch.randn(2, 2, 9, 64).half()), "k must have q's dtype"),
    "k head dim": (dict(k=torch.randn(2, 2, 9, 32)), "k must be"),
    "k batch": (dict(k=torch.randn(3, 2, 9, 64)), "k must be"),
    "gqa ratio": (dict(k=torch.randn(2, 3, 9, 64), v=torch.randn(2, 3, 9, 64)), "multiple of k heads"),
    "v shape": (dict(v=torch.randn(2, 2, 8, 64)), "v must have k's shape"),
    "v dtype": (dict(v=torch.randn(2, 2, 9, 64).bfloat16()), "v must have q's dtype"),
    "num_segments 0": (dict(num_segments=0), "num_segments"),
    "num_segments 9": (dict(num_segments=9), "num_segments"),
    "num_segments bool": (dict(num_segments=True), "num_segments"),
    "segment id too big": (dict(segment_ids=torch.full((2, 9), 3)), "segment_ids must lie in"),
    "segment id negative": (dict(segment_ids=torch.full((2, 9), -1)), "segment_ids must lie in"),
    "segment_ids float": (dict(segment_ids=torch.zeros(2, 9)), "segment_ids must be an integer"),
    "segment_ids shape": (dict(segment_ids=torch.zeros(2, 8, dtype=torch.long)), "segment_ids must be"),
    "causal sq > sk": (dict(q=torch.randn(2, 4, 10, 64)), "Sq <= Sk"),
    "mask dtype": (dict(key_padding_mask=torch.ones(2, 9)), "key_padding_mask must be a bool"),
    "mask shape": (dict(key_padding_mask=torch.ones(2, 8, dtype=torch.bool)), "key_padding_mask must be"),
    "scale": (dict(scale=-1.0), "scale must be"),
    "head dim too big": (dict(q=torch.randn(2, 4, 5, 300), k=torch.randn(2, 2, 9, 300),
                              v=torch.randn(2, 2, 9, 300)), "head dim"),
}


@pytest.mark.parametrize("over,message", BAD.values(), ids=BAD.keys())
def test_segment_attention_rejects(over, message):
    with pytest.raises(ValueError, match=message):
        _call(**over)


def test_noncausal_allows_sq_gt_sk():
    out, _, _ = _call(q=torch.randn(2, 4, 10, 64), causal=False)
    assert out.shape == (2, 4, 10, 64)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(lse=torch.zeros(2, 4, 2)), "lse must be"),
        (dict(lse=torch.zeros(2, 4, 1, dtype=torch.float64)), "lse must be float32"),
        (dict(q=torch.randn(2, 3, 1, 64)), "multiple of k heads"),
        (dict(key_padding_mask=torch.ones(2, 9, dtype=torch.long)), "key_padding_mask must be a bool"),
    ],
)
def test_key_attention_mass_rejects(kw, message):
    a = dict(q=torch.randn(2, 4, 1, 64), k=torch.randn(2, 2, 9, 64), lse=torch.zeros(2, 4, 1))
    extra = {k: kw.pop(k) for k in list(kw) if k == "key_padding_mask"}
    a.update(kw)
    with pytest.raises(ValueError, match=message):
        flowkern.key_attention_mass(a["q"], a["k"], a["lse"], **extra)


def test_unknown_backend_env():
    with backend("cuda-magic"), pytest.raises(ValueError, match="FLOWKERN_BACKEND"):
        _call()


def test_cpp_backend_rejects_other_devices():
    with backend("cpp"), pytest.raises(ValueError, match="needs CPU tensors"):
        flowkern.ops.backend_for(torch.device("meta"))
