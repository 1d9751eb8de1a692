"""ADMM with a gradual 2:4 mask (Boža 2024): the weight update of "Fast and Optimal Weight Update".

In this project's normalised coordinates (``W̃``, ``H̃`` with unit diagonal, as the reference
normalises), with the ridge ``H_λ = H̃ + λ mean(diag H̃) I`` (``λ = dampening = 0.1``) and target
``Y = Ŵ̃ H_λ``, the reference code (fmfi-compbio/admm-pruning, ``AdmmPruner.fasterprune``) runs
scaled ADMM on ``min_W ½ tr((W-Ŵ̃) H_λ (W-Ŵ̃)^T) + ι_M(Z)`` s.t. ``W = Z``, for ``t = 0 .. T-1``
(``T = iterations = 20``, ``ρ = 1``, ``W_0 = Ŵ̃``, ``U_0 = 0``):

.. math::
    Z_t = M_t ⊙ (W_t + U_t), \\qquad U_{t+1} = U_t + W_t - Z_t,

    W_{t+1} = (Y + ρ (Z_t - U_{t+1})) (H_λ + ρ I)^{-1},

and returns ``Z_T = M ⊙ (W_T + U_T)``. The mask ``M_t`` grows gradually over the first
``mask_iterations = 15`` iterations: with the cubic schedule

.. math:: s_t = \\tfrac12 - \\tfrac12 (1 - (t+1)/T_M)^3,

the two largest ``|W_t + U_t|`` of every group of 4 are always kept, and of the others the
``⌊s_t · n⌋`` smallest over the whole matrix (``n`` entries) are pruned (a global threshold: the
``(⌊s_t n⌋ + 1)``-th smallest score, ties kept); ``s_{T_M - 1} = ½`` leaves exactly 2:4, which
stays fixed for the remaining iterations. No host syncs: the threshold is a device tensor
(``torch.kthvalue``) and every count is known in advance.

Its losses match the authors' code on real Grams (``tools/bench_solver.py --methods admm``;
docs/results.md has the figures).

Reference: Boža, "Fast and Effective Weight Update for Pruned Large Language Models" (v1: "Fast
and Optimal ..."), 2024 (arXiv:2401.02938); code github.com/fmfi-compbio/admm-pruning
(``lib/admm.py``, called with ``percdamp=0.1`` by ``lib/prune.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.masks import apply_mask, mask_2of4

__all__ = ["admm_prune", "gradual_mask", "sparsity_schedule"]


def sparsity_schedule(t: int, mask_iterations: int, exponent: float = 3.0) -> float:
    """``s_t = ½ - ½ (1 - (t+1)/T_M)^exponent``: the sparsity of the mask at iteration ``t``."""
    return 0.5 - 0.5 * (1 - (t + 1) / mask_iterations) ** exponent


def gradual_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep the top 2 of every group of 4 and prune the ``⌊sparsity · n⌋`` smallest of the rest.

    ``scores`` are ``|W + U|``; the threshold is the ``(⌊sparsity n⌋ + 1)``-th smallest score
    over the whole matrix with the top-2 entries counted as ``+inf`` (the reference's rule: ties
    with the threshold are kept). ``sparsity >= ½`` is exactly 2:4.
    """
    top2 = mask_2of4(scores)
    if sparsity >= 0.5:
        return top2
    k = int(scores.numel() * sparsity)
    if k <= 0:
        return torch.ones_like(top2)
    ranked = torch.where(top2, torch.full_like(scores, float("inf")), scores)
    threshold = torch.kthvalue(ranked.reshape(-1), k + 1).values
    return ranked >= threshold


@torch.no_grad()
def admm_prune(
    w_tilde: Tensor,
    gram: Tensor,
    *,
    iterations: int = 20,
    mask_iterations: int = 15,
    rho: float = 1.0,
    dampening: float = 0.1,
    exponent: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """Boža's ADMM 2:4 pruner in normalised coordinates: ``(weight, mask)``, pruned ``+0.0``.

    Args:
        w_tilde: ``[d_out, d_in]`` dense normalised weight ``Ŵ̃`` (fp32 or fp64).
        gram: ``[d_in, d_in]`` normalised Gram ``H̃``.
        iterations: ADMM iterations ``T`` (20 in the reference).
        mask_iterations: iterations ``T_M`` over which the mask grows to 2:4 (15); 0 fixes the
            Wanda mask ``top2(|Ŵ̃|)`` from the start. With ``iterations < mask_iterations`` the
            mask is not yet 2:4 (for tests; :class:`~.methods.ADMMConfig` refuses it).
        rho: ADMM penalty (1).
        dampening: ridge relative to the mean diagonal of ``H̃`` (0.1, the reference's
            ``percdamp``).
        exponent: exponent of the sparsity schedule (3, cubic).

    Returns:
        ``(Z_T, M)`` (module docstring).
    """
    dtype = w_tilde.dtype
    h = gram.to(dtype).clone()
    h.diagonal().add_(dampening * h.diagonal().mean())
    y = w_tilde @ h
    h.diagonal().add_(rho)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w, u = w_tilde.clone(), torch.zeros_like(w_tilde)
    mask = mask_2of4(w_tilde.abs())
    if iterations == 0:
        return apply_mask(w_tilde, mask), mask
    for t in range(iterations):
        if t < mask_iterations:
            mask = gradual_mask((w + u).abs(), sparsity_schedule(t, mask_iterations, exponent))
        z = apply_mask(w + u, mask)
        u = u + (w - z)
        w = (y + rho * (z - u)) @ hinv
    return apply_mask(w + u, mask), mask
