"""The prox phase's per-layer settings: one dataclass, one set of defaults, one set of rules.

:class:`~prox24_lightning.optim.Prox24` takes them as keyword arguments (per optimizer and per
layer) and :class:`~prox24_lightning.solvers.ProxConfig` inherits them, so a setting is named,
defaulted and checked in one place. The defaults are the paper's (Kübler et al., TMLR 2025);
what ``method: prox`` runs without a named recipe is ``solvers.RECIPES["default"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

__all__ = ["ProxPhaseSettings", "RefineMethod", "require"]

RefineMethod = Literal["gd", "cg"]
ProxSolver = Literal["gradient", "admm"]

#: Range rules of :func:`require` (the float ones refuse NaN and Inf).
_RULES = {
    "> 0": lambda v: v > 0 and math.isfinite(v),
    ">= 0": lambda v: v >= 0 and math.isfinite(v),
    ">= 1": lambda v: v >= 1,
}


def require(
    obj: Any, rule: Literal["> 0", ">= 0", ">= 1"], *keys: str, prefix: str = "solver."
) -> None:
    """Raise ``ValueError`` naming the first of ``keys`` whose value on ``obj`` breaks ``rule``."""
    for key in keys:
        value = getattr(obj, key)
        if not _RULES[rule](value):
            raise ValueError(f"{prefix}{key} must be {rule}, got {value}")


@dataclass
class ProxPhaseSettings:
    """How one layer's prox phase follows the lambda path ``lambda_k = lambda0 beta^k``.

    Attributes:
        lambda0: first lambda of the schedule (paper: 0.01; 1e-3 for 70B models).
        beta: geometric growth of lambda per prox iteration (> 1; paper: 1.01, 70B: 1.005).
        momentum: extrapolation ``Y = W_k + m (W_k - W_{k-1})`` before the gradient step, in
            ``[0, 1)``; 0 is the paper's plain proximal gradient.
        max_prox_steps: cap on prox iterations; the support is then forced to 2:4 by magnitude
            (reported as ``capped``).
        switch_at: end the prox phase once this fraction of groups is 2:4, in ``(0, 1]`` (1.0 is
            the paper's rule); the other groups keep the two largest entries of the current,
            already compensated iterate.
        beta_tail: lambda growth once ``tail_from`` of the groups are 2:4 (None: ``beta``).
        tail_from: where ``beta_tail`` takes over, in ``(0, 1]``.
        check_every: prox iterations between host reads of the 2:4 fraction (``None``: 1 on a
            CPU, 10 on other devices); the results do not depend on it.
        compile: run the proximal-gradient iteration under ``torch.compile(fullgraph=True)``
            (``None``: on CUDA only); the ADMM iteration runs eagerly.
        prox_tf32: allow TF32 in the prox phase's GEMM (refinement and Grams stay IEEE fp32).
        prox_solver: ``gradient`` (the paper's proximal gradient) or ``admm`` (the same lambda
            path inside ALPS's ADMM splitting, :mod:`~prox24_lightning.optim.admm`; ``momentum``,
            ``beta_tail`` and ``tail_from`` are then unused).
        rho0: first ADMM penalty (``admm``).
        min_prox_steps: the ADMM phase's small-change stop applies from this iteration on.
    """

    lambda0: float = 0.01
    beta: float = 1.01
    momentum: float = 0.0
    max_prox_steps: int = 20000
    switch_at: float = 1.0
    beta_tail: float | None = None
    tail_from: float = 0.9
    check_every: int | None = None
    compile: bool | None = None
    prox_tf32: bool = False
    prox_solver: ProxSolver = "gradient"
    rho0: float = 0.1
    min_prox_steps: int = 30

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(ProxPhaseSettings))

    def validate_prox_phase(self, prefix: str = "solver.") -> None:
        """Raise ``ValueError`` naming the first invalid prox-phase setting."""
        require(self, "> 0", "lambda0", "rho0", prefix=prefix)
        # beta = 1 never grows lambda: every layer would run to max_prox_steps and be forced.
        if not (self.beta > 1 and math.isfinite(self.beta)):
            raise ValueError(f"{prefix}beta must be > 1 (lambda must grow), got {self.beta}")
        if self.beta_tail is not None and not self.beta_tail > 1:
            raise ValueError(f"{prefix}beta_tail must be > 1 (or null), got {self.beta_tail}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"{prefix}momentum must be in [0, 1), got {self.momentum}")
        require(self, ">= 1", "max_prox_steps", prefix=prefix)
        require(self, ">= 0", "min_prox_steps", prefix=prefix)
        for key in ("switch_at", "tail_from"):
            value = getattr(self, key)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{prefix}{key} must be in (0, 1], got {value}")
        if self.check_every is not None and int(self.check_every) < 1:
            raise ValueError(f"{prefix}check_every must be >= 1 (or null), got {self.check_every}")
        if self.prox_solver not in ("gradient", "admm"):
            raise ValueError(
                f"{prefix}prox_solver must be 'gradient' or 'admm', got {self.prox_solver!r}"
            )
