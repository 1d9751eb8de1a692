"""Baseline 2:4 pruners in normalised coordinates: magnitude, Wanda and SparseGPT.

Each takes the dense normalised weight ``Ŵ̃`` (and for SparseGPT the normalised Gram ``H̃``) and
returns ``(weight, mask)`` in normalised coordinates, with pruned entries ``+0.0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.masks import apply_mask, mask_2of4

__all__ = ["magnitude_prune", "wanda_prune", "sparsegpt_prune"]


def magnitude_prune(w_tilde: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Keep the two largest ``|W|`` of each group (original coordinates: ``W = W̃ / d``)."""
    mask = mask_2of4((w_tilde / scale).abs())
    return apply_mask(w_tilde, mask), mask


def wanda_prune(w_tilde: Tensor) -> tuple[Tensor, Tensor]:
    """Keep the two largest Wanda scores ``|W_ij| sqrt(H_jj) = |W̃_ij|`` of each group.

    Reference: Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
    ICLR 2024.
    """
    mask = mask_2of4(w_tilde.abs())
    return apply_mask(w_tilde, mask), mask


@torch.no_grad()
def sparsegpt_prune(
    w_tilde: Tensor, gram: Tensor, *, blocksize: int = 128, dampening: float = 0.01
) -> tuple[Tensor, Tensor]:
    """SparseGPT 2:4 with OBS updates, as the reference implementation (IST-DASLab/sparsegpt).

    Columns are processed left to right in blocks of ``blocksize``. At the start of every group of
    4 columns the mask is chosen lazily from the *already updated* weights with score
    ``w^2 / U_jj^2``, where ``U`` is the upper Cholesky factor of ``H^{-1}``; each pruned weight's
    error is then spread over the remaining columns (within the block immediately, across blocks
    lazily). Runs on ``H̃`` with dampening ``dampening * mean(diag H̃)`` (1% of the unit diagonal).

    Reference: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot", ICML 2023.

    Raises:
        torch.linalg.LinAlgError: if the dampened Gram is not positive definite (never replaced by
            an identity fallback).
    """
    w = w_tilde.clone().float()
    rows, cols = w.shape
    h = gram.float().clone()
    h.diagonal().add_(dampening * float(h.diagonal().mean()))
    chol = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(chol)
    u = torch.linalg.cholesky(hinv, upper=True)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        m1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % 4 == 0:
                score = w1[:, i : i + 4].square() / torch.diagonal(u1)[i : i + 4].square()
                m1[:, i : i + 4] = mask_2of4(score)
            d = u1[i, i]
            q = torch.where(m1[:, i], w1[:, i], torch.zeros_like(w1[:, i]))
            q1[:, i] = q
            err = (w1[:, i] - q) / d
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = q1
        mask[:, i1:i2] = m1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return apply_mask(w.to(w_tilde.dtype), mask), mask
