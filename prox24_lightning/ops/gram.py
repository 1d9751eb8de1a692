"""Gram (Hessian) accumulation and the Wanda-style diagonal normalisation.

For a linear layer ``y = W x`` and calibration inputs ``x_t`` the local loss of a replacement ``W``
is ``tr((W - Ŵ) H (W - Ŵ)^T)`` with the Gram matrix ``H = sum_t x_t x_t^T``. All methods work in
the coordinates of paper.md §4.1,

.. math:: \\tilde W_{ij} = W_{ij} \\sqrt{H_{jj}}, \\qquad
          \\tilde H_{ij} = H_{ij} / \\sqrt{H_{ii} H_{jj}},

where the loss is unchanged, ``|W̃|`` is the Wanda score and ``H̃`` has a unit diagonal, so step
sizes, lambdas and dampening transfer between layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GramAccumulator", "DiagonalNormalization", "normalize", "local_loss", "lipschitz"]


class GramAccumulator:
    """Running ``H = sum_t x_t x_t^T`` in fp32, whatever the dtype of the activations.

    Args:
        in_features: size of the layer input.
        device: where ``H`` lives (the activations are moved there).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add the tokens of ``x`` (``[..., in_features]``) to the Gram matrix."""
        x = x.reshape(-1, x.shape[-1]).to(device=self.gram.device, dtype=torch.float32)
        # autocast would run this GEMM in bf16; the statistic must stay fp32.
        with torch.autocast(device_type=x.device.type, enabled=False):
            self.gram.addmm_(x.T, x)
        self.n_tokens += x.shape[0]


@dataclass
class DiagonalNormalization:
    """Column scales ``d_j = sqrt(H_jj)`` (dead features floored) and the normalised Gram.

    Attributes:
        scale: ``[in_features]`` column scales ``d``.
        gram: ``H̃ = D^{-1/2} H D^{-1/2}`` with unit diagonal (fp32).
        dead: boolean ``[in_features]``, features whose ``H_jj`` was (numerically) zero.
    """

    scale: Tensor
    gram: Tensor
    dead: Tensor

    def to_normalized(self, w: Tensor) -> Tensor:
        """``W̃ = W diag(d)``."""
        return w * self.scale

    def from_normalized(self, w_tilde: Tensor) -> Tensor:
        """``W = W̃ diag(d)^{-1}``; exact zeros stay ``+0.0``."""
        return w_tilde / self.scale

    @property
    def n_dead(self) -> int:
        return int(self.dead.sum())


@torch.no_grad()
def normalize(gram: Tensor, *, dead_eps: float = 1e-8) -> DiagonalNormalization:
    """Wanda-style normalisation of a Gram matrix (paper.md §4.1), in fp32.

    Features with ``H_jj <= dead_eps * mean(diag H)`` never fire on the calibration data. They get
    a tiny scale ``sqrt(dead_eps * mean(diag H))``: their Wanda score becomes ~0 (they are pruned
    first) and their row of ``H̃`` is the unit vector, so nothing is divided by zero and no
    silent identity fallback hides them; the count is reported.
    """
    h = gram.to(torch.float32)
    diag = torch.diagonal(h)
    if not bool(torch.isfinite(h).all()):
        raise FloatingPointError("Gram matrix holds NaN or Inf")
    mean = float(diag.mean()) if diag.numel() else 0.0
    floor = dead_eps * mean if mean > 0 else 1.0
    dead = diag <= floor
    scale = torch.sqrt(torch.where(dead, torch.full_like(diag, floor), diag))
    h_tilde = h / scale[:, None] / scale[None, :]
    h_tilde[dead, :] = 0.0
    h_tilde[:, dead] = 0.0
    h_tilde.diagonal().copy_(torch.where(dead, torch.ones_like(diag), h_tilde.diagonal()))
    # Exactly symmetric, so that power iteration and Cholesky see the same matrix on every rank.
    h_tilde = 0.5 * (h_tilde + h_tilde.T)
    return DiagonalNormalization(scale=scale, gram=h_tilde, dead=dead)


def local_loss(w: Tensor, w0: Tensor, gram: Tensor) -> float:
    """``tr((W - W0) H (W - W0)^T)`` in fp32 (= ``||(W - W0) X||_F^2`` for ``H = X X^T``)."""
    d = w.float() - w0.float()
    return float(((d @ gram.float()) * d).sum())


@torch.no_grad()
def lipschitz(gram: Tensor, *, iters: int = 50, safety: float = 1.02) -> float:
    """Largest eigenvalue of a PSD matrix by power iteration, times a small safety factor.

    Any estimate above ``lambda_max / 2`` keeps gradient steps of ``1/L`` stable; power iteration
    approaches ``lambda_max`` from below, hence the factor.
    """
    n = gram.shape[0]
    v = torch.ones(n, dtype=gram.dtype, device=gram.device) / n**0.5
    lam = torch.zeros((), dtype=gram.dtype, device=gram.device)
    for _ in range(iters):
        u = gram @ v
        lam = torch.dot(v, u)
        norm = torch.linalg.vector_norm(u)
        if float(norm) == 0.0:
            return 1.0
        v = u / norm
    return float(lam) * safety
