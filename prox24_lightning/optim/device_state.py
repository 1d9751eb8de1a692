"""A layer's prox-phase state on its device, and the host's bookkeeping of it.

:class:`~prox24_lightning.optim.Prox24` keeps one of these per layer while its prox phase runs:
the 0-d counters and iterates the pure step functions take and return
(:mod:`~prox24_lightning.optim.functional` for proximal gradient,
:mod:`~prox24_lightning.optim.admm` for ADMM), the layer's constants as tensors, and how many
iterations ran since the host last read the counters. A fresh layer and one resumed from its
checkpointed host state start the same way (:meth:`DeviceProx.start`, :meth:`DeviceADMM.start`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from ..ops.precision import matmul_precision
from .admm import ADMMPhaseConstants, ADMMPhaseState, Eigenbasis, admm_start, use_eigenbasis
from .functional import SETTINGS, ProxPhaseConstants, ProxPhaseState

if TYPE_CHECKING:
    from .prox24 import LocalProblem

__all__ = ["ADMM_UPDATE_EVERY", "DeviceADMM", "DeviceProx"]

#: ``ρ`` updates of the ADMM prox phase every this many iterations (ALPS's schedule).
ADMM_UPDATE_EVERY = 3


def _check_every(p: Tensor, group: dict) -> int:
    """Host reads every this many iterations: the setting, else 1 on a CPU (a read is free there)
    and 10 elsewhere."""
    check_every = group.get("check_every")
    if check_every is None:
        check_every = 1 if p.device.type == "cpu" else 10
    return int(check_every)


@dataclass
class DeviceProx:
    """One layer's prox-phase counters and settings on its device, and the host's bookkeeping."""

    state: ProxPhaseState
    const: ProxPhaseConstants
    check_every: int
    max_steps: int
    #: iterations run since the host last read ``state``.
    pending: int = 0

    @classmethod
    def start(cls, p: Tensor, group: dict, problem: LocalProblem, st: dict) -> DeviceProx:
        """From the host state (a fresh layer or one resumed from a checkpoint)."""
        check_every = _check_every(p, group)
        const = ProxPhaseConstants.create(
            p.device, lipschitz=problem.lipschitz, **{k: group[k] for k in SETTINGS}
        )
        state = ProxPhaseState.create(
            p.device,
            step=st["prox_steps"],
            lam=st["lam"],
            frac=st["frac_2of4"],
            tail_step=st.get("tail_step", -1),
            tail_lam=st.get("tail_lam", 0.0),
        )
        return cls(state, const, int(check_every), int(group["max_prox_steps"]))


@dataclass
class DeviceADMM:
    """One layer's ADMM prox phase: its split, dual and counters on the device, ``Y = Ŵ̃ H̃``,
    and the host's bookkeeping."""

    state: ADMMPhaseState
    const: ADMMPhaseConstants
    y: Tensor
    eigen: bool
    check_every: int
    max_steps: int
    #: iterations run (the ``ρ`` schedule's clock) and since the host last read ``state``.
    calls: int = 0
    pending: int = 0

    @classmethod
    def start(cls, p: Tensor, group: dict, problem: LocalProblem, st: dict) -> DeviceADMM:
        check_every = _check_every(p, group)
        d_out, d_in = p.shape
        eigen = use_eigenbasis(d_out, d_in, ADMM_UPDATE_EVERY)
        with matmul_precision():
            problem.basis = Eigenbasis.of(problem.gram)
            y = problem.target @ problem.gram
        step = int(st["prox_steps"])
        lam = group["lambda0"] * group["beta"] ** step
        state = admm_start(
            p,
            problem.basis,
            rho0=st["rho"] or group["rho0"],
            lam=lam,
            eigen=eigen,
            step=step,
            hard=bool(st["admm_hard"]),
        )
        const = ADMMPhaseConstants.create(
            p.device,
            lambda0=group["lambda0"],
            beta=group["beta"],
            switch_at=group["switch_at"],
            n_kept=p.numel() // 2,
            max_steps=group["max_prox_steps"],
            min_steps=group["min_prox_steps"],
        )
        return cls(state, const, y, eigen, int(check_every), int(group["max_prox_steps"]), step)
