"""The attention each key receives on average from *chosen* query rows, from one
:func:`flowkern.ops.key_attention_mass` pass over every row (used by the ``"flowkern"`` attention's row events and by
the pre-RoPE scorer of :mod:`flowkern.hf.scoring`).

With ``P_h[i, j] = exp(q_i . k_j * scale - lse_i)`` (row i's softmax over the keys it sees) and ``C_b`` the chosen rows
of sample b, the result is ``mean_h (1 / |C_b|) sum_{i in C_b} P_h[i, j]``. An unchosen row gets ``lse = -inf``, so it
contributes 0 to the op's mean over the rows from the batch's first chosen one on, which is then rescaled by their
count over ``|C_b|`` (0 where ``C_b`` is empty).
"""

from __future__ import annotations

from typing import Any

import torch

from flowkern import ops

__all__ = ["chosen_key_mass"]


def chosen_key_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, key_rows: torch.Tensor,
                     keymap: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
    """float32 ``[B, Sk]``: the key mass (:func:`flowkern.ops.key_attention_mass`) averaged over the heads and over
    the query rows ``key_rows`` chooses, in one pass over the rows from the first chosen one on: an unchosen row gets
    ``lse = -inf`` (it then contributes 0) and the mean over those rows is rescaled by their count over ``chosen_b``.

    Args:
        q: ``[B, Hq, Sq, D]`` the call's query rows (row i at key position ``i + Sk - Sq``); k: ``[B, Hkv, Sk, D]``;
            lse: float32 ``[B, Hq, Sq]`` their LSE.
        key_rows: bool ``[B, T]`` over token positions; keymap: int64 ``[B, Sk]`` token position of each key
            (-1 = hidden) or None (key j = token position ``j + T - Sk``).
        kwargs: the visibility arguments of :func:`flowkern.ops.key_attention_mass` that produced ``lse``.
    """
    sq, sk = q.shape[2], k.shape[2]
    rows = key_rows.to(q.device)
    if keymap is not None:
        on_keys = rows.gather(1, keymap.clamp(min=0).to(q.device)) & (keymap >= 0).to(q.device)
    elif rows.shape[1] >= sk:
        on_keys = rows[:, rows.shape[1] - sk:]
    else:
        raise RuntimeError(f"key_rows covers {rows.shape[1]} token positions but the layer has {sk} keys")
    chosen = on_keys[:, sk - sq:]
    start = int(torch.nonzero(chosen.any(dim=0))[0]) if bool(chosen.any()) else sq - 1
    # the op takes the last rows of the sequence: rows before the first chosen one need not be computed
    q, lse, chosen, sq = q[:, :, start:], lse[:, :, start:], chosen[:, start:], sq - start
    lse = lse.masked_fill(~chosen[:, None, :], float("-inf"))
    mass = ops.key_attention_mass(q, k, lse, **kwargs)
    return mass * (sq / chosen.sum(dim=1).clamp(min=1).to(mass.dtype))[:, None]
