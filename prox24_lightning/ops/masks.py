"""2:4 masks: vectorised selection from scores, checks, and bit-packing for storage."""

from __future__ import annotations

import torch
from torch import Tensor

from .prox import group_view

__all__ = [
    "mask_2of4",
    "is_2of4",
    "frac_groups_2of4",
    "groups_2of4_fraction",
    "pack_mask",
    "unpack_mask",
    "apply_mask",
]


def mask_2of4(scores: Tensor) -> Tensor:
    """Boolean mask keeping the 2 largest scores in every group of 4 along the last dim.

    Ties are broken towards the lower index (``torch.topk`` on a stable sort), so the mask is
    deterministic. Exactly two entries per group are kept.
    """
    g = group_view(scores)
    # A stable descending sort makes tie-breaking reproducible across devices.
    idx = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros(g.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, idx, True)
    return mask.reshape(scores.shape)


def groups_2of4_fraction(w: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Fraction of groups of 4 with at most two non-zeros, as a 0-d ``dtype`` tensor on ``w``'s
    device (no host read). An exact count divided once: a float32 mean of 0/1 values rounds
    beyond 2^24 groups."""
    nnz = (group_view(w) != 0).sum(-1)
    return (nnz <= 2).sum().to(dtype) / max(nnz.numel(), 1)


def frac_groups_2of4(w: Tensor) -> float:
    """Fraction of groups of 4 with at most two non-zeros (a host read)."""
    return float(groups_2of4_fraction(w)) if w.numel() else 1.0


def is_2of4(w: Tensor) -> bool:
    """True if every group of 4 consecutive entries along the last dim has at most two non-zeros."""
    return bool(((group_view(w) != 0).sum(-1) <= 2).all())


def apply_mask(w: Tensor, mask: Tensor) -> Tensor:
    """``w`` with pruned entries set to ``+0.0`` (``w * mask`` would leave ``-0.0`` behind)."""
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def pack_mask(mask: Tensor) -> Tensor:
    """Bit-pack a boolean mask along its flattened order into ``uint8`` (8 entries per byte)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=mask.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of :func:`pack_mask`."""
    numel = 1
    for s in shape:
        numel *= int(s)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool().reshape(tuple(shape))
