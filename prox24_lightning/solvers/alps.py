"""ALPS (Meng et al., NeurIPS 2024): ADMM between a least-squares block and the 2:4 set, then PCG.

For one layer with dense weight ``Ŵ`` and Gram ``H``, ALPS solves

.. math:: \\min_W \\operatorname{tr}((W-Ŵ)(H + δI)(W-Ŵ)^T) \\quad \\text{s.t. } W \\text{ is 2:4},

with the ridge ``δ = dampening · mean(diag H)`` (1%), in the coordinates of its own code
(mazumder-lab/ALPS, ``ALPS_admm``): ``B = W diag(c)``, ``G = diag(c)^{-1} (H + δI) diag(c)^{-1}``
with ``c_j = sqrt(H_jj + δ)``, so ``G`` has a unit diagonal. In this project's coordinates
(``W̃ = W diag(d)``, ``d_j = sqrt(H_jj)``, ``H̃`` with unit diagonal) that is

.. math:: B = W̃ \\operatorname{diag}(s), \\quad G = S^{-1}(H̃ + \\operatorname{diag}(r))S^{-1},
          \\quad r_j = δ / d_j^2, \\quad s_j = \\sqrt{1 + r_j}

(``dampening_space="original"``, the reference; ``"normalized"`` uses the uniform ridge
``r_j = dampening`` on ``H̃`` instead). Dead features (``H_jj ≈ 0``) keep the project's
convention: they get ``r_j = dampening``, so their weights stay ~0 and are pruned first (the
reference's ridge would keep them at their dense values although they never fire).

With ``Y = B̂ G`` and the eigendecomposition ``G = Q Λ Q^T`` (computed once, in fp64), the scaled
ADMM iterations are, for ``ρ`` starting at ``ρ0 = 0.1``,

.. math::
    B_{k+1} = (Y - V_k + ρ D_k)(G + ρI)^{-1}, \\qquad (G + ρI)^{-1} = Q (Λ + ρI)^{-1} Q^T,

    D_{k+1} = Π_{2:4}(B_{k+1} + V_k / ρ), \\qquad V_{k+1} = V_k + ρ (B_{k+1} - D_{k+1}),

where ``Π_{2:4}`` keeps the two largest magnitudes of every group of 4 (``D_0 = Π(B̂)``,
``V_0 = 0``). Every ``update_every = 3`` iterations the number ``n`` of entries whose support
changed since the last check, relative to the ``k`` kept entries, sets ``ρ``: ``×1.3`` if
``n/k > 0.1``, ``×1.2`` if ``n/k > 0.005``, else ``×1.1`` if ``n > 0`` (once ``ρ`` has grown;
before that ``ρ`` was too large: ``ρ/5`` and restart from ``B̂, D_0, 0``), else stop (once
``ρ`` has grown; before, ``ρ/5``). ``ρ <= 10^6``; the iterations also stop after
``min_iterations = 30`` once ``n/k < 3·10^-4``, and after ``max_iterations = 300``. The last
``B`` is projected onto 2:4 and its kept entries are refit by ``pcg_iterations = 10`` steps of
conjugate gradients on ``min tr((B-B̂) G (B-B̂)^T)`` on that support (the reference's "PCG":
``G`` has a unit diagonal, so its Jacobi preconditioner is the identity; its stopping test uses
the unmasked residual and never fires, so it always runs the 10 steps).

The whole loop runs on the device of its inputs: ``ρ``, the schedule's flags and the stop test
are 0-dim tensors, iterations after a stop are frozen with ``torch.where``, and the host reads
the stop flag only every ``check_every`` schedule updates (every update on CPU, where reading is
free), so the result is the same whatever ``check_every`` is.

Its losses match the authors' code on real Grams (``tools/bench_solver.py --methods alps``;
docs/results.md has the figures, with those of the uniform ridge, ``dampening_space=
"normalized"``).

Reference: Meng, Behdin, Wang, Mazumder, "ALPS: Improved Optimization for Highly Sparse One-Shot
Pruning for Large Language Models", NeurIPS 2024 (arXiv:2406.07831); code
github.com/mazumder-lab/ALPS (``alps.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..ops.cg import masked_cg
from ..ops.gram import DiagonalNormalization
from ..ops.masks import apply_mask, mask_2of4

__all__ = ["ALPSTrace", "alps_admm", "alps_coordinates", "alps_prune"]

DampeningSpace = Literal["original", "normalized"]

#: The reference's rho schedule: (support-change fraction above which, factor).
RHO_FAST = (0.1, 1.3)
RHO_MEDIUM = (0.005, 1.2)
RHO_SLOW = 1.1
#: ``rho`` was too large at the first checks (little support change): divide by this, restart.
RHO_BACKOFF = 5.0
#: Stop after ``min_iterations`` once the support-change fraction is below this.
STOP_FRACTION = 3e-4


@dataclass
class ALPSTrace:
    """The ADMM part of ALPS in its own coordinates.

    Attributes:
        b: the last least-squares iterate ``B`` (dense; projected and refit by :func:`alps_prune`).
        d: the last 2:4 iterate ``D``.
        v: the last (unscaled) dual ``V``.
        rho: the final penalty ``ρ`` (0-dim fp64 tensor).
        iterations: iterations run (0-dim int64 tensor).
    """

    b: Tensor
    d: Tensor
    v: Tensor
    rho: Tensor
    iterations: Tensor


def _project(x: Tensor) -> tuple[Tensor, Tensor]:
    """``Π_{2:4}(x)``: the two largest ``|x|`` of every group of 4 (ties to the lower index)."""
    keep = mask_2of4(x.abs())
    return apply_mask(x, keep), keep


@torch.no_grad()
def alps_coordinates(
    w_tilde: Tensor,
    norm: DiagonalNormalization,
    *,
    dampening: float = 0.01,
    space: DampeningSpace = "original",
) -> tuple[Tensor, Tensor, Tensor]:
    """``(B̂, G, s)``: ALPS's dense target, unit-diagonal ridge Gram and column map ``B = W̃ s``.

    ``space="original"`` is the reference's ridge ``δ I`` on the raw Gram, ``δ = dampening ·
    mean(diag H)``, i.e. ``r_j = δ / H_jj`` on ``H̃``; ``"normalized"`` is ``r_j = dampening``.
    Dead features get ``r_j = dampening`` in both (module docstring).
    """
    h = norm.gram.to(w_tilde.dtype)
    ones = torch.ones_like(h.diagonal())
    if space == "original":
        d2 = norm.scale.to(w_tilde.dtype).square()
        ridge = dampening * d2.mean() / d2
        ridge = torch.where(norm.dead.to(ridge.device), dampening * ones, ridge)
    elif space == "normalized":
        ridge = dampening * ones
    else:
        raise ValueError(f"dampening space must be 'original' or 'normalized', got {space!r}")
    s = torch.sqrt(1.0 + ridge)
    g = (h + torch.diag(ridge)) / s[:, None] / s[None, :]
    g = 0.5 * (g + g.T)
    return w_tilde * s, g, s


@torch.no_grad()
def alps_admm(
    b_hat: Tensor,
    g: Tensor,
    *,
    rho0: float = 0.1,
    max_iterations: int = 300,
    update_every: int = 3,
    min_iterations: int = 30,
    rho_max: float = 1e6,
    check_every: int | None = None,
) -> ALPSTrace:
    """ALPS's ADMM on ``min tr((B-B̂) G (B-B̂)^T)`` s.t. 2:4, with its ``ρ`` schedule.

    Args:
        b_hat: ``[d_out, d_in]`` dense target ``B̂`` (fp32 or fp64; the dtype of the iterations).
        g: ``[d_in, d_in]`` symmetric positive definite Gram ``G`` (ALPS's: ridge included).
        rho0: first penalty (0.1 in the reference).
        max_iterations: cap on ADMM iterations (300).
        update_every: iterations between ``ρ`` updates (3).
        min_iterations: the small-change stop applies from this (0-based) iteration on (30).
        rho_max: cap on ``ρ`` (``10^6``).
        check_every: read the stop flag on the host every this many ``ρ`` updates (default: 1 on
            CPU, 5 elsewhere); does not change the result.

    Returns:
        :class:`ALPSTrace` (the module docstring has the update rules).
    """
    dtype, device = b_hat.dtype, b_hat.device
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 5
    evals, evecs = torch.linalg.eigh(g.to(torch.float64))
    evals, evecs = evals.to(dtype), evecs.to(dtype)

    def inverse(rho: Tensor) -> Tensor:
        # (G + rho I)^{-1} = Q (Λ + rho)^{-1} Q^T, from the one eigendecomposition.
        return (evecs / (evals + rho.to(dtype))) @ evecs.T

    f64 = dict(dtype=torch.float64, device=device)
    rho = torch.tensor(float(rho0), **f64)
    grown = torch.zeros((), dtype=torch.bool, device=device)  # the reference's ``init_rho``
    stopped = torch.zeros((), dtype=torch.bool, device=device)
    iterations = torch.zeros((), dtype=torch.int64, device=device)
    n_kept = b_hat.numel() / 2  # ``k_spar``: 2 of every 4
    y = b_hat @ g
    ginv = inverse(rho)
    d_init, keep_prev = _project(b_hat)
    b, d, v = b_hat.clone(), d_init.clone(), torch.zeros_like(b_hat)
    updates = 0
    for i in range(max_iterations):
        r = rho.to(dtype)
        b_new = (y - v + r * d) @ ginv
        d_new, keep = _project((v + r * b_new) / r)
        v_new = v + r * (b_new - d_new)
        live = ~stopped
        iterations = iterations + live.to(torch.int64)
        if (i + 1) % update_every:
            b, d, v = (
                torch.where(live, new, old) for new, old in ((b_new, b), (d_new, d), (v_new, v))
            )
            continue
        change = (keep != keep_prev).sum().to(torch.float64)
        frac = change / n_kept
        fast = frac > RHO_FAST[0]
        medium = ~fast & (frac > RHO_MEDIUM[0])
        slow = ~fast & ~medium & (change > 0.5)
        still = ~(fast | medium | slow)
        # Little change before rho ever grew: rho was too large; restart from the dense target.
        reset = slow & ~grown
        rho_new = torch.where(
            fast,
            rho * RHO_FAST[1],
            torch.where(
                medium,
                rho * RHO_MEDIUM[1],
                torch.where(
                    slow & grown, rho * RHO_SLOW, torch.where(grown, rho, rho / RHO_BACKOFF)
                ),
            ),
        ).clamp(max=rho_max)
        stop = (still & grown) | ((i >= min_iterations) & (frac < STOP_FRACTION))
        b_new = torch.where(reset, b_hat, b_new)
        d_new = torch.where(reset, d_init, d_new)
        v_new = torch.where(reset, torch.zeros_like(v_new), v_new)
        b, d, v = (torch.where(live, new, old) for new, old in ((b_new, b), (d_new, d), (v_new, v)))
        keep_prev = torch.where(live, keep, keep_prev)
        rho = torch.where(live, rho_new, rho)
        grown = grown | (live & (fast | medium))
        stopped = stopped | (live & stop)
        ginv = inverse(rho)
        updates += 1
        if updates % check_every == 0 and bool(stopped):
            break
    return ALPSTrace(b=b, d=d, v=v, rho=rho, iterations=iterations)


@torch.no_grad()
def alps_prune(
    w_tilde: Tensor,
    norm: DiagonalNormalization,
    *,
    rho0: float = 0.1,
    max_iterations: int = 300,
    update_every: int = 3,
    min_iterations: int = 30,
    rho_max: float = 1e6,
    pcg_iterations: int = 10,
    dampening: float = 0.01,
    dampening_space: DampeningSpace = "original",
    check_every: int | None = None,
) -> tuple[Tensor, Tensor]:
    """ALPS 2:4 in this project's normalised coordinates: ``(weight, mask)``, pruned ``+0.0``.

    Maps ``(W̃, H̃)`` to ALPS's coordinates (:func:`alps_coordinates`), runs its ADMM
    (:func:`alps_admm`), projects the last ``B`` onto 2:4, refits the kept entries with
    ``pcg_iterations`` CG steps on the ridge Gram
    (:func:`~prox24_lightning.ops.cg.masked_cg`) and maps back
    (``W̃ = B / s``). The weight is in the dtype of ``w_tilde``.
    """
    b_hat, g, s = alps_coordinates(w_tilde, norm, dampening=dampening, space=dampening_space)
    trace = alps_admm(
        b_hat,
        g,
        rho0=rho0,
        max_iterations=max_iterations,
        update_every=update_every,
        min_iterations=min_iterations,
        rho_max=rho_max,
        check_every=check_every,
    )
    b, mask = _project(trace.b)
    if pcg_iterations > 0:
        b = masked_cg(b, g, b_hat @ g, mask, pcg_iterations)
    return apply_mask(b / s, mask), mask
