"""Each method's typed settings, one config dataclass per method, and the named prox recipes.

Every config validates itself (:meth:`MethodConfig.validate`) with messages that name the
``solver.`` key; :func:`~prox24_lightning.solvers.methods.make_config` builds and validates one
from a YAML ``solver:`` mapping. ``ProxConfig()``'s own defaults are the paper's; what ``method:
prox`` runs without a named recipe is :data:`RECIPES` ``["default"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..optim.settings import ProxPhaseSettings, RefineMethod, require

__all__ = [
    "RECIPES",
    "WARM_STARTS",
    "ADMMConfig",
    "ALPSConfig",
    "MagnitudeConfig",
    "MethodConfig",
    "ProxConfig",
    "SparseGPTConfig",
    "WandaConfig",
]

#: Warm starts of ``ProxConfig.warm_start``: the one-shot method that replaces the prox phase.
WARM_STARTS = ("none", "alps", "sparsegpt")


@dataclass
class MethodConfig:
    """Settings every method shares: the masked refinement after it ("+GD").

    Attributes:
        refine_steps: refinement iterations on the fixed mask; ``None`` means the method's
            default (1000 for prox, 0 for the baselines). ``> 0`` after a baseline is its "+GD".
        refine: ``"gd"`` (the paper's masked gradient, step ``1/L``) or ``"cg"`` (conjugate
            gradients on the fixed support: same limit, the per-row refit, in far fewer GEMMs).
    """

    refine_steps: int | None = None
    refine: RefineMethod = "gd"

    def require(self, rule: Literal["> 0", ">= 0", ">= 1"], *keys: str) -> None:
        """Raise ``ValueError`` naming the first of ``keys`` whose value breaks ``rule``."""
        require(self, rule, *keys)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        if self.refine_steps is not None and int(self.refine_steps) < 0:
            raise ValueError(f"solver.refine_steps must be >= 0, got {self.refine_steps}")
        if self.refine not in ("gd", "cg"):
            raise ValueError(f"solver.refine must be 'gd' or 'cg', got {self.refine!r}")


@dataclass
class MagnitudeConfig(MethodConfig):
    """Magnitude pruning has no settings of its own."""


@dataclass
class WandaConfig(MethodConfig):
    """Wanda has no settings of its own (its score is ``|W̃|``)."""


@dataclass
class SparseGPTConfig(MethodConfig):
    """SparseGPT's OBS updates with a lazy 2:4 mask.

    Attributes:
        sparsegpt_blocksize: lazy-update block size (multiple of 4; 128 as in the reference).
        sparsegpt_dampening: dampening relative to the (unit) diagonal of ``H̃``.
    """

    sparsegpt_blocksize: int = 128
    sparsegpt_dampening: float = 0.01

    def validate(self) -> None:
        super().validate()
        if self.sparsegpt_blocksize <= 0 or self.sparsegpt_blocksize % 4:
            raise ValueError(
                f"solver.sparsegpt_blocksize must be a positive multiple of 4, got "
                f"{self.sparsegpt_blocksize}"
            )
        self.require(">= 0", "sparsegpt_dampening")


@dataclass
class ALPSConfig(MethodConfig):
    """ALPS (Meng et al., NeurIPS 2024): ADMM with a ``rho`` schedule, then PCG on the support.

    Defaults are the reference's (mazumder-lab/ALPS, ``ALPS_admm``); see
    :mod:`~prox24_lightning.solvers.alps` for the update rules.

    Attributes:
        alps_rho0: first ADMM penalty ``rho`` (0.1).
        alps_max_iterations: cap on ADMM iterations (300).
        alps_update_every: iterations between ``rho`` updates from the support change (3:
            x1.3 / x1.2 / x1.1 for a large / medium / small change).
        alps_min_iterations: the "support settled" stop applies from this iteration on (30).
        alps_rho_max: cap on ``rho`` (1e6).
        alps_pcg_iterations: conjugate-gradient steps refitting the kept weights on the ridge
            Gram after the ADMM (10; 0 leaves the refit to ``refine_steps``).
        alps_dampening: ridge ``dampening * mean(diag H)`` (0.01).
        alps_dampening_space: ``original`` (the reference: ridge on the raw Gram, i.e.
            ``dampening * mean(diag H) / H_jj`` on the unit diagonal of ``H̃``) or
            ``normalized`` (``dampening`` on ``H̃``).
    """

    alps_rho0: float = 0.1
    alps_max_iterations: int = 300
    alps_update_every: int = 3
    alps_min_iterations: int = 30
    alps_rho_max: float = 1e6
    alps_pcg_iterations: int = 10
    alps_dampening: float = 0.01
    alps_dampening_space: Literal["original", "normalized"] = "original"

    def validate(self) -> None:
        super().validate()
        self.require("> 0", "alps_rho0", "alps_rho_max", "alps_dampening")
        self.require(">= 1", "alps_max_iterations", "alps_update_every")
        self.require(">= 0", "alps_min_iterations", "alps_pcg_iterations")
        if self.alps_dampening_space not in ("original", "normalized"):
            raise ValueError(
                "solver.alps_dampening_space must be 'original' or 'normalized', got "
                f"{self.alps_dampening_space!r}"
            )


@dataclass
class ADMMConfig(MethodConfig):
    """ADMM with a gradual mask (Boža 2024); see :mod:`~prox24_lightning.solvers.admm`.

    Defaults are the reference's (fmfi-compbio/admm-pruning, ``percdamp=0.1``).

    Attributes:
        admm_iterations: ADMM iterations (20).
        admm_mask_iterations: iterations over which the mask grows to 2:4 (15, at most
            ``admm_iterations``; 0 fixes the Wanda mask).
        admm_rho: ADMM penalty (1.0).
        admm_dampening: ridge relative to the unit diagonal of ``H̃`` (0.1).
        admm_schedule_exponent: sparsity schedule ``s_t = 1/2 - 1/2 (1 - (t+1)/T)^exponent`` (3).
    """

    admm_iterations: int = 20
    admm_mask_iterations: int = 15
    admm_rho: float = 1.0
    admm_dampening: float = 0.1
    admm_schedule_exponent: float = 3.0

    def validate(self) -> None:
        super().validate()
        if int(self.admm_iterations) < 0 or int(self.admm_mask_iterations) < 0:
            raise ValueError(
                "solver.admm_iterations and solver.admm_mask_iterations must be >= 0, got "
                f"{self.admm_iterations}, {self.admm_mask_iterations}"
            )
        if self.admm_mask_iterations > self.admm_iterations:
            raise ValueError(
                f"solver.admm_mask_iterations ({self.admm_mask_iterations}) must be <= "
                f"solver.admm_iterations ({self.admm_iterations}): the mask must reach 2:4"
            )
        self.require("> 0", "admm_rho")
        self.require(">= 0", "admm_dampening")
        if not self.admm_schedule_exponent > 0:
            raise ValueError(
                f"solver.admm_schedule_exponent must be > 0, got {self.admm_schedule_exponent}"
            )


@dataclass
class ProxConfig(MethodConfig, ProxPhaseSettings):
    """The proximal 2:4 pruner of Kübler et al. (all in the normalised coordinates).

    **Token count.** ``H = sum_t x_t x_t^T`` grows with the ``N`` calibration tokens and the
    normalised weights ``W̃ = W diag(H)^½`` with ``sqrt(N)`` (``H̃`` does not change). ``r`` is
    cubic, so ``prox_{lam r}(c z) = c prox_{lam c r}(z)``: on weights scaled by ``c`` a lambda
    acts like ``c lambda`` on the unscaled ones. Given the token count (``LayerSolve(...,
    n_tokens=N)``, ``prune_weight(..., n_tokens=N)``), the solver works on
    ``H_ref = (N_ref / N) H`` with ``N_ref = 2^21 = 1024 x 2048`` tokens (the paper's
    calibration set, ``ops.gram.REFERENCE_TOKENS``), whose ``W̃`` is the same at any ``N``.
    So an **absolute** ``lambda0`` is in the units of a Gram summed over the paper's 2M tokens:
    ``lambda0 = 0.01`` means at every ``N`` what 0.01 meant at 2^21 tokens, and runs at exactly
    2^21 tokens are bit-identical to the unscaled solve. In other units: on the raw ``H`` of
    ``N`` tokens it is ``0.01 sqrt(2^21 / N)`` (0.16 at the demo's 8192 tokens); on the mean
    ``H / N`` it is ``0.01 sqrt(2^21) = 14.48`` (``W̃`` shrinks by ``sqrt(N)``, so lambda grows
    by it). ``rms`` is independent of ``N`` by construction (``lambda0 / rms(W̃)``: the scale
    cancels), so the ``fast`` recipe means the same with or without the count. Without a count
    the Gram is taken as given (as if summed over 2^21 tokens). Losses are always reported in
    the units of the given Gram, lambdas (``final_lambda``, the trace) in those of ``lambda0``.
    (paper.md §2.1 notes that the paper's convention, sum or mean, is not confirmed; a sum is
    assumed here, under which 0.01 at 2M tokens reproduces the paper's schedule.)

    The prox phase's settings (``lambda0``, ``beta``, ``momentum``, ``max_prox_steps``,
    ``switch_at``, ``beta_tail``, ``tail_from``, ``check_every``, ``compile``, ``prox_tf32``,
    ``prox_solver``, ``rho0``, ``min_prox_steps``) are :class:`~prox24_lightning.optim.settings.
    ProxPhaseSettings`'s, inherited with their defaults and rules; ``lambda0`` is in the units
    above.

    Attributes:
        lambda_scale: ``absolute`` uses ``lambda0`` as given (the paper); ``rms`` divides it by
            the RMS of the layer's normalised weights. ``r`` is cubic, so ``prox_{c lam r}(c z) =
            c prox_{lam c r}(z)``: only ``lambda * scale`` matters, and with ``rms`` every layer
            starts at the same point of its own path.
        warm_start: ``none`` (the prox phase starts from the dense ``Ŵ̃``, the paper) or the
            one-shot method whose 2:4 weights replace the prox phase: ``alps`` (ALPS with the
            uniform ridge on ``H̃``, ``alps_dampening_space: normalized``, no PCG: the mask
            search or the refinement refits) or ``sparsegpt``. The lambda settings are then
            unused.
        mask_search_rounds: rounds of the exact local mask search after the method's mask is
            known (after the prox phase or the warm start, before refinement; 0 = off). Every
            round scores the five other 2:4 masks of the groups of every row with the exact
            per-row refit and applies the best set of moves (``solvers/mask_search.py``).
        mask_search_swaps: at most this many group moves per row and round.
        mask_search_candidates: groups per row scored exactly each round (``>= swaps``).
        mask_search_dampening: smallest ridge on the unit diagonal of ``H̃`` for the search's
            fp32 inverses (raised tenfold until ``H̃ + δI`` is well enough conditioned).
        ridge: solve the whole layer (prox phase, search, refinement) on ALPS's ridged
            objective ``tr((W-Ŵ)(H + δI)(W-Ŵ)ᵀ)``, ``δ = ridge · mean(diag H)`` (0 = the local
            loss itself, the paper). The ridge pulls the weights of rarely active inputs towards
            their dense values: a slightly higher calibration loss, a lower loss on text the
            solver did not see. The stats report the local loss itself.
        ridge_tokens: the calibration size at which ``ridge`` applies: with the token count
            ``N`` known (the pipeline passes it) the ridge is ``ridge · ridge_tokens / N``, since
            ``H`` grows with ``N`` while the ridge acts as a fixed prior (fewer tokens, more
            overfitting, more ridge); ``null`` uses ``ridge`` at every ``N`` (ALPS's rule).
        ridge_shrinkage: set the ridge from the calibration data instead: this factor times the
            Ledoit-Wolf shrinkage of ``H`` estimated from how much the calibration sequences'
            own Grams disagree (:func:`~prox24_lightning.ops.gram.shrinkage_ridge`), per layer.
            It falls as the sequences agree (as ``1/N`` for independent tokens), so a layer whose
            Gram already describes unseen text gets almost none. ``ridge`` / ``ridge_tokens``
            apply where the spread is unknown (a Gram given without it, inputs without a
            sequence axis) and when this is 0 (off; in a YAML ``solver:`` mapping ``null`` means
            the recipe's value, so ``0`` turns it off: with ``ridge: 0`` too, no ridge at all).
        mask_search_ridge: the search's objective gets ALPS's ridge, ``tr((W-Ŵ)(H + ρI)
            (W-Ŵ)ᵀ)`` with ``ρ = mask_search_ridge · mean(diag H)`` (0 = the local loss itself).
            It pulls weights of rarely active inputs towards their dense values, so the mask
            fits small calibration sets less closely; the refinement after the search still
            minimises the local loss itself.
    """

    lambda_scale: Literal["absolute", "rms"] = "absolute"
    warm_start: Literal["none", "alps", "sparsegpt"] = "none"
    mask_search_rounds: int = 0
    mask_search_swaps: int = 16
    mask_search_candidates: int = 16
    mask_search_dampening: float = 1e-4
    mask_search_ridge: float = 0.0
    ridge: float = 0.0
    ridge_tokens: int | None = None
    ridge_shrinkage: float | None = None

    def validate(self) -> None:
        super().validate()
        self.validate_prox_phase()
        self.require("> 0", "mask_search_dampening")
        self.require(">= 0", "ridge")
        if self.ridge_tokens is not None and int(self.ridge_tokens) < 1:
            raise ValueError(f"solver.ridge_tokens must be >= 1 (or null), got {self.ridge_tokens}")
        if self.ridge_shrinkage is not None:
            self.require(">= 0", "ridge_shrinkage")
        if (self.ridge > 0 or self.ridge_shrinkage) and self.mask_search_ridge > 0:
            raise ValueError(
                "solver.ridge (or ridge_shrinkage) and solver.mask_search_ridge cannot both be "
                "set: with a ridge the search already runs on the ridged objective"
            )
        if self.lambda_scale not in ("absolute", "rms"):
            raise ValueError(
                f"solver.lambda_scale must be 'absolute' or 'rms', got {self.lambda_scale!r}"
            )
        self.require(">= 1", "mask_search_swaps")
        self.require(">= 0", "mask_search_rounds", "mask_search_ridge")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(
                f"solver.warm_start must be one of {', '.join(WARM_STARTS)}, got "
                f"{self.warm_start!r}"
            )
        if int(self.mask_search_candidates) < int(self.mask_search_swaps):
            raise ValueError(
                f"solver.mask_search_candidates ({self.mask_search_candidates}) must be >= "
                f"solver.mask_search_swaps ({self.mask_search_swaps})"
            )


#: Named prox settings; in YAML ``solver: {recipe: NAME}``, other keys override the recipe.
#:
#: * ``default`` (what ``method: prox`` runs): the paper's lambda path with the exact 2:4 prox,
#:   run inside ALPS's ADMM splitting (``prox_solver: admm``, ``optim/admm.py``) on ALPS's ridged
#:   objective, then 10 CG steps on that objective. The ridge is twice the Ledoit-Wolf shrinkage
#:   of the layer's calibration Gram (``ridge_shrinkage``: more where the calibration sequences
#:   disagree); where their spread is unknown, ``0.005 x 65536 / N``. Per layer: one eigendecomposition,
#:   a few dozen GEMM iterations, no per-row factorisation, no host sync in an iteration.
#: * ``paper``: Kübler et al.'s Algorithm 2 as published: plain proximal gradient, lambda0 0.01
#:   (in the units of 2^21 calibration tokens), beta 1.01 until every group is 2:4, then 1000
#:   masked-gradient steps.
#: * ``fast``: proximal gradient with momentum 0.9, lambda0 relative to the RMS of the layer's
#:   normalised weights, beta 1.03 (1.1 once 90% of the groups are 2:4), the switch at 99.9%,
#:   then 50 CG steps.
#: * ``search``: a quicker proximal-gradient path plus the exact local mask search
#:   (``solvers/mask_search.py``: a ``k x k`` factorisation per row, ``k = d_in / 2``): the lowest
#:   calibration loss here, at a cost that grows as ``d_out d_in^3``; for small layers.
#: * ``best``: ALPS's mask (uniform ridge) instead of the prox phase, then the exact search.
#:
#: docs/results.md has the measurements behind each.
RECIPES: dict[str, ProxConfig] = {
    "default": ProxConfig(
        prox_solver="admm",
        ridge_shrinkage=2.0,
        ridge=0.005,
        ridge_tokens=65536,
        lambda0=0.03,
        lambda_scale="rms",
        beta=1.45,
        switch_at=0.999,
        max_prox_steps=300,
        min_prox_steps=30,
        rho0=0.1,
        refine="cg",
        refine_steps=10,
    ),
    "paper": ProxConfig(lambda0=0.01, beta=1.01, momentum=0.0, refine="gd", refine_steps=1000),
    "fast": ProxConfig(
        lambda0=0.01,
        lambda_scale="rms",
        beta=1.03,
        momentum=0.9,
        beta_tail=1.1,
        tail_from=0.9,
        switch_at=0.999,
        refine="cg",
        refine_steps=50,
    ),
    "search": ProxConfig(
        lambda0=0.01,
        lambda_scale="rms",
        beta=1.1,
        momentum=0.9,
        beta_tail=1.2,
        tail_from=0.9,
        switch_at=0.999,
        mask_search_rounds=6,
        mask_search_swaps=16,
        mask_search_candidates=16,
        refine="cg",
        refine_steps=20,
    ),
    "best": ProxConfig(
        lambda_scale="rms",
        warm_start="alps",
        mask_search_rounds=6,
        mask_search_swaps=16,
        mask_search_candidates=16,
        refine="cg",
        refine_steps=20,
    ),
}
