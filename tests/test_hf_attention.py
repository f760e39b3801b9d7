"""The registered "flowkern" attention and mask functions vs transformers' own sdpa/eager functions."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from flowkern import reference
from flowkern.hf.attention import (
    ATTENTION_NAME,
    OBSERVER_ATTR,
    AttentionObserver,
    flowkern_attention_forward,
    flowkern_attention_mask,
    register,
)


class Attn(torch.nn.Module):
    def __init__(self, hq: int, hkv: int) -> None:
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = hq // hkv
        self.layer_idx = 0


class Recorder(AttentionObserver):
    num_segments = 3

    def __init__(self, segments: torch.Tensor) -> None:
        self.segments = segments
        self.seen: list = []

    def key_segments(self, module, batch, kv_len, device):
        return self.segments[:, :kv_len].to(device=device, dtype=torch.int32)

    def observe(self, module, q_last, k, lse_last, mass_last, key_padding_mask, scale, causal):
        self.seen.append((q_last.clone(), lse_last.clone(), mass_last.clone(), key_padding_mask, scale, causal))


def _inputs(b=2, hq=4, hkv=2, sq=5, past=3, d=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, requires_grad=grad)
    k = torch.randn(b, hkv, past + sq, d, generator=g, requires_grad=grad)
    v = torch.randn(b, hkv, past + sq, d, generator=g, requires_grad=grad)
    padding = torch.ones(b, past + sq, dtype=torch.bool)
    padding[1, :2] = False  # left padding in sample 1
    return q, k, v, padding


def _masks(padding: torch.Tensor, sq: int, past: int):
    """(flowkern mask, sdpa 4D mask) for the same 2D padding mask and cache offset."""
    b, kv = padding.shape
    ours = flowkern_attention_mask(b, sq, kv, q_offset=past, kv_offset=0, mask_function=causal_mask_function,
                                   attention_mask=padding)
    theirs = sdpa_mask(batch_size=b, q_length=sq, kv_length=kv, q_offset=past, kv_offset=0,
                       mask_function=causal_mask_function, attention_mask=padding, allow_is_causal_skip=False)
    return ours, theirs


def test_registered_under_a_non_flash_name():
    assert register() == ATTENTION_NAME and "flash" not in ATTENTION_NAME
    assert AttentionInterface()[ATTENTION_NAME] is flowkern_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[ATTENTION_NAME] is flowkern_attention_mask


def test_mask_is_the_2d_padding_mask():
    padding = torch.ones(2, 7, dtype=torch.bool)
    assert flowkern_attention_mask(2, 7, 7, mask_function=causal_mask_function, attention_mask=padding) is None
    assert flowkern_attention_mask(2, 7, 7, mask_function=causal_mask_function, attention_mask=None) is None
    padding[0, 0] = False
    got = flowkern_attention_mask(2, 1, 7, q_offset=6, mask_function=causal_mask_function, attention_mask=padding)
    assert got.dtype == torch.bool and torch.equal(got, padding)
    # static cache: 10 slots, 7 written -> a mask of the 7 real positions, shorter than kv_length
    got = flowkern_attention_mask(2, 1, 10, q_offset=6, mask_function=causal_mask_function,
                                  attention_mask=torch.ones(2, 7))
    assert got.shape == (2, 7) and got.all()


def test_mask_rejects_other_patterns():
    with pytest.raises(NotImplementedError, match="plain causal"):
        flowkern_attention_mask(1, 4, 4, mask_function=sliding_window_causal_mask_function(2))


@pytest.mark.parametrize("sq,past", [(6, 0), (5, 3), (1, 7)], ids=["prefill", "chunk", "decode"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_matches_sdpa_attention_forward(sq, past, hq, hkv):
    q, k, v, padding = _inputs(hq=hq, hkv=hkv, sq=sq, past=past)
    module = Attn(hq, hkv)
    ours_mask, sdpa_4d = _masks(padding, sq, past)
    out, weights = flowkern_attention_forward(module, q, k, v, ours_mask, scaling=0.3)
    expect, _ = sdpa_attention_forward(module, q, k, v, sdpa_4d, scaling=0.3)
    assert weights is None and out.shape == (2, sq, hq, 8)
    real_rows = padding[:, past:]  # left-padding query rows see no key: flowkern gives 0 there
    torch.testing.assert_close(out[real_rows], expect[real_rows], atol=1e-5, rtol=1e-5)


def test_observer_gets_the_last_row():
    q, k, v, padding = _inputs(sq=5, past=3)
    segments = torch.randint(0, 3, (2, 8), generator=torch.Generator().manual_seed(1))
    module = Attn(4, 2)
    rec = Recorder(segments)
    setattr(module, OBSERVER_ATTR, rec)
    mask, _ = _masks(padding, 5, 3)
    flowkern_attention_forward(module, q, k, v, mask, scaling=0.4)
    (q_last, lse_last, mass_last, kpm, scale, causal), = rec.seen
    _, lse, mass = reference.segment_attention(q.double(), k.double(), v.double(), segments, 3, causal=True,
                                               key_padding_mask=padding, scale=0.4)
    assert torch.equal(q_last, q[:, :, -1:]) and scale == 0.4 and causal and torch.equal(kpm, padding)
    torch.testing.assert_close(mass_last, mass[:, -1].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse_last, lse[:, :, -1:].float(), atol=1e-5, rtol=0)


def test_grad_path_is_differentiable_and_still_observed():
    q, k, v, padding = _inputs(sq=5, past=3, grad=True)
    module = Attn(4, 2)
    segments = torch.randint(0, 3, (2, 8), generator=torch.Generator().manual_seed(2))
    rec = Recorder(segments)
    setattr(module, OBSERVER_ATTR, rec)
    mask, sdpa_4d = _masks(padding, 5, 3)
    out, _ = flowkern_attention_forward(module, q, k, v, mask)
    expect, _ = sdpa_attention_forward(module, q, k, v, sdpa_4d)
    real = padding[:, 3:]
    torch.testing.assert_close(out[real], expect[real], atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out[real].square().sum(), (q, k, v))
    expect_grads = torch.autograd.grad(expect[real].square().sum(), (q, k, v))
    for got, exp in zip(grads, expect_grads, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    _, _, mass = reference.segment_attention(q.detach().double(), k.detach().double(), v.detach().double(), segments,
                                             3, key_padding_mask=padding)
    torch.testing.assert_close(rec.seen[0][2], mass[:, -1].float(), atol=1e-5, rtol=0)
    assert not rec.seen[0][2].requires_grad


def test_static_cache_slots_past_the_mask_are_ignored():
    q, k, v, padding = _inputs(sq=1, past=7)
    module = Attn(4, 2)
    garbage = torch.full((2, 2, 4, 8), 1e4)
    out, _ = flowkern_attention_forward(module, q, torch.cat([k, garbage], 2), torch.cat([v, garbage], 2), padding)
    expect, _ = flowkern_attention_forward(module, q, k, v, padding)
    torch.testing.assert_close(out, expect)


@pytest.mark.parametrize("kwarg", ["sliding_window", "softcap", "s_aux"])
def test_unsupported_features_raise(kwarg):
    q, k, v, _ = _inputs()
    with pytest.raises(NotImplementedError):
        flowkern_attention_forward(Attn(4, 2), q, k, v, None, **{kwarg: 4})


def test_4d_mask_raises():
    q, k, v, padding = _inputs(sq=5, past=3)
    _, sdpa_4d = _masks(padding, 5, 3)
    with pytest.raises(ValueError, match="2D key padding mask"):
        flowkern_attention_forward(Attn(4, 2), q, k, v, sdpa_4d)
