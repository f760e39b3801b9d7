"""segment_attention: every backend against the float64 reference (docs/reliability.md)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowkern
from flowkern import reference
from tests.fixtures import (
    ALL_BACKENDS,
    CPP,
    HAS_CUDA,
    TOL,
    TRITON,
    backend,
    make_qkv,
    max_abs,
    padding_mask,
    poison_allocator,
    rel_err,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = [(4, 4), (8, 2), (8, 1)]  # GQA ratios 1, 4, 8
SQ_KINDS = ["decode", "partial", "full"]
PADDINGS = ["none", "left", "right"]
HEAD_DIMS = [64, 80, 128]


def _sq(kind: str, sk: int) -> int:
    return {"decode": 1, "partial": sk // 2 + 3, "full": sk}[kind]


def run_case(
    name: str, device: str, *, dtype: torch.dtype, heads: tuple[int, int], sq: int, sk: int, d: int, causal: bool,
    padding: str, nseg: int, per_head: bool = False, noncontiguous: bool = False, b: int = 2, seed: int = 0,
) -> None:
    """Run one backend on fresh random inputs and compare with the float64 reference."""
    hq, hkv = heads
    gen = torch.Generator().manual_seed(seed + 1)
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype, device, seed, noncontiguous)
    seg = torch.randint(0, nseg, (b, sk), generator=gen)
    # make segments mostly contiguous runs (like real prompts) but keep some interleaving
    seg = torch.sort(seg, dim=1).values if seed % 2 == 0 else seg
    kpm = padding_mask(padding, b, sk, gen)
    seg_d, kpm_d = seg.to(device), None if kpm is None else kpm.to(device)

    poison_allocator(device, b * hq * sq * max(d, nseg) * 4)
    with backend(name):
        out, lse, mass = flowkern.segment_attention(
            q, k, v, seg_d, nseg, causal=causal, key_padding_mask=kpm_d, per_head=per_head
        )
    ref_out, ref_lse, ref_mass = reference.segment_attention(
        q.double().cpu(), k.double().cpu(), v.double().cpu(), seg, nseg, causal=causal, key_padding_mask=kpm,
        per_head=per_head,
    )

    assert out.dtype == dtype and out.shape == (b, hq, sq, d)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
    expected_mass_shape = (b, hq, sq, nseg) if per_head else (b, sq, nseg)
    assert mass.dtype == torch.float32 and mass.shape == expected_mass_shape
    for t, what in ((out, "out"), (mass, "mass")):
        assert not torch.isnan(t).any(), f"NaN in {what}"
    assert not torch.isnan(lse).any(), "NaN in lse"
    # dead rows (no visible key) are exactly -inf in both
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(ref_lse)), "lse -inf pattern differs"

    tol = TOL[dtype]
    if dtype == torch.float32:
        assert max_abs(out, ref_out) <= tol["out"], f"out max-abs {max_abs(out, ref_out):.2e}"
    else:
        assert rel_err(out, ref_out) <= tol["out"], f"out rel-err {rel_err(out, ref_out):.2e}"
    assert max_abs(lse, ref_lse) <= tol["lse"] * max(1.0, float(ref_lse[torch.isfinite(ref_lse)].abs().max()))
    assert max_abs(mass, ref_mass) <= tol["mass"], f"mass max-abs {max_abs(mass, ref_mass):.2e}"
    # rows with a visible key sum to 1; dead rows are all-zero
    sums = mass.double().cpu().sum(-1)
    ref_sums = ref_mass.sum(-1)
    assert max_abs(sums, ref_sums) <= tol["mass"] * nseg


def _full_grid() -> list[dict]:
    cases = []
    for i, (dtype, heads, sq_kind, causal, padding, d) in enumerate(
        itertools.product(DTYPES, HEADS, SQ_KINDS, (True, False), PADDINGS, HEAD_DIMS)
    ):
        sk = (37, 130, 300)[i % 3]
        cases.append(dict(dtype=dtype, heads=heads, sq=_sq(sq_kind, sk), sk=sk, d=d, causal=causal,
                          padding=padding, nseg=1 + i % 8, per_head=i % 5 == 0, noncontiguous=i % 4 == 1, seed=i))
    return cases


def _covering_grid() -> list[dict]:
    """Every (dtype, GQA ratio, Sq kind, causal) combination; padding, D, nseg and layout cycle through."""
    cases = []
    for i, (dtype, heads, sq_kind, causal) in enumerate(itertools.product(DTYPES, HEADS, SQ_KINDS, (True, False))):
        sk = (37, 70)[i % 2]
        cases.append(dict(dtype=dtype, heads=heads, sq=_sq(sq_kind, sk), sk=sk, d=HEAD_DIMS[(i // 3) % 3],
                          causal=causal, padding=PADDINGS[i % 3], nseg=1 + (i * 3) % 8, per_head=i % 5 == 0,
                          noncontiguous=i % 4 == 1, seed=i))
    return cases


def _case_id(c: dict) -> str:
    dt = str(c["dtype"]).removeprefix("torch.")
    return (f"{dt}-h{c['heads'][0]}/{c['heads'][1]}-sq{c['sq']}-sk{c['sk']}-d{c['d']}-"
            f"{'causal' if c['causal'] else 'full'}-{c['padding']}-n{c['nseg']}")


@pytest.mark.parametrize("case", _full_grid(), ids=_case_id)
def test_cpp_full_grid(case):
    if not flowkern.ops.cpp_available():
        pytest.skip("flowkern._C not built")
    run_case("cpp", "cpu", **case)


@pytest.mark.parametrize("case", _covering_grid(), ids=_case_id)
def test_triton_covering_grid(case):
    (name, device), = TRITON.values
    if TRITON.marks:
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    run_case(name, device, **case)


@pytest.mark.parametrize("case", _covering_grid()[::3], ids=_case_id)
def test_reference_backend_fp32_grid(case):
    """The op's reference backend (compute in fp32) against the float64 oracle."""
    run_case("reference", "cpu", **case)


@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_noncausal_more_queries_than_keys(be):
    name, device = be
    run_case(name, device, dtype=torch.float32, heads=(4, 2), sq=45, sk=20, d=64, causal=False,
             padding="left", nseg=3)


@pytest.mark.parametrize("be", ALL_BACKENDS)
@pytest.mark.parametrize("d", [16, 96, 256])
def test_other_head_dims(be, d):
    name, device = be
    run_case(name, device, dtype=torch.float16, heads=(2, 1), sq=9, sk=33, d=d, causal=True, padding="right",
             nseg=4)


@pytest.mark.parametrize("be", ALL_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_fully_masked_rows_are_zero_not_nan(be, causal):
    """A batch row whose keys are all padding, and left-padded query rows under causal masking."""
    name, device = be
    b, hq, hkv, sq, sk, d, nseg = 3, 4, 2, 12, 12, 64, 3
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, torch.float32, device, seed=7)
    seg = torch.randint(0, nseg, (b, sk)).to(device)
    kpm = torch.ones(b, sk, dtype=torch.bool)
    kpm[1] = False  # nothing visible at all
    kpm[2, :5] = False  # left padding: causal rows 0..4 of row 2 see nothing
    with backend(name):
        out, lse, mass = flowkern.segment_attention(q, k, v, seg, nseg, causal=causal,
                                                    key_padding_mask=kpm.to(device))
    out, lse, mass = out.cpu(), lse.cpu(), mass.cpu()
    assert torch.isfinite(out).all() and not torch.isnan(mass).any() and not torch.isnan(lse).any()
    assert (out[1] == 0).all() and (mass[1] == 0).all() and torch.isneginf(lse[1]).all()
    if causal:
        assert (out[2, :, :5] == 0).all() and (mass[2, :5] == 0).all() and torch.isneginf(lse[2, :, :5]).all()
        torch.testing.assert_close(mass[2, 5:].sum(-1), torch.ones(sq - 5))
    torch.testing.assert_close(mass[0].sum(-1), torch.ones(sq))


@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_single_segment_has_all_mass_and_out_matches_sdpa(be):
    """An independent oracle for out: torch's SDPA (with a bottom-right causal mask built here)."""
    name, device = be
    b, hq, hkv, sq, sk, d = 2, 4, 4, 7, 19, 64
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, torch.float32, device, seed=3)
    seg = torch.zeros(b, sk, dtype=torch.long, device=device)
    with backend(name):
        out, _, mass = flowkern.segment_attention(q, k, v, seg, 1, causal=True)
    allowed = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq).to(device)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(mass, torch.ones_like(mass))


def test_reference_agrees_with_eager_softmax():
    """The oracle itself against a direct softmax + per-segment sum written here."""
    b, hq, hkv, sq, sk, d, nseg = 2, 6, 3, 5, 11, 32, 3
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, torch.float64, "cpu", seed=11)
    seg = torch.randint(0, nseg, (b, sk))
    kk = k.repeat_interleave(2, dim=1)
    scores = q @ kk.transpose(-1, -2) / d**0.5
    scores = scores.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq), float("-inf"))
    probs = scores.softmax(-1)
    expected = torch.stack(
        [torch.stack([probs[bb][..., seg[bb] == c].sum(-1) for c in range(nseg)], -1) for bb in range(b)]
    )  # [B, Hq, Sq, nseg]
    _, _, mass = reference.segment_attention(q, k, v, seg, nseg, causal=True, per_head=True)
    torch.testing.assert_close(mass, expected)


# ------------------------------------------------------------------------------------------------ properties


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 3), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 4]), sk=st.integers(1, 90),
    sq_frac=st.floats(0.0, 1.0), d=st.sampled_from([8, 16, 48, 64, 80]), nseg=st.integers(1, 8),
    causal=st.booleans(), padding=st.sampled_from(["none", "left", "right", "all"]), seed=st.integers(0, 10_000),
)
def test_cpp_property_shapes(b, hkv, group, sk, sq_frac, d, nseg, causal, padding, seed):
    if not flowkern.ops.cpp_available():
        pytest.skip("flowkern._C not built")
    sq = max(1, round(sq_frac * sk))
    run_case("cpp", "cpu", dtype=torch.float32, heads=(hkv * group, hkv), sq=sq, sk=sk, d=d, causal=causal,
             padding=padding, nseg=nseg, b=b, seed=seed)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.sampled_from([1, 3]), sk=st.integers(1, 50),
    sq_frac=st.floats(0.0, 1.0), d=st.sampled_from([16, 40, 64]), nseg=st.integers(1, 8), causal=st.booleans(),
    padding=st.sampled_from(["none", "left", "right"]), seed=st.integers(0, 10_000),
)
def test_triton_property_shapes(b, hkv, group, sk, sq_frac, d, nseg, causal, padding, seed):
    (name, device), = TRITON.values
    if TRITON.marks:
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    sq = max(1, round(sq_frac * sk))
    run_case(name, device, dtype=torch.float32, heads=(hkv * group, hkv), sq=sq, sk=sk, d=d, causal=causal,
             padding=padding, nseg=nseg, b=b, seed=seed)


# ------------------------------------------------------------------------------------------------ compile


@pytest.mark.parametrize("be", [CPP, pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs CUDA"))])
def test_torch_compile_fullgraph(be):
    name, device = be
    b, hq, hkv, s, d, nseg = 1, 4, 2, 24, 64, 4
    q, k, v = make_qkv(b, hq, hkv, s, s, d, torch.float32, device, seed=5)
    seg = torch.arange(s, device=device).div(7, rounding_mode="floor").clamp(max=nseg - 1)[None]
    kpm = torch.ones(b, s, dtype=torch.bool, device=device)
    kpm[0, :3] = False

    def f(q, k, v, seg, kpm):
        out, lse, mass = flowkern.segment_attention(q, k, v, seg, nseg, key_padding_mask=kpm)
        return out * 2, mass.sum(-1)

    torch._dynamo.reset()
    with backend(name):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = compiled(q, k, v, seg, kpm)
        expected = f(q, k, v, seg, kpm)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
