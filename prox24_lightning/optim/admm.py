"""The prox phase as ADMM: the 2:4 proximal operator with a geometric lambda inside ALPS's splitting.

For one layer with target ``B̂`` and Gram ``G`` (fp32; :class:`~prox24_lightning.optim.Prox24`
gives it the layer's :class:`~prox24_lightning.optim.prox24.LocalProblem`), the proximal phase of
Kübler et al. minimises ``½ tr((B - B̂) G (B - B̂)ᵀ) + lambda_k r(B)`` along the path ``lambda_k
= lambda0 beta^k`` until ``B`` is 2:4. This module runs the same path with the splitting ``B = D``
of ADMM (Boyd et al. 2011, §4.4) instead of proximal gradient; with ``Y = B̂ G`` and the dual
``V``, one call computes

.. math::
    B_{k+1} = (Y - V_k + ρ_k D_k)(G + ρ_k I)^{-1}, \\qquad
    D_{k+1} = \\operatorname{prox}_{(λ_k / ρ_k) r}(B_{k+1} + V_k / ρ_k), \\qquad
    V_{k+1} = V_k + ρ_k (B_{k+1} - D_{k+1}),

where ``prox`` is the exact 2:4 proximal operator (:func:`~prox24_lightning.ops.prox.prox_2of4`).
Once ``switch_at`` of the groups of ``D`` are 2:4 (``hard``), ``D`` is the projection onto the
2:4 set, which is what the prox becomes as ``lambda -> inf`` (a group with ``tau max|z| >= 6``
keeps its top two exactly): the iteration is then ALPS's (Meng et al., NeurIPS 2024), so ALPS is
the ``lambda0 -> inf`` end of this family, and the lambda path is what chooses the support before
the projection only keeps it. ``ρ`` follows ALPS's schedule: every ``update_every`` iterations the
fraction of kept entries (the top two of every group of ``D``) that changed sets ``ρ x1.3`` (above
10%), ``x1.2`` (above 0.5%) or ``x1.1`` (any change); no change after ``ρ`` grew, or a change
below ``3e-4`` after ``min_steps`` iterations, ends the phase (also ``max_steps``).

**Cost per iteration** (``m x n`` weight): one GEMM ``m n^2`` for ``B``, the elementwise prox
``O(m n)``, and the inverse ``(G + ρI)^{-1} = Q (Λ + ρI)^{-1} Qᵀ`` from one eigendecomposition
``G = Q Λ Qᵀ`` (``O(n^3)`` once per layer, fp64), rebuilt when ``ρ`` changes (``n^3`` every
``update_every`` iterations) or, for wide layers (``m update_every < n``), applied through ``Q``
(two GEMMs ``m n^2``, no rebuild): :func:`use_eigenbasis`. No host synchronisation: ``ρ``,
lambda, the counters and the stop test are 0-d tensors, and every call after the stop is the
identity, so the result does not depend on how often the host reads the state.

Reference: Kübler et al., "A Proximal Operator for Inducing 2:4-Sparsity", TMLR 2025; Meng et al.,
"ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large Language Models",
NeurIPS 2024 (the ``ρ`` schedule, the ridge coordinates of ``solvers/alps.py``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ..ops.masks import apply_mask, groups_2of4_fraction, mask_2of4
from ..ops.prox import prox_2of4

SparseStep = Literal["prox", "project", "either"]

__all__ = [
    "ADMMPhaseConstants",
    "ADMMPhaseState",
    "Eigenbasis",
    "admm_phase_step",
    "admm_start",
    "use_eigenbasis",
]

#: ALPS's ``ρ`` schedule: (fraction of changed kept entries above which, factor).
RHO_FAST = (0.1, 1.3)
RHO_MEDIUM = (0.005, 1.2)
RHO_SLOW = 1.1
#: After ``min_steps``, the phase ends once fewer than this fraction of kept entries change.
STOP_FRACTION = 3e-4


class Eigenbasis(NamedTuple):
    """``G = Q diag(Λ) Qᵀ`` in the iteration's dtype (computed in fp64)."""

    evecs: Tensor
    evals: Tensor

    @classmethod
    def of(cls, gram: Tensor) -> Eigenbasis:
        evals, evecs = torch.linalg.eigh(gram.to(torch.float64))
        return cls(evecs.to(gram.dtype), evals.to(gram.dtype))

    def inverse(self, rho: Tensor) -> Tensor:
        """``(G + ρI)^{-1}`` (``n^3``)."""
        return (self.evecs / (self.evals + rho.to(self.evals.dtype))) @ self.evecs.T

    def solve(self, rhs: Tensor, rho: Tensor) -> Tensor:
        """``rhs (G + ρI)^{-1}`` through ``Q`` (two GEMMs ``m n^2``)."""
        return ((rhs @ self.evecs) / (self.evals + rho.to(self.evals.dtype))) @ self.evecs.T


def use_eigenbasis(d_out: int, d_in: int, update_every: int) -> bool:
    """Apply ``(G + ρI)^{-1}`` through ``Q`` (``2 m n^2`` per iteration) rather than rebuild it when
    ``ρ`` changes (``m n^2 + n^3 / update_every``): cheaper when ``m update_every < n``."""
    return d_out * update_every < d_in


class ADMMPhaseConstants(NamedTuple):
    """A layer's settings as 0-d tensors (float64, ``max_steps``/``min_steps`` int64)."""

    lambda0: Tensor
    beta: Tensor
    switch_at: Tensor
    rho_max: Tensor
    n_kept: Tensor
    max_steps: Tensor
    min_steps: Tensor

    @classmethod
    def create(
        cls,
        device: torch.device | str,
        *,
        lambda0: float,
        beta: float,
        switch_at: float,
        n_kept: int,
        max_steps: int,
        min_steps: int,
        rho_max: float = 1e6,
    ) -> ADMMPhaseConstants:
        def real(value: float) -> Tensor:
            return torch.tensor(float(value), dtype=torch.float64, device=device)

        def count(value: int) -> Tensor:
            return torch.tensor(int(value), dtype=torch.int64, device=device)

        return cls(
            real(lambda0),
            real(beta),
            real(switch_at),
            real(rho_max),
            real(n_kept),
            count(max_steps),
            count(min_steps),
        )


class ADMMPhaseState(NamedTuple):
    """The iterates and counters (0-d tensors on the layer's device).

    Attributes:
        d: the split iterate ``D`` (2:4 once ``hard``).
        v: the dual ``V`` (unscaled).
        keep: the top two of every group of ``D`` at the last ``ρ`` update (bool).
        inverse: ``(G + ρI)^{-1}``, or an empty tensor when it is applied through ``Q``.
        step: iterations done (int64).
        lam: lambda of the last iteration (float64).
        rho: the penalty ``ρ`` (float64).
        frac: fraction of 2:4 groups of ``D`` after the last iteration (float64).
        hard: ``D`` is the projection from now on (bool).
        grown: ``ρ`` has grown at least once (bool; ALPS's stop needs it).
        done: the phase has ended (bool); later calls change nothing.
    """

    d: Tensor
    v: Tensor
    keep: Tensor
    inverse: Tensor
    step: Tensor
    lam: Tensor
    rho: Tensor
    frac: Tensor
    hard: Tensor
    grown: Tensor
    done: Tensor

    def values(self) -> list[float]:
        """``[step, lam, frac, rho, hard, done]`` on the host: one device read."""
        parts = [self.step.double(), self.lam, self.frac, self.rho]
        return torch.stack([*parts, self.hard.double(), self.done.double()]).tolist()


def admm_start(
    b: Tensor,
    basis: Eigenbasis,
    *,
    rho0: float,
    lam: float,
    eigen: bool,
    step: int = 0,
    hard: bool = False,
) -> ADMMPhaseState:
    """The state before the first iteration from the iterate ``b``: ``D = prox_{(lam / ρ0) r}(B)``
    (the projection when ``hard``), ``V = 0``. A layer resumed mid-phase restarts its split from
    its iterate (``step``, ``lam`` the schedule's lambda there)."""
    device = b.device
    rho = torch.tensor(float(rho0), dtype=torch.float64, device=device)
    flag = torch.tensor(bool(hard), device=device)
    d = apply_mask(b, mask_2of4(b.abs())) if hard else prox_2of4(b, lam / float(rho0))
    return ADMMPhaseState(
        d=d,
        v=torch.zeros_like(b),
        keep=mask_2of4(b.abs()),
        inverse=b.new_empty(0) if eigen else basis.inverse(rho),
        step=torch.tensor(int(step), dtype=torch.int64, device=device),
        lam=torch.tensor(0.0, dtype=torch.float64, device=device),
        rho=rho,
        frac=groups_2of4_fraction(d),
        hard=flag,
        grown=torch.zeros((), dtype=torch.bool, device=device),
        done=torch.zeros((), dtype=torch.bool, device=device),
    )


def admm_phase_step(
    b: Tensor,
    y: Tensor,
    basis: Eigenbasis,
    state: ADMMPhaseState,
    const: ADMMPhaseConstants,
    *,
    update: bool,
    eigen: bool,
    sparse_step: SparseStep = "either",
) -> tuple[Tensor, ADMMPhaseState]:
    """One ADMM iteration (module docstring); returns ``(B_{k+1}, state)``, the inputs unchanged
    once ``state.done``.

    Args:
        b: ``B_k`` ``[d_out, d_in]`` (fp32).
        y: ``B̂ G``.
        basis: the eigendecomposition of ``G``.
        state: the split, dual and counters after iteration ``k - 1``.
        const: the layer's settings.
        update: this iteration ends a block of ``update_every`` (the ``ρ`` schedule runs);
            the caller counts calls, so this is configuration, not a value test.
        eigen: apply ``(G + ρI)^{-1}`` through ``Q`` (:func:`use_eigenbasis`).
        sparse_step: what the host knows of ``state.hard``: ``"prox"`` (not yet hard) or
            ``"project"`` (hard) compute only that step; ``"either"`` (the host has not read the
            state since the last iteration) computes both and ``hard`` selects.
    """
    active = ~state.done
    dtype = b.dtype
    rho = state.rho
    r = rho.to(dtype)
    rhs = y - state.v + r * state.d
    b_new = basis.solve(rhs, rho) if eigen else rhs @ state.inverse
    z = b_new + state.v / r
    lam = const.lambda0 * const.beta**state.step
    if sparse_step != "project":
        soft = prox_2of4(z, (lam / rho).to(dtype))
        # The prox keeps the order of every group: its top two are those of z.
        keep = mask_2of4(soft.abs())
        frac = groups_2of4_fraction(soft)
        d_new = soft
    if sparse_step != "prox":
        keep_z = mask_2of4(z.abs())
        projected = apply_mask(z, keep_z)
        if sparse_step == "project":
            d_new, keep, frac = projected, keep_z, torch.ones_like(state.frac)
        else:
            d_new = torch.where(state.hard, projected, soft)
            keep = torch.where(state.hard, keep_z, keep)
            frac = torch.where(state.hard, torch.ones_like(frac), frac)
    hard = state.hard | (frac >= const.switch_at)
    v_new = state.v + r * (b_new - d_new)
    step = state.step + 1
    done = step >= const.max_steps
    keep_prev, grown, inverse = state.keep, state.grown, state.inverse
    if update:
        change = (keep != state.keep).sum().to(torch.float64)
        moved = change / const.n_kept
        fast = moved > RHO_FAST[0]
        medium = ~fast & (moved > RHO_MEDIUM[0])
        slow = ~fast & ~medium & (change > 0.5)
        factor = torch.where(
            fast,
            rho.new_tensor(RHO_FAST[1]),
            torch.where(medium, rho.new_tensor(RHO_MEDIUM[1]), torch.where(slow, RHO_SLOW, 1.0)),
        )
        done = done | (~(fast | medium | slow) & grown)
        done = done | ((step > const.min_steps) & (moved < STOP_FRACTION))
        grown = grown | fast | medium
        rho = torch.minimum(rho * factor, const.rho_max)
        keep_prev = keep
        if not eigen:
            inverse = basis.inverse(rho)

    def pick(new: Tensor, old: Tensor) -> Tensor:
        return torch.where(active, new, old)

    out = ADMMPhaseState(
        d=pick(d_new, state.d),
        v=pick(v_new, state.v),
        keep=pick(keep_prev, state.keep),
        inverse=pick(inverse, state.inverse) if not eigen else state.inverse,
        step=pick(step, state.step),
        lam=pick(lam, state.lam),
        rho=pick(rho, state.rho),
        frac=pick(frac, state.frac),
        hard=pick(hard, state.hard),
        grown=pick(grown, state.grown),
        done=state.done | done,
    )
    return pick(b_new, b), out
