"""Triton kernels with segment tables, windows and groups vs the float64 dense-mask oracle (flowkern.reference).

Runs the launchers directly (the internal interface: key ids with ``-1 - s`` for padded keys, the table as bits,
the span of every position), on tiny CPU tensors under ``TRITON_INTERPRET=1`` (16 x 16 tiles there), for what is
specific to the Triton side: rules crossing query / key block boundaries, the split-K decode path and its
combine, GQA packing, the new padding encoding, 16-bit inputs, rows with no visible key, and the block skip
itself (a count of the blocks each program visits, and NaN poison in keys no visited block holds).
"""

from __future__ import annotations

import pytest
import torch

from flowkern import reference
from tests.fixtures import INTERPRET, TOL

pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
D = 16
INF = float("inf")


def _span(sk: int, causal: bool, window: int, groups: torch.Tensor | None, b: int) -> torch.Tensor:
    """int32 [B, 2, Sk]: the tightest span of each position under the causal / window / group rules."""
    p = torch.arange(sk)[:, None]
    j = torch.arange(sk)[None, :]
    near = (j <= p) if causal else torch.ones(sk, sk, dtype=torch.bool)
    if window:
        near = near & (p - j < window)
    near = near[None].expand(b, sk, sk)
    if groups is not None:
        g = groups.cpu().long()
        near = near | ((g[:, :, None] == g[:, None, :]) & (g != 0)[:, :, None])
    idx = torch.arange(sk)
    lo = torch.where(near, idx, sk).amin(-1)
    hi = torch.where(near, idx + 1, 0).amax(-1)
    return torch.stack([lo, hi], 1).to(torch.int32).contiguous()


def _bits(allowed: torch.Tensor) -> torch.Tensor:
    """bool [nseg, nseg] -> int32 [nseg], bit t of row s = allowed[s, t]."""
    w = 2 ** torch.arange(allowed.shape[1], dtype=torch.int64)
    return (allowed.long() * w).sum(1).to(torch.int32)


class Case:
    """Random inputs of one visibility scenario, the kernel's arguments and the float64 oracle."""

    def __init__(self, *, b: int = 1, hq: int = 2, hkv: int = 1, sq: int, sk: int, nseg: int = 3,
                 causal: bool = True, window: int = 0, groups: list[tuple[int, int, int, int]] = (),
                 allowed: torch.Tensor | None = None, pad: float = 0.0, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.q = torch.randn(b, hq, sq, D, generator=g).to(dtype)
        self.k = torch.randn(b, hkv, sk, D, generator=g).to(dtype)
        self.v = torch.randn(b, hkv, sk, D, generator=g).to(dtype)
        self.seg = torch.randint(0, nseg, (b, sk), generator=g)
        self.kpm = torch.rand(b, sk, generator=g) >= pad
        self.groups = None
        if groups:
            self.groups = torch.zeros(b, sk, dtype=torch.int64)
            for bb, lo, hi, gid in groups:  # (batch, first, one past last, group id)
                self.groups[bb, lo:hi] = gid
        self.nseg, self.causal, self.window, self.allowed = nseg, causal, window, allowed
        self.key_ids = torch.where(self.kpm, self.seg, -1 - self.seg).to(torch.int32)  # -1 - s: padded

    def args(self) -> dict:
        """The internal interface's visibility arguments."""
        has_span = self.window > 0 or self.groups is not None
        return dict(allowed=None if self.allowed is None else _bits(self.allowed), window=self.window,
                    group_ids=None if self.groups is None else self.groups.to(torch.int32),
                    span=_span(self.k.shape[2], self.causal, self.window, self.groups, self.k.shape[0])
                    if has_span else None)

    def rules(self) -> dict:
        return dict(causal=self.causal, key_padding_mask=self.kpm, scale=D**-0.5, allowed=self.allowed,
                    window=self.window or None, group_ids=self.groups)

    def oracle(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return reference.segment_attention(self.q.double(), self.k.double(), self.v.double(), self.seg, self.nseg,
                                           per_head=True, **self.rules())

    def run(self, **kw: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from flowkern.kernels.segment_attention import segment_attention_fwd

        t = [x.to(DEV) for x in (self.q, self.k, self.v, self.key_ids)]
        a = {n: (x.to(DEV) if isinstance(x, torch.Tensor) else x) for n, x in self.args().items()}
        out = segment_attention_fwd(*t, self.nseg, self.causal, D**-0.5, a["allowed"], a["window"], a["group_ids"],
                                    a["span"], **kw)
        return tuple(x.cpu() for x in out)

    def run_mass(self, lse: torch.Tensor, **kw: object) -> torch.Tensor:
        from flowkern.kernels.key_attention_mass import key_attention_mass_fwd

        a = {n: (x.to(DEV) if isinstance(x, torch.Tensor) else x) for n, x in self.args().items()}
        return key_attention_mass_fwd(self.q.to(DEV), self.k.to(DEV), lse.float().to(DEV), self.key_ids.to(DEV),
                                      self.causal, D**-0.5, a["allowed"], a["window"], a["group_ids"], a["span"],
                                      **kw).cpu()

    def oracle_mass(self, lse: torch.Tensor) -> torch.Tensor:
        return reference.key_attention_mass(self.q.double(), self.k.double(), lse.double(), per_head=True,
                                            segment_ids=self.seg, **self.rules())


def _check(case: Case, got: tuple, want: tuple | None = None) -> None:
    want = case.oracle() if want is None else want
    tol = TOL[case.q.dtype]
    out, lse, mass = got
    assert torch.isfinite(out).all() and not lse.isnan().any() and torch.isfinite(mass).all()
    torch.testing.assert_close(out.double(), want[0].double(), rtol=tol["out"], atol=tol["out"])
    torch.testing.assert_close(lse.double(), want[1], rtol=tol["lse"], atol=tol["lse"])
    torch.testing.assert_close(mass.double(), want[2], rtol=tol["mass"], atol=tol["mass"])


def _check_mass(case: Case) -> None:
    lse = case.oracle()[1]
    got = case.run_mass(lse)
    assert torch.isfinite(got).all()
    atol = 1e-6 if case.q.dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.double(), case.oracle_mass(lse), rtol=atol, atol=atol)


TABLE = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
DEAD = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)  # segment 1 sees nothing
CROSSING = [(0, 10, 37, 1), (0, 40, 58, 2)]  # groups crossing 16-row / 16-key block boundaries

SCENARIOS = {
    "groups": dict(sq=48, sk=64, groups=CROSSING),
    "window-5": dict(sq=48, sk=64, window=5, pad=0.1),
    "window-20-noncausal": dict(sq=48, sk=48, window=20, causal=False),
    "window-1": dict(sq=40, sk=40, window=1),
    "window>Sk": dict(sq=40, sk=40, window=100, pad=0.1),
    "groups+window+table": dict(sq=48, sk=64, window=7, groups=CROSSING, allowed=TABLE, pad=0.2),
    "groups-noncausal+table": dict(sq=40, sk=40, causal=False, groups=[(0, 3, 30, 5)], allowed=TABLE),
    "table+padding": dict(sq=40, sk=56, allowed=TABLE, pad=0.3),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_rules_across_blocks(name: str) -> None:
    case = Case(**SCENARIOS[name], seed=1)
    _check(case, case.run())
    _check_mass(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype: torch.dtype) -> None:
    case = Case(sq=32, sk=48, window=9, groups=[(0, 20, 41, 3)], allowed=TABLE, pad=0.1, dtype=dtype, seed=2)
    _check(case, case.run())
    _check_mass(case)


@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("pack", [False, True])
def test_split_k_decode(splits: int, pack: bool) -> None:
    """Sq = 1 over a long key range, in several forced splits: each split intersects the span on its own."""
    case = Case(b=2, hq=4, hkv=2, sq=1, sk=200, window=37, groups=[(0, 150, 199, 1), (1, 60, 200, 2)],
                allowed=TABLE, pad=0.2, seed=3)
    _check(case, case.run(num_splits=splits, pack_gqa=pack))
    if splits == 1 and not pack:
        _check_mass(case)


@pytest.mark.parametrize("scenario", ["window", "groups"])
def test_split_k_chunk_gqa(scenario: str) -> None:
    """A few rows (GQA-packed), split-K: with a window the splits divide the span's width, not Sk."""
    kw = dict(window=30) if scenario == "window" else dict(groups=[(0, 5, 90, 1)])
    case = Case(hq=6, hkv=2, sq=5, sk=150, allowed=DEAD, pad=0.1, seed=4, **kw)
    for splits in (2, 5):
        _check(case, case.run(num_splits=splits, pack_gqa=True))
    _check_mass(case)


@pytest.mark.parametrize("pack", [False, True])
def test_gqa(pack: bool) -> None:
    case = Case(b=2, hq=4, hkv=2, sq=20, sk=40, window=6, groups=[(0, 8, 30, 1), (1, 0, 17, 4)], allowed=TABLE,
                pad=0.1, seed=5)
    _check(case, case.run(pack_gqa=pack))
    _check_mass(case)


def test_padding_encoding_uses_the_padded_rows_segment() -> None:
    """A padded key of segment s is -1 - s: invisible everywhere, and a row standing on it uses table row s."""
    case = Case(sq=24, sk=24, nseg=3, allowed=TABLE, seed=6)
    case.seg[0, :] = 2
    case.seg[0, ::3] = 0
    case.kpm[0, 20:] = False  # rows 20..23 stand on padded keys of segment 2 (key id -3)
    case.key_ids = torch.where(case.kpm, case.seg, -1 - case.seg).to(torch.int32)
    assert (case.key_ids[0, 20:] < -1).any()
    got = case.run()
    _check(case, got)
    _check_mass(case)
    assert (got[2][0, :, 20:, 1] == 0).all()  # segment 2 never sees segment 1


def test_all_false_rows() -> None:
    """Rows of a segment whose table row is all false: out 0, mass 0, lse -inf, no NaN; whole query blocks of
    them visit no key block (and their keys' mass is 0)."""
    case = Case(sq=48, sk=48, allowed=DEAD, window=10, pad=0.1, seed=7)
    case.seg[0, 16:32] = 1  # query block 1 (rows 16..31) is all segment 1
    case.key_ids = torch.where(case.kpm, case.seg, -1 - case.seg).to(torch.int32)
    visits = torch.full((3 * 2,), -1, dtype=torch.int32)
    got = case.run(visits=visits)
    _check(case, got)
    dead = case.seg[0] == 1
    assert (got[0][0][:, dead] == 0).all() and (got[1][0][:, dead] == -INF).all() and (got[2][0][:, dead] == 0).all()
    assert visits.view(2, 3)[:, 1].eq(0).all() and visits.view(2, 3)[:, 0].gt(0).all()
    _check_mass(case)


def test_all_true_table_equals_no_table() -> None:
    case = Case(b=2, hq=4, hkv=2, sq=20, sk=40, pad=0.2, seed=8)
    plain = case.run()
    case.allowed = torch.ones(3, 3, dtype=torch.bool)
    table = case.run()
    for a, b in zip(plain, table, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    _check(case, table)


def test_window_skips_key_blocks() -> None:
    """Each query block visits exactly the key blocks its rows' span meets; NaN in v of the keys no visited block
    holds cannot reach the output, while in a visited block it does (the poison test is sensitive)."""
    case = Case(sq=64, sk=64, window=4, seed=9)
    case.v[0, 0, :16] = float("nan")  # key block 0
    visits = torch.full((4 * 2,), -1, dtype=torch.int32)
    out, lse, mass = case.run(visits=visits)
    # query block m covers positions 16m..16m+15, span [16m - 3, 16m + 16): blocks m-1 and m (block 0: one)
    assert visits.view(2, 4).tolist() == [[1, 2, 2, 2]] * 2
    assert torch.isfinite(out[0, :, 32:]).all()  # query blocks 2, 3 never load key block 0
    assert out[0, :, 16:32].isnan().all()  # block 1 visits key block 0: its weight 0 still meets the NaN
    want = Case(sq=64, sk=64, window=4, seed=9).oracle()
    torch.testing.assert_close(out[0, :, 32:].double(), want[0][0, :, 32:], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(mass.double(), want[2], rtol=1e-5, atol=1e-5)  # mass never reads v


def test_groups_widen_the_visited_range() -> None:
    """A group reaching past the causal diagonal: its rows' blocks visit the key blocks ahead of them."""
    case = Case(sq=64, sk=64, window=3, groups=[(0, 5, 45, 1)], seed=10)
    visits = torch.full((4 * 2,), -1, dtype=torch.int32)
    _check(case, case.run(visits=visits))
    # block 0: rows 5..15 see the group up to key 44 -> key blocks 0..2; block 1: 13..44 -> 0..2;
    # block 2: span [5, 48) -> 0..2; block 3: [46, 64) -> 2..3
    assert visits.view(2, 4).tolist() == [[3, 3, 3, 2]] * 2


def test_split_visits_follow_the_span() -> None:
    """Split-K with a window: the splits divide the span (not [0, Sk)), so every split has work."""
    case = Case(hq=2, hkv=1, sq=1, sk=256, window=40, seed=11)
    visits = torch.full((2,), -1, dtype=torch.int32)
    _check(case, case.run(num_splits=2, pack_gqa=True, visits=visits))
    # span [216, 256), from key block 13: at most 40 + 15 keys -> two splits of 32 keys: blocks 13-14, then 15
    assert visits.tolist() == [2, 1]


def test_key_mass_skips_query_blocks() -> None:
    """key_attention_mass visits, per key block, only query blocks whose rows' spans meet it (table rows not
    all false)."""
    from flowkern.kernels.key_attention_mass import key_attention_mass_fwd  # noqa: F401 (import check)

    case = Case(sq=64, sk=64, window=4, allowed=DEAD, seed=12)
    case.seg[0, 48:] = 1  # query block 3: all segment 1, sees nothing
    case.key_ids = torch.where(case.kpm, case.seg, -1 - case.seg).to(torch.int32)
    lse = case.oracle()[1]
    visits = torch.full((4 * 1,), -1, dtype=torch.int32)
    got = case.run_mass(lse, visits=visits)
    torch.testing.assert_close(got.double(), case.oracle_mass(lse), rtol=1e-6, atol=1e-6)
    # key block n is seen by rows 16n..16n+18 -> query blocks n, n+1; block 3 is dead
    assert visits.tolist() == [2, 2, 1, 0]


@pytest.mark.parametrize("sq", [1, 5])
def test_key_mass_decode_rows(sq: int) -> None:
    case = Case(b=2, hq=4, hkv=2, sq=sq, sk=100, window=20, groups=[(0, 30, 99, 1)], allowed=TABLE, pad=0.1,
                seed=13)
    _check_mass(case)


def test_features_off_matches_reference() -> None:
    """No table, window or groups (today's path), with the new padding encoding."""
    case = Case(b=2, hq=4, hkv=2, sq=20, sk=40, pad=0.3, seed=14)
    _check(case, case.run())
    _check_mass(case)
