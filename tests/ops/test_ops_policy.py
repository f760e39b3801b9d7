"""The ops' shared policies (flowkern/ops.py module docstring), on every backend.

- NaN/inf propagate as in SDPA: a row with a NaN/+inf score at a visible key gets out, lse and mass NaN (and adds
  NaN to exactly the keys it sees in key_attention_mass); never a "masked row". A -inf score weighs 0. Non-finite
  q/k at keys a row cannot see are ignored; v never touches lse or mass.
- Unchecked segment ids (validate=False, torch.compile) are clamped into [0, num_segments); attention ignores them.
- Forward-only: inputs that require grad (grad enabled) raise ValueError.
- causal / per_head / validate must be bools.

Small shapes that still cross several 16 x 16 tiles of the Triton interpreter and GQA (Hq = 2 Hkv).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowkern
from tests.fixtures import ALL_BACKENDS, CPP, REFERENCE, TRITON, backend, make_qkv

B, HQ, HKV, S, D, NSEG = 2, 4, 2, 20, 16, 3
NAN, INF = float("nan"), float("inf")


def _seg(b: int = B, s: int = S) -> torch.Tensor:
    return (torch.arange(s) * NSEG // s).expand(b, s).contiguous()


def _kpm() -> torch.Tensor:
    """Batch 0 unpadded, batch 1 left-padded (keys 0..2) and with a hole at key 11."""
    kpm = torch.ones(B, S, dtype=torch.bool)
    kpm[1, :3] = False
    kpm[1, 11] = False
    return kpm


def _visible(causal: bool, kpm: torch.Tensor | None, sq: int = S, sk: int = S) -> torch.Tensor:
    """bool [B, 1, Sq, Sk]: row i sees key j."""
    return flowkern.reference.visible_mask(sq, sk, causal=causal, key_padding_mask=kpm, device=torch.device("cpu"))


def _run(be, q, k, v, seg=None, *, causal=True, kpm=None, validate=True):
    """(out, lse, per-head mass, per-head key mass from all rows) on CPU."""
    name, device = be
    seg = _seg(q.shape[0], k.shape[2]) if seg is None else seg
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    with backend(name):
        out, lse, mass = flowkern.segment_attention(
            dev(q), dev(k), dev(v), dev(seg), NSEG, causal=causal, key_padding_mask=dev(kpm), per_head=True,
            validate=validate,
        )
        km = flowkern.key_attention_mass(dev(q), dev(k), lse, causal=causal, key_padding_mask=dev(kpm),
                                         per_head=True)
    return out.cpu(), lse.cpu(), mass.cpu(), km.cpu()


def _qkv(seed: int = 0, dtype: torch.dtype = torch.float32):
    return make_qkv(B, HQ, HKV, S, S, D, dtype, "cpu", seed=seed)


def _same(got: torch.Tensor, ref: torch.Tensor, where: torch.Tensor) -> None:
    """got == ref (to float tolerance; -inf lse of dead rows included) wherever ``where``; no NaN there."""
    where = where.expand_as(got)
    assert not ref[where].isnan().any() and not got[where].isnan().any(), "a value that must not be NaN is"
    torch.testing.assert_close(got[where], ref[where], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ NaN / inf


@pytest.mark.parametrize("causal,dtype", [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)],
                         ids=["causal", "full", "causal-bf16"])
@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_nan_in_q_row_gives_a_nan_row(be, causal, dtype):
    q, k, v = _qkv(1, dtype)
    kpm = _kpm()
    clean = _run(be, q, k, v, causal=causal, kpm=kpm)
    b, h, i = 1, 3, 7
    q[b, h, i, 2] = NAN
    out, lse, mass, km = _run(be, q, k, v, causal=causal, kpm=kpm)

    bad = torch.zeros(B, HQ, S, dtype=torch.bool)
    bad[b, h, i] = True
    assert out[b, h, i].isnan().all() and lse[b, h, i].isnan() and mass[b, h, i].isnan().all()
    _same(out.float(), clean[0].float(), ~bad[..., None])
    _same(lse, clean[1], ~bad)
    _same(mass, clean[2], ~bad[..., None])
    # head mean: the NaN row's mean is NaN, not a smaller "partly masked" row
    with backend(be[0]):
        mean = flowkern.segment_attention(q.to(be[1]), k.to(be[1]), v.to(be[1]), _seg().to(be[1]), NSEG,
                                          causal=causal, key_padding_mask=kpm.to(be[1]))[2].cpu()
    assert mean[b, i].isnan().all() and torch.isfinite(mean[0]).all()
    # key_attention_mass: NaN at exactly the keys row i sees; the other keys (causal future, padding) unchanged
    seen = _visible(causal, kpm)[b, 0, i]
    assert km[b, h, seen].isnan().all()
    other = torch.ones(B, HQ, S, dtype=torch.bool)
    other[b, h] = ~seen
    _same(km, clean[3], other)
    assert (km[1, :, ~kpm[1]] == 0).all(), "padded keys receive exactly 0"


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_nonfinite_k_at_a_visible_key_poisons_the_rows_that_see_it(be, value):
    q, k, v = _qkv(2)
    kpm = _kpm()
    clean = _run(be, q, k, v, kpm=kpm)
    b, hk, j = 1, 0, 5  # kv head 0 serves query heads 0 and 1
    k[b, hk, j] = value  # every score against key j is NaN (inf * mixed signs) on every row that sees it
    out, lse, mass, _ = _run(be, q, k, v, kpm=kpm)

    bad = torch.zeros(B, HQ, S, dtype=torch.bool)
    bad[b, :2, j:] = True  # causal: rows i >= j see key j
    assert out[bad].isnan().all() and lse[bad].isnan().all() and mass[bad].isnan().all()
    _same(out, clean[0], ~bad[..., None])
    _same(lse, clean[1], ~bad)
    _same(mass, clean[2], ~bad[..., None])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_nonfinite_q_k_at_keys_a_row_cannot_see_are_ignored(be, causal):
    q, k, v = _qkv(3)
    kpm = _kpm()
    clean = _run(be, q, k, v, causal=causal, kpm=kpm)
    k[1, :, :3] = NAN  # left padding
    k[1, 0, 11] = -INF  # a padded hole
    k[1, 1, 11] = NAN
    out, lse, mass, km = _run(be, q, k, v, causal=causal, kpm=kpm)
    everywhere = torch.ones(B, HQ, S, 1, dtype=torch.bool)
    for got, ref in zip((out, lse, mass, km), clean, strict=True):
        _same(got, ref, everywhere if got.dim() == 4 else everywhere[..., 0])


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_nonfinite_v_reaches_out_only(be, value):
    q, k, v = _qkv(4)
    kpm = _kpm()
    clean = _run(be, q, k, v, kpm=kpm)
    b, hk, j, d = 1, 1, 6, 3
    v[b, hk, j, d] = value
    v[1, :, :3] = NAN  # padded keys: may reach out (documented), never lse or mass
    out, lse, mass, km = _run(be, q, k, v, kpm=kpm)
    rows = torch.zeros(B, HQ, S, dtype=torch.bool)
    rows[b, 2:, j:] = True  # query heads 2, 3 use kv head 1; causal rows i >= j see key j
    assert (~torch.isfinite(out[..., d][rows])).all()
    assert (out[1, :, :3] == 0).all(), "rows that see only padding keep out 0 whatever the padded v holds"
    _same(out, clean[0], torch.zeros(B, HQ, S, 1, dtype=torch.bool).index_fill_(0, torch.tensor([0]), True))
    _same(lse, clean[1], torch.ones(B, HQ, S, dtype=torch.bool))
    _same(mass, clean[2], torch.ones(B, HQ, S, 1, dtype=torch.bool))
    _same(km, clean[3], torch.ones(B, HQ, S, dtype=torch.bool))


@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_minus_inf_score_weighs_zero_like_a_padded_key(be):
    """A -inf score (from -inf inputs) is a zero weight, as in SDPA; a row whose visible scores are all -inf is
    a row with no visible key (out 0, lse -inf, mass 0), exactly as if those keys were padded."""
    q, k, v = make_qkv(1, 2, 1, S, S, D, torch.float32, "cpu", seed=5)
    q[..., 0] = q[..., 0].abs() + 0.1
    k_poisoned = k.clone()
    for j in (0, 4):
        k_poisoned[0, 0, j] = 0.0
        k_poisoned[0, 0, j, 0] = -INF  # score = -inf * positive + 0 * finite = -inf for every row
    kpm = torch.ones(1, S, dtype=torch.bool)
    kpm[0, [0, 4]] = False
    seg = _seg(1)
    got = _run(be, q, k_poisoned, v, seg)
    want = _run(be, q, k, v, seg, kpm=kpm)
    assert (got[0][0, :, 0] == 0).all() and (got[1][0, :, 0] == -INF).all() and (got[2][0, :, 0] == 0).all()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("be", [TRITON])
def test_triton_split_k_and_gqa_packing_keep_nan_rows(be):
    """The split-K combine kernel and the GQA-packed launch follow the same policy."""
    from flowkern.kernels.segment_attention import segment_attention_fwd

    q, k, v = make_qkv(1, HQ, HKV, 2, 64, D, torch.float32, "cpu", seed=6)
    ids = _seg(1, 64).to(torch.int32)
    ids[0, 40:] = -1
    q[0, 1, 1, 0] = NAN
    for kw in (dict(num_splits=3, pack_gqa=False), dict(num_splits=3, pack_gqa=True), dict(num_splits=1)):
        out, lse, mass = segment_attention_fwd(q, k, v, ids, NSEG, True, D**-0.5, **kw)
        assert out[0, 1, 1].isnan().all() and lse[0, 1, 1].isnan() and mass[0, 1, 1].isnan().all(), kw
        ok = torch.ones(1, HQ, 2, dtype=torch.bool)
        ok[0, 1, 1] = False
        assert torch.isfinite(out[ok]).all() and torch.isfinite(lse[ok]).all(), kw
        torch.testing.assert_close(mass[ok].sum(-1), torch.ones(int(ok.sum())))


# ------------------------------------------------------------------------------------------------ segment ids


def _bad_ids() -> torch.Tensor:
    seg = _seg().clone()
    seg[0, 0] = -1
    seg[0, 5] = -7
    seg[0, 9] = NSEG
    seg[1, 12] = 99
    seg[1, 19] = 2**40  # would wrap in a plain int32 cast
    seg[1, 4] = -(2**40)
    return seg


@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_unchecked_segment_ids_are_clamped_and_never_change_attention(be):
    q, k, v = _qkv(7)
    kpm = _kpm()
    seg = _bad_ids()
    got = _run(be, q, k, v, seg, kpm=kpm, validate=False)
    want = _run(be, q, k, v, seg.clamp(0, NSEG - 1), kpm=kpm)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    zeros = _run(be, q, k, v, torch.zeros_like(seg), kpm=kpm)  # the ids never hide a key (-1 used to)
    torch.testing.assert_close(got[0], zeros[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], zeros[1], rtol=1e-5, atol=1e-6)
    alive = got[1] > -INF  # batch 1's first rows see only padding (causal): mass 0
    assert (~alive).sum() == HQ * 3 and (got[2][~alive] == 0).all()
    torch.testing.assert_close(got[2].sum(-1)[alive], torch.ones(int(alive.sum())), rtol=0, atol=1e-5)


@pytest.mark.parametrize("be", [CPP])
def test_unchecked_segment_ids_under_torch_compile(be):
    """Under torch.compile the range check is skipped even with validate=True: the clamp still applies."""
    q, k, v = _qkv(8)
    seg = _bad_ids()

    def f(q, k, v, seg):
        return flowkern.segment_attention(q, k, v, seg, NSEG)

    torch._dynamo.reset()
    with backend(be[0]):
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, seg)
        want = f(q, k, v, seg.clamp(0, NSEG - 1))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ forward only


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_segment_attention_refuses_inputs_that_require_grad(name):
    x = dict(zip("qkv", _qkv(9), strict=True))
    x[name].requires_grad_(True)
    with pytest.raises(ValueError, match=rf"^{name} requires grad.*forward-only.*no_grad.*detach.*scaled_dot_product"):
        flowkern.segment_attention(x["q"], x["k"], x["v"], _seg(), NSEG)
    with torch.no_grad():
        out, _, _ = flowkern.segment_attention(x["q"], x["k"], x["v"], _seg(), NSEG)
    with torch.inference_mode():
        flowkern.segment_attention(x["q"], x["k"], x["v"], _seg(), NSEG)
    detached = {n: t.detach() for n, t in x.items()}
    out2, _, _ = flowkern.segment_attention(detached["q"], detached["k"], detached["v"], _seg(), NSEG)
    assert not out2.requires_grad and torch.equal(out, out2)


@pytest.mark.parametrize("name", ["q", "k", "lse"])
def test_key_attention_mass_refuses_inputs_that_require_grad(name):
    q, k, v = _qkv(10)
    with torch.no_grad():
        _, lse, _ = flowkern.segment_attention(q, k, v, _seg(), NSEG)
    x = dict(q=q, k=k, lse=lse)
    x[name].requires_grad_(True)
    with pytest.raises(ValueError, match=rf"^{name} requires grad.*forward-only"):
        flowkern.key_attention_mass(x["q"], x["k"], x["lse"])
    with torch.no_grad():
        flowkern.key_attention_mass(x["q"], x["k"], x["lse"])


def test_grad_error_under_torch_compile():
    q, k, v = _qkv(11)
    q.requires_grad_(True)

    def f(q, k, v):
        return flowkern.segment_attention(q, k, v, _seg(), NSEG)[0]

    torch._dynamo.reset()
    with pytest.raises(Exception, match="q requires grad.*forward-only"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)


# ------------------------------------------------------------------------------------------------ bool flags


@pytest.mark.parametrize("flag,value", [("causal", "no"), ("causal", 1), ("causal", None), ("per_head", "yes"),
                                        ("validate", "no"), ("validate", 0)])
def test_flags_must_be_bools(flag, value):
    q, k, v = _qkv(12)
    with pytest.raises(ValueError, match=rf"^{flag} must be a bool"):
        flowkern.segment_attention(q, k, v, _seg(), NSEG, **{flag: value})
    if flag != "validate":
        with torch.no_grad():
            _, lse, _ = flowkern.segment_attention(q, k, v, _seg(), NSEG)
        with pytest.raises(ValueError, match=rf"^{flag} must be a bool"):
            flowkern.key_attention_mass(q, k, lse, **{flag: value})


def test_numpy_bools_are_bools():
    q, k, v = _qkv(13)
    a = flowkern.segment_attention(q, k, v, _seg(), NSEG, causal=np.bool_(False))
    b = flowkern.segment_attention(q, k, v, _seg(), NSEG, causal=False)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("be", [REFERENCE])
def test_causal_no_is_not_causal_true(be):
    """The issue's case: causal="no" used to mean causal; now it is refused, and causal=False is non-causal."""
    q, k, v = _qkv(14)
    with backend(be[0]), pytest.raises(ValueError, match="causal"):
        flowkern.segment_attention(q, k, v, _seg(), NSEG, causal="no")
