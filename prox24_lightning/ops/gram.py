"""Gram (Hessian) accumulation and the Wanda-style diagonal normalisation.

For a linear layer ``y = W x`` and calibration inputs ``x_t`` the local loss of a replacement ``W``
is ``tr((W - Ŵ) H (W - Ŵ)^T)`` with the Gram matrix ``H = sum_t x_t x_t^T``. All methods work in
the coordinates of paper.md §4.1,

.. math:: \\tilde W_{ij} = W_{ij} \\sqrt{H_{jj}}, \\qquad
          \\tilde H_{ij} = H_{ij} / \\sqrt{H_{ii} H_{jj}},

where the loss is unchanged, ``|W̃|`` is the Wanda score and ``H̃`` has a unit diagonal, so step
sizes, lambdas and dampening transfer between layers.

**Token count.** ``H`` is a sum over the ``N`` calibration tokens, so ``W̃`` grows like ``sqrt(N)``
while ``H̃`` does not depend on ``N``. The solvers therefore work on the Gram rescaled to the
paper's calibration size, ``(REFERENCE_TOKENS / N) H`` (:func:`token_scale`), so that a lambda
means the same at any ``N`` (see ``ProxConfig``). Products run in IEEE fp32 whatever the global
matmul precision (:func:`~prox24_lightning.ops.precision.matmul_precision`).

**Spread across sequences.** Tokens of one calibration sequence are far from independent, so how
well ``H`` describes text the solver did not see depends on how much the per-sequence Grams
``H_s`` disagree, not only on ``N``. The accumulator also sums ``||H_s||_F^2`` (:class:`GramSpread`);
:func:`shrinkage_ridge` turns it into the Ledoit-Wolf ridge of the solvers' ridged objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .precision import matmul_precision

__all__ = [
    "REFERENCE_TOKENS",
    "GramAccumulator",
    "DiagonalNormalization",
    "normalize",
    "local_loss",
    "lipschitz",
    "token_scale",
    "GramSpread",
    "shrinkage_ridge",
    "SHRINKAGE_MAX",
]

#: The paper's calibration size, 1024 sequences of 2048 tokens (2^21 = 2,097,152 tokens): the
#: token count in whose units an absolute ``lambda0`` is given.
REFERENCE_TOKENS = 1024 * 2048


def token_scale(n_tokens: int | None) -> float:
    """``REFERENCE_TOKENS / n_tokens``: the factor that takes a Gram summed over ``n_tokens``
    tokens to the paper's units (``1.0`` when the count is unknown, i.e. ``H`` is taken as is).

    Multiplying ``H`` by ``c`` multiplies the normalised weights ``W̃ = W diag(H)^½`` by
    ``sqrt(c)`` and leaves ``H̃`` alone. A power of two (the same text given twice) scales
    exactly, so the solves of ``(G, N)`` and ``(2G, 2N)`` are bit-identical.
    """
    if n_tokens is None:
        return 1.0
    if int(n_tokens) <= 0:
        raise ValueError(f"n_tokens must be > 0, got {n_tokens}")
    return REFERENCE_TOKENS / int(n_tokens)


#: Elements of one chunk of per-sequence Grams in :meth:`GramAccumulator.update` (64 MiB fp32).
_SPREAD_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class GramSpread:
    """How much the calibration sequences' own Grams disagree: ``sequences`` Grams ``H_s`` (the
    rows of a ``[..., seqlen, d]`` input, each a sequence) with ``sum_sq = sum_s ||H_s||_F^2``.

    Data-parallel ranks sum :meth:`GramAccumulator.spread_sums` like the Gram itself."""

    sequences: int
    sum_sq: float

    @classmethod
    def from_sums(cls, sums: Tensor) -> GramSpread | None:
        """From ``[sequences, sum_sq]`` (:meth:`GramAccumulator.spread_sums`, possibly summed over
        ranks; one host read); ``None`` with fewer than two sequences (nothing to compare)."""
        sequences, sum_sq = (float(v) for v in sums.tolist())
        if sequences < 2:
            return None
        return cls(int(round(sequences)), sum_sq)


#: Largest shrinkage intensity :func:`shrinkage_ridge` uses (a ridge of at most ``mean(diag H)``):
#: beyond it the Gram would say less than the prior it is shrunk to.
SHRINKAGE_MAX = 0.5


def shrinkage_ridge(gram: Tensor, spread: GramSpread) -> float:
    """The Ledoit-Wolf shrinkage of ``H`` towards ``μI`` as a ridge in units of ``μ = mean(diag H)``.

    With the ``S`` per-sequence Grams as samples, mean ``M = H / S``, Ledoit and Wolf's estimate of
    the intensity that minimises the expected squared Frobenius error of ``(1-α) M + α μ I`` is

    .. math:: α = \\min\\Big(1, \\frac{b^2}{d^2}\\Big), \\quad
              b^2 = \\frac{1}{S^2} \\sum_s \\|H_s - M\\|_F^2
                  = \\frac{1}{S^2}\\Big(\\sum_s \\|H_s\\|_F^2 - S \\|M\\|_F^2\\Big), \\quad
              d^2 = \\|M - μ I\\|_F^2,

    and the minimiser of ``tr((W-Ŵ)((1-α)H + αμI)(W-Ŵ)ᵀ)`` is that of the ridged objective
    ``tr((W-Ŵ)(H + δ μ I)(W-Ŵ)ᵀ)`` with ``δ = α / (1-α)``, which this returns (``α`` capped at
    :data:`SHRINKAGE_MAX`). ``δ`` falls as the sequences agree: as ``1/N`` for independent tokens,
    more slowly for a few long documents. ``gram`` and ``spread`` must be in the same units (the
    Gram as accumulated, before any rescaling).

    Reference: Ledoit & Wolf, "A well-conditioned estimator for large-dimensional covariance
    matrices", J. Multivariate Analysis 88 (2004), Lemma 3.2 and Theorem 3.4.
    """
    s = int(spread.sequences)
    if s < 2:
        raise ValueError(f"shrinkage_ridge needs at least 2 sequences, got {s}")
    h = gram.detach()
    # Norms by reduction kernels: no n x n temporary (3.3 GB for Llama-2-70B's down_proj).
    diag = h.diagonal().to(torch.float64)
    n = h.shape[0]
    gram_sq = float(torch.linalg.vector_norm(h.to(torch.float32))) ** 2
    mean_sq, mu = gram_sq / s**2, float(diag.mean()) / s
    b2 = max(spread.sum_sq - s * mean_sq, 0.0) / s**2
    # ||M - mu I||^2 = ||M||^2 - n mu^2, as mu is the mean of M's diagonal.
    d2 = mean_sq - n * mu * mu
    alpha = 1.0 if d2 <= 0.0 else min(b2 / d2, 1.0)
    alpha = min(alpha, SHRINKAGE_MAX)
    return alpha / (1.0 - alpha)


class GramAccumulator:
    """Running ``H = sum_t x_t x_t^T`` in fp32, whatever the dtype of the activations.

    The products run in IEEE fp32 also when the global matmul precision allows TF32 or bf16
    (:func:`~prox24_lightning.ops.precision.matmul_precision`), and ``n_tokens`` counts the rows
    summed, for the token-count-independent lambda (:func:`token_scale`). Inputs of three or more
    dimensions (``[batch, seqlen, d]``) also add to the :attr:`spread` when it is tracked:
    ``||H_s||_F^2`` of each sequence, computed as ``||X_s X_sᵀ||_F^2`` when ``seqlen < d`` (at most
    ``seqlen · d · min(seqlen, d)`` multiply-adds per sequence, the Gram's own cost), on the
    device, no host read.

    Args:
        in_features: size of the layer input.
        device: where ``H`` lives (the activations are moved there).
        spread: also track the sequences' spread (what the shrinkage ridge needs; 1.2-2.2x the
            Gram's time on a CPU, so only where a solver uses it).
    """

    def __init__(
        self, in_features: int, device: torch.device | str | None = None, *, spread: bool = False
    ) -> None:
        self.track_spread = spread
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0
        self.n_sequences = 0
        #: ``sum_s ||H_s||_F^2`` (fp64, 0-d, on the Gram's device).
        self.sequence_sq = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add the tokens of ``x`` (``[..., in_features]``) to the Gram matrix."""
        seqlen = x.shape[-2] if x.dim() >= 3 and self.track_spread else None
        x = x.reshape(-1, x.shape[-1]).to(device=self.gram.device, dtype=torch.float32)
        # autocast would run this GEMM in bf16, a TF32/bf16 matmul precision in 10/8-bit
        # mantissas: the statistic must stay fp32.
        with torch.autocast(device_type=x.device.type, enabled=False), matmul_precision():
            self.gram.addmm_(x.T, x)
            if seqlen is not None:
                self._add_spread(x.view(-1, seqlen, x.shape[-1]))
        self.n_tokens += x.shape[0]

    def _add_spread(self, seqs: Tensor) -> None:
        """Add ``||H_s||_F^2`` of every sequence of ``seqs`` (``[count, seqlen, d]``, fp32), in
        chunks of sequences bounded in memory."""
        count, length, width = seqs.shape
        small = min(length, width)
        step = max(1, _SPREAD_CHUNK_ELEMENTS // (small * small))
        for i in range(0, count, step):
            chunk = seqs[i : i + step]
            # ||X^T X||_F = ||X X^T||_F: the smaller of the two products.
            per = chunk @ chunk.mT if length < width else chunk.mT @ chunk
            self.sequence_sq += per.square().sum(dtype=torch.float64)
        self.n_sequences += count

    def spread_sums(self) -> Tensor:
        """``[sequences, sum_s ||H_s||_F^2]`` (fp64, on the device): what ranks sum."""
        count = torch.tensor(float(self.n_sequences), dtype=torch.float64, device=self.gram.device)
        return torch.stack([count, self.sequence_sq])

    @property
    def spread(self) -> GramSpread | None:
        """This accumulator's :class:`GramSpread` (one host read)."""
        return GramSpread.from_sums(self.spread_sums())


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
    with matmul_precision():
        return float(((d @ gram.float()) * d).sum())


@torch.no_grad()
def lipschitz(gram: Tensor, *, iters: int = 50, safety: float = 1.02) -> float:
    """Largest eigenvalue of a PSD matrix by power iteration, times a small safety factor.

    Any estimate above ``lambda_max / 2`` keeps gradient steps of ``1/L`` stable; power iteration
    approaches ``lambda_max`` from below, hence the factor. One host read at the end (a zero
    matrix turns ``v`` into NaN, caught there), not one per iteration.
    """
    n = gram.shape[0]
    v = torch.ones(n, dtype=gram.dtype, device=gram.device) / n**0.5
    lam = torch.zeros((), dtype=gram.dtype, device=gram.device)
    with matmul_precision():
        for _ in range(iters):
            u = gram @ v
            lam = torch.dot(v, u)
            v = u / torch.linalg.vector_norm(u)
    value = float(lam)
    if not (value > 0.0 and math.isfinite(value)):
        return 1.0
    return value * safety
