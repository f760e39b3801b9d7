"""key_attention_mass: every backend against the float64 reference and against a sliced full softmax."""

from __future__ import annotations

import itertools

import pytest
import torch

import flowkern
from flowkern import reference
from tests.fixtures import ALL_BACKENDS, TOL, TRITON, backend, make_qkv, max_abs, padding_mask, poison_allocator

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_case(name: str, device: str, *, dtype, heads, sq, sk, d, causal, padding, per_head=False,
             noncontiguous=False, b=2, seed=0) -> None:
    hq, hkv = heads
    gen = torch.Generator().manual_seed(seed + 1)
    q, k, _ = make_qkv(b, hq, hkv, sq, sk, d, dtype, device, seed, noncontiguous)
    kpm = padding_mask(padding, b, sk, gen)
    # the lse the op is given comes from the float64 oracle, rounded to float32 like segment_attention's output
    _, lse64, _ = reference.segment_attention(
        q.double().cpu(), k.double().cpu(), k.double().cpu(), torch.zeros(b, sk, dtype=torch.long), 1,
        causal=causal, key_padding_mask=kpm,
    )
    lse = lse64.float().to(device)
    poison_allocator(device, b * hq * sk * 4)
    with backend(name):
        got = flowkern.key_attention_mass(q, k, lse, causal=causal, per_head=per_head,
                                          key_padding_mask=None if kpm is None else kpm.to(device))
    expected = reference.key_attention_mass(q.double().cpu(), k.double().cpu(), lse64, causal=causal,
                                            key_padding_mask=kpm, per_head=per_head)
    assert got.dtype == torch.float32
    assert got.shape == ((b, hq, sk) if per_head else (b, sk))
    assert not torch.isnan(got).any()
    # received attention of a key is at most 1 per row; the mass tolerance applies per element
    assert max_abs(got, expected) <= TOL[dtype]["mass"], f"max-abs {max_abs(got, expected):.2e}"
    if kpm is not None:
        assert (got.cpu()[..., ~kpm] == 0).all() if not per_head else (got.cpu().permute(0, 2, 1)[~kpm] == 0).all()


def _grid(full: bool) -> list[dict]:
    cases = []
    combos = itertools.product(DTYPES, [(4, 4), (8, 2), (8, 1)], ("decode", "partial", "full"), (True, False))
    for i, (dtype, heads, sq_kind, causal) in enumerate(combos):
        sk = (37, 70, 300)[i % 3] if full else (37, 70)[i % 2]
        sq = {"decode": 1, "partial": sk // 2 + 3, "full": sk}[sq_kind]
        cases.append(dict(dtype=dtype, heads=heads, sq=sq, sk=sk, d=(64, 80, 128)[(i // 3) % 3], causal=causal,
                          padding=("none", "left", "right")[i % 3], per_head=i % 4 == 0,
                          noncontiguous=i % 5 == 1, seed=i))
    return cases


def _id(c: dict) -> str:
    return (f"{str(c['dtype']).removeprefix('torch.')}-h{c['heads'][0]}/{c['heads'][1]}-sq{c['sq']}-sk{c['sk']}-"
            f"d{c['d']}-{'causal' if c['causal'] else 'full'}-{c['padding']}")


@pytest.mark.parametrize("case", _grid(full=True), ids=_id)
def test_cpp_grid(case):
    if not flowkern.ops.cpp_available():
        pytest.skip("flowkern._C not built")
    run_case("cpp", "cpu", **case)


@pytest.mark.parametrize("case", _grid(full=False), ids=_id)
def test_triton_grid(case):
    (name, device), = TRITON.values
    if TRITON.marks:
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    run_case(name, device, **case)


@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_last_row_equals_slice_of_full_softmax(be):
    """The intended use: last prompt row only. Oracle: the last row of torch.softmax over the full scores."""
    name, device = be
    b, hq, hkv, s, d = 2, 8, 2, 29, 64
    q, k, v = make_qkv(b, hq, hkv, s, s, d, torch.float32, device, seed=21)
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[1, :6] = False
    seg = torch.zeros(b, s, dtype=torch.long, device=device)
    with backend(name):
        _, lse, _ = flowkern.segment_attention(q, k, v, seg, 1, key_padding_mask=kpm.to(device))
        got = flowkern.key_attention_mass(q[:, :, -1:], k, lse[:, :, -1:], key_padding_mask=kpm.to(device))
        got_heads = flowkern.key_attention_mass(q[:, :, -1:], k, lse[:, :, -1:], key_padding_mask=kpm.to(device),
                                                per_head=True)
    scores = q.cpu().double() @ k.cpu().double().repeat_interleave(4, 1).transpose(-1, -2) / d**0.5
    scores = scores.masked_fill(~kpm[:, None, None, :], float("-inf"))
    probs = scores[:, :, -1].softmax(-1)  # [B, Hq, Sk]
    torch.testing.assert_close(got_heads.cpu().double(), probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.cpu().double(), probs.mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1).cpu(), torch.ones(b))


@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_dead_rows_contribute_nothing(be):
    name, device = be
    b, hq, hkv, sq, sk, d = 1, 2, 2, 4, 10, 64
    q, k, _ = make_qkv(b, hq, hkv, sq, sk, d, torch.float32, device, seed=2)
    lse = torch.full((b, hq, sq), float("-inf"), device=device)
    with backend(name):
        got = flowkern.key_attention_mass(q, k, lse, causal=True)
    assert (got == 0).all()
