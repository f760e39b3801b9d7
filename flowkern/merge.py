"""Merging removed image tokens into kept ones (``PruneSpec(merge=True)``), as one pure function.

Definition (VisionZip's contextual tokens, Yang et al. CVPR 2025; PruMerge, Shang et al. 2024): rather than
discarding a removed image token, add its information to the kept image token it most resembles. For each sample:

- every removed image token ``r`` (``image & ~keep``) is assigned to the kept image token ``a(r)`` of the same
  sample with the largest cosine similarity of their hidden states (ties: the earlier kept token);
- every kept image token ``t`` becomes the unweighted mean of itself and the tokens assigned to it:
  ``h'_t = (h_t + sum_{r: a(r) = t} h_r) / (1 + |{r: a(r) = t}|)``;
- text tokens, kept image tokens nothing is assigned to, and removed tokens are unchanged (removed rows are about
  to be dropped; their values are returned as they were).

A sample with no kept image token merges nothing. Choices: the papers differ in the details (VisionZip clusters the
remaining tokens around evenly spaced targets and merges each cluster into one new token; PruMerge adds the
neighbours of each kept token weighted by attention); here each removed token goes to one kept token, the same
similarity the ``diversity`` / ``duplicates`` scorers use, and every merged token weighs alike, so the result
depends only on the hidden states and the keep mask.
"""

from __future__ import annotations

import torch

__all__ = ["merge_into_kept"]


def merge_into_kept(hidden: torch.Tensor, keep: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Average each removed image token into its most similar kept image token (see the module docstring).

    Args:
        hidden: ``[B, S, D]`` float hidden states (before the decoder: the input embeddings).
        keep: bool ``[B, S]``: the rows the stage keeps.
        image: bool ``[B, S]``: the image tokens (candidates); padding rows must be False.

    Returns:
        ``[B, S, D]`` in ``hidden``'s dtype (a new tensor): kept image rows replaced by their merged means, every
        other row as in ``hidden``. Similarities and means are computed in ``hidden``'s dtype promoted to at least
        float32.

    Raises:
        ValueError: naming the bad argument (shapes, dtypes).
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a float tensor [B, S, D], got {got}")
    B, S, _ = hidden.shape
    for name, mask in (("keep", keep), ("image", image)):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, S):
            got = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{name} must be a bool tensor [B={B}, S={S}], got {got}")
    keep, image = keep.to(hidden.device), image.to(hidden.device)
    target = image & keep
    removed = image & ~keep
    if not bool((removed.any(dim=1) & target.any(dim=1)).any()):
        return hidden.clone()
    h = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    unit = torch.nn.functional.normalize(h, dim=-1, eps=1e-12)
    sim = unit @ unit.transpose(1, 2)                                      # [B, S (removed), S (kept)]
    sim = sim.masked_fill(~target[:, None, :], float("-inf"))
    assign = sim.argmax(dim=2)                                             # first maximum: the earlier kept token
    moves = removed & target.any(dim=1, keepdim=True)                      # rows that merge somewhere
    weight = moves.to(h.dtype)
    sums = h.clone()
    sums.scatter_add_(1, assign[..., None].expand_as(h), h * weight[..., None])
    counts = torch.ones(B, S, dtype=h.dtype, device=h.device)
    counts.scatter_add_(1, assign, weight)
    merged = sums / counts[..., None]
    return torch.where(target[..., None], merged, h).to(hidden.dtype)
