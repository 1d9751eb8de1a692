"""Conjugate gradients on a fixed 2:4 support: the one masked CG of the package.

For a fixed mask ``M`` the local problem ``min_X tr((X - T) G (X - T)^T)`` over ``X`` supported on
``M`` splits into independent rows that share ``G``: row ``i`` solves ``(G x_i)_P = (G t_i)_P`` on
its support ``P``. CG runs on every row at once; every scalar (``alpha``, ``beta``, ``r^T r``) is
per row, so one step is one GEMM ``M ⊙ (D G)`` for all rows and no host sync. Entries off the mask
stay exactly ``+0.0``.

The prox method's refinement (``refine: cg``, one step per optimizer step) and ALPS's PCG refit
(a fixed number of steps, identity preconditioner, as the reference's ``cg_batch``) both run it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import apply_mask

__all__ = ["MaskedCG", "masked_cg"]


@dataclass
class MaskedCG:
    """The state of row-wise CG on a fixed support: residual ``r``, direction ``d`` and
    ``rr = ||r||^2`` per row (``[d_out, 1]``).

    Start it with the residual ``M ⊙ (G t - G x)`` of the starting point; how it is computed is
    the caller's choice (``-(x - t) G`` avoids the cancellation of ``t G - x G`` near the
    optimum).
    """

    r: Tensor
    d: Tensor
    rr: Tensor

    @classmethod
    def start(cls, residual: Tensor) -> MaskedCG:
        """From the masked residual of the starting point."""
        return cls(r=residual, d=residual.clone(), rr=(residual * residual).sum(-1, keepdim=True))

    def step(self, x: Tensor, gram: Tensor, mask: Tensor) -> None:
        """One CG step for every row, updating ``x`` in place (pruned entries kept ``+0.0``)."""
        tiny = torch.finfo(x.dtype).tiny
        q = apply_mask(self.d @ gram, mask)
        dq = (self.d * q).sum(-1, keepdim=True)
        alpha = torch.where(dq > tiny, self.rr / dq.clamp_min(tiny), torch.zeros_like(self.rr))
        x.add_(alpha * self.d)
        self.r.sub_(alpha * q)
        rr_new = (self.r * self.r).sum(-1, keepdim=True)
        beta = torch.where(
            self.rr > tiny, rr_new / self.rr.clamp_min(tiny), torch.zeros_like(self.rr)
        )
        self.d.mul_(beta).add_(self.r)
        self.rr = rr_new
        # Rounding in add_ can turn a pruned +0.0 into -0.0; the mask says they are zeros.
        x.copy_(apply_mask(x, mask))


@torch.no_grad()
def masked_cg(x: Tensor, g: Tensor, y: Tensor, mask: Tensor, iterations: int) -> Tensor:
    """``iterations`` CG steps on ``min tr(X G X^T) - 2 tr(Y X^T)``, ``X`` supported on ``mask``,
    started at ``x`` (``Y = T G`` for the local problem); returns the new ``X``."""
    x = apply_mask(x, mask)
    cg = MaskedCG.start(apply_mask(y - x @ g, mask))
    for _ in range(iterations):
        cg.step(x, g, mask)
    return x
