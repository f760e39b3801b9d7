"""The registered "flowkern" attention and mask functions vs transformers' own sdpa/eager functions."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    causal_mask_function,
    chunked_causal_mask_function,
    sdpa_mask,
)

from flowkern import reference
from flowkern.hf.attention import (
    ATTENTION_NAME,
    STATE_ATTR,
    LayerState,
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


class Recorder:
    """A session stand-in: pushes a LayerState with the given labels onto a module and keeps the row events."""

    def __init__(self, module: torch.nn.Module, segments: torch.Tensor | None, num_segments: int = 3,
                 key_mass: bool = True) -> None:
        self.seen: list = []
        state = LayerState(0, key_ids=None if segments is None else segments.to(torch.int32),
                           num_segments=num_segments, observe=True, key_mass=key_mass, sink=self.seen.append)
        setattr(module, STATE_ATTR, state)
        self.state = state


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
    """Sliding windows and image blocks are translated (tests/hf/test_families.py); chunked attention is not."""
    with pytest.raises(NotImplementedError, match="chunked attention"):
        chunked = chunked_causal_mask_function(2, torch.zeros(1, dtype=torch.long))
        flowkern_attention_mask(1, 4, 4, mask_function=chunked)


@pytest.mark.parametrize("path", ["fast-small", "fast-large", "observed"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("sq,past", [(6, 0), (5, 3), (1, 7)], ids=["prefill", "chunk", "decode"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_matches_sdpa_attention_forward(sq, past, hq, hkv, padded, path, monkeypatch):
    """Every path (nobody listens: SDPA for a small call, flowkern's kernel for a large one; a listener: the fused
    kernel) gives transformers' SDPA output, with and without key padding."""
    from flowkern.hf import attention

    monkeypatch.setattr(attention, "SMALL_CALL", 0 if path == "fast-large" else 2**40)
    observed = path == "observed"
    q, k, v, padding = _inputs(hq=hq, hkv=hkv, sq=sq, past=past)
    if not padded:
        padding = torch.ones_like(padding)
    module = Attn(hq, hkv)
    if observed:
        rec = Recorder(module, torch.zeros(2, past + sq, dtype=torch.long), num_segments=1, key_mass=False)
    ours_mask, sdpa_4d = _masks(padding, sq, past)
    out, weights = flowkern_attention_forward(module, q, k, v, ours_mask, scaling=0.3)
    expect, _ = sdpa_attention_forward(module, q, k, v, sdpa_4d, scaling=0.3)
    assert weights is None and out.shape == (2, sq, hq, 8)
    real_rows = padding[:, past:]  # left-padding query rows see no key: their output is never read
    torch.testing.assert_close(out[real_rows], expect[real_rows], atol=1e-5, rtol=1e-5)
    if observed:
        assert len(rec.seen) == 1 and rec.seen[0].key_mass is None


def test_observer_gets_the_last_row():
    q, k, v, padding = _inputs(sq=5, past=3)
    segments = torch.randint(0, 3, (2, 8), generator=torch.Generator().manual_seed(1))
    module = Attn(4, 2)
    rec = Recorder(module, segments)
    mask, _ = _masks(padding, 5, 3)
    flowkern_attention_forward(module, q, k, v, mask, scaling=0.4)
    (event,) = rec.seen
    _, lse, mass = reference.segment_attention(q.double(), k.double(), v.double(), segments, 3, causal=True,
                                               key_padding_mask=padding, scale=0.4)
    received = reference.key_attention_mass(q[:, :, -1:].double(), k.double(), lse[:, :, -1:], causal=True,
                                            key_padding_mask=padding, scale=0.4)
    assert event.layer == 0 and event.keymap is None
    torch.testing.assert_close(event.mass, mass[:, -1].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(event.key_mass, received.float(), atol=1e-5, rtol=0)
    assert float(event.key_mass[1, :2].abs().max()) == 0  # padding keys receive nothing


def test_key_map_state_replaces_the_mask_and_is_checked():
    """A layer holding only some tokens: its state's key padding applies (not the mask transformers passes), and
    keys that do not match its key map are an error."""
    q, k, v, padding = _inputs(sq=1, past=7)
    module = Attn(4, 2)
    rec = Recorder(module, None, num_segments=1, key_mass=True)
    keymap = torch.arange(8).expand(2, 8).clone()
    keymap[0, 2:4] = -1  # two hidden fillers in row 0
    rec.state.keymap, rec.state.key_padding = keymap, keymap >= 0
    out, _ = flowkern_attention_forward(module, q, k, v, None)
    expect, _ = flowkern_attention_forward(Attn(4, 2), q, k, v, keymap >= 0)
    torch.testing.assert_close(out, expect)
    assert torch.equal(rec.seen[0].keymap, keymap) and float(rec.seen[0].key_mass[0, 2:4].abs().max()) == 0
    with pytest.raises(RuntimeError, match="key map covers"):
        flowkern_attention_forward(module, q, k[:, :, 1:], v[:, :, 1:], None)
    rec.state.keymap = None
    with pytest.raises(RuntimeError, match="labelled"):  # labels of 8 keys, 7 keys given
        rec.state.key_ids = torch.zeros(2, 8, dtype=torch.int32)
        flowkern_attention_forward(module, q, k[:, :, 1:], v[:, :, 1:], None)


def test_grad_path_is_differentiable_and_still_observed():
    q, k, v, padding = _inputs(sq=5, past=3, grad=True)
    module = Attn(4, 2)
    segments = torch.randint(0, 3, (2, 8), generator=torch.Generator().manual_seed(2))
    rec = Recorder(module, segments)
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
    torch.testing.assert_close(rec.seen[0].mass, mass[:, -1].float(), atol=1e-5, rtol=0)
    assert not rec.seen[0].mass.requires_grad and not rec.seen[0].key_mass.requires_grad


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
