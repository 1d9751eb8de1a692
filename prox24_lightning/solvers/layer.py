"""One entry point per layer, :func:`prune_weight`, and the :class:`LayerSolve` behind it.

``prune_weight(weight, gram, method)`` normalises the problem (paper.md §4.1), starts the chosen
method (:data:`~prox24_lightning.solvers.methods.METHODS`) in the
:class:`~prox24_lightning.optim.Prox24` optimizer, optionally refines the kept weights on the
fixed mask ("+GD"), maps back to the original coordinates and returns an exactly 2:4 weight in
the input dtype. The pipeline drives the same :class:`LayerSolve` objects through its own
(Lightning-wrapped) optimizer, so both paths compute the same thing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..ops.gram import GramSpread, lipschitz, normalize, shrinkage_ridge, token_scale
from ..ops.masks import apply_mask, is_2of4
from ..ops.precision import matmul_precision
from ..optim.prox24 import LayerStatus, LocalProblem, Prox24
from ..optim.settings import ProxPhaseSettings
from .alps import alps_coordinates
from .mask_search import mask_search
from .methods import METHODS, RECIPES, MethodConfig, ProxConfig, get_method, make_config

__all__ = [
    "METHODS",
    "RECIPES",
    "LayerSolve",
    "layer_ridge",
    "needs_spread",
    "optimizer_hparams",
    "PruneResult",
    "PruneStats",
    "prune_weight",
]

#: The prox-phase trace kept in ``PruneStats.extra["trace"]``: rows ``[prox_step, lambda,
#: frac_2of4]`` (``lambda`` is the schedule's ``lambda_k``, ``frac_2of4`` the fraction of groups
#: with at most two non-zeros after that step). A row is recorded at the first and the last prox
#: step and whenever ``frac_2of4`` moved by ``TRACE_DFRAC`` or lambda grew by
#: ``TRACE_LAMBDA_FACTOR`` since the previous row: a few dozen rows per layer, enough to plot
#: ``frac_2of4`` against ``log lambda``. At most ``TRACE_MAX_ROWS`` + 1 rows.
TRACE_DFRAC = 0.05
TRACE_LAMBDA_FACTOR = 2.0
TRACE_MAX_ROWS = 128


@dataclass
class PruneStats:
    """What happened to one layer. Losses are ``tr((W-Ŵ)H(W-Ŵ)ᵀ)`` for the given Gram ``H``.

    ``gemms`` counts the optimizer's ``d_out x d_in`` by ``d_in x d_in`` products (one per
    proximal-gradient iteration and refinement step, one or two per ADMM iteration); a one-shot
    method's own work (SparseGPT's, ALPS's) is not in it. ``extra`` holds ``lipschitz``,
    ``factorizations`` (``d_in x d_in`` eigendecompositions and inverses of the ADMM phase, and
    the exact mask search's per-row factorisations), ``ridge`` (the ridge in force, when there
    is one) and, for prox, ``trace`` (see :data:`TRACE_DFRAC`).
    """

    method: str
    refine_steps: int
    iterations_to_2of4: int = 0
    final_lambda: float = 0.0
    forced_2of4: bool = False
    capped: bool = False  # the prox phase hit max_prox_steps (forced to 2:4 by the cap)
    loss_method: float = 0.0  # after the method, before refinement
    loss_final: float = 0.0
    loss_mask_only: float = 0.0  # dense weights under the final mask, no update (reference)
    dead_features: int = 0
    gemms: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruneResult:
    """Output of :func:`prune_weight`.

    Attributes:
        weight: same shape and dtype as the input, exactly 2:4, pruned entries ``+0.0``.
        mask: bool, ``True`` = kept; exactly two per group of 4.
        stats: :class:`PruneStats`.
    """

    weight: Tensor
    mask: Tensor
    stats: PruneStats


def check_layer_inputs(weight: Tensor, gram: Tensor) -> None:
    """Raise a clear error for shapes, indivisible inputs and non-finite values."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [d_out, d_in], got shape {tuple(weight.shape)}")
    d_in = weight.shape[1]
    if d_in % 4 != 0:
        raise ValueError(f"input dimension {d_in} is not divisible by 4; 2:4 needs groups of 4")
    if tuple(gram.shape) != (d_in, d_in):
        raise ValueError(
            f"gram must be [{d_in}, {d_in}] for weight {tuple(weight.shape)}, "
            f"got {tuple(gram.shape)}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise FloatingPointError("weight holds NaN or Inf")
    if not bool(torch.isfinite(gram).all()):
        raise FloatingPointError(
            "Gram matrix holds NaN or Inf (non-finite calibration activations)"
        )


def optimizer_hparams(config: MethodConfig, refine_steps: int, rms: float | None) -> dict:
    """The one translation from a method config to a layer's :class:`Prox24` settings.

    A prox config carries the :class:`~prox24_lightning.optim.settings.ProxPhaseSettings` (it
    inherits them); every method has ``refine``; ``refine_steps`` is the resolved count and
    ``lambda0`` is divided by ``rms``, the RMS of the layer's normalised weights, under
    ``lambda_scale: rms``.
    """
    hparams: dict[str, Any] = {"refine": config.refine, "refine_steps": refine_steps}
    if isinstance(config, ProxPhaseSettings):
        hparams.update({k: getattr(config, k) for k in ProxPhaseSettings.names()})
    if isinstance(config, ProxConfig) and config.lambda_scale == "rms":
        assert rms is not None
        hparams["lambda0"] = config.lambda0 / max(rms, 1e-12)
    return hparams


def needs_spread(config: MethodConfig) -> bool:
    """Whether a solve with ``config`` uses its Gram's sequence spread (``ridge_shrinkage``), so
    that calibration tracks it (:class:`~prox24_lightning.ops.gram.GramAccumulator`)."""
    return bool(getattr(config, "ridge_shrinkage", None))


def layer_ridge(
    config: MethodConfig, gram: Tensor, n_tokens: int | None, spread: GramSpread | None
) -> tuple[float, str]:
    """The ridge ``δ`` of a layer's ridged objective ``tr((W-Ŵ)(H + δ mean(diag H) I)(W-Ŵ)ᵀ)``
    and the rule that set it (``ProxConfig``'s ``ridge``, ``ridge_tokens``, ``ridge_shrinkage``).

    * ``shrinkage``: ``ridge_shrinkage`` (> 0) times the Ledoit-Wolf ridge of the calibration
      sequences' spread (:func:`~prox24_lightning.ops.gram.shrinkage_ridge`), when it is known;
    * ``tokens``: otherwise ``ridge · ridge_tokens / N`` with the token count known;
    * ``fixed``: otherwise ``ridge``; ``(0.0, "none")`` without a ridge.
    """
    shrink = getattr(config, "ridge_shrinkage", None)
    if shrink and spread is not None:
        return float(shrink) * shrinkage_ridge(gram, spread), "shrinkage"
    ridge = float(getattr(config, "ridge", 0.0) or 0.0)
    if ridge <= 0:
        return 0.0, "none"
    ridge_tokens = getattr(config, "ridge_tokens", None)
    if ridge_tokens is not None and n_tokens is not None:
        return ridge * int(ridge_tokens) / int(n_tokens), "tokens"
    return ridge, "fixed"


class LayerSolve:
    """One layer's solve, driven one optimizer step at a time.

    Build it, :meth:`attach` it to a :class:`Prox24` (the optimizer then owns the layer's
    problem and working weight), step the optimizer until :meth:`done`, call :meth:`observe`
    after every step, and take the :meth:`result`.

    Args:
        weight: ``[d_out, d_in]`` dense weight (any float dtype).
        gram: ``[d_in, d_in]`` Gram matrix ``sum_t x_t x_t^T``.
        method: a name in :data:`~prox24_lightning.solvers.methods.METHODS`.
        config: the method's config (e.g. :class:`ProxConfig`), or a mapping for
            :func:`~prox24_lightning.solvers.methods.make_config`.
        trace: record the prox phase's ``[step, lambda, frac_2of4]`` rows in
            ``stats.extra["trace"]`` (a few dozen rows; see :data:`TRACE_DFRAC`).
        n_tokens: the number of calibration tokens summed in ``gram``. The problem is then
            solved on ``gram * REFERENCE_TOKENS / n_tokens`` (the paper's 2^21 tokens), so that
            a lambda means the same at any calibration size (``ProxConfig``); losses in the
            stats stay in the units of ``gram``. ``None``: ``gram`` is used as given.
        spread: how much the calibration sequences' own Grams disagree
            (:meth:`~prox24_lightning.calibration.GramCollector.spread_of`): with it, a config's
            ``ridge_shrinkage`` sets the ridge (:func:`layer_ridge`).
    """

    def __init__(
        self,
        weight: Tensor,
        gram: Tensor,
        method: str,
        config: MethodConfig | dict[str, Any] | None = None,
        *,
        trace: bool = True,
        n_tokens: int | None = None,
        spread: GramSpread | None = None,
    ) -> None:
        self.method_class = get_method(method)
        check_layer_inputs(weight, gram)
        config = make_config(method, config)
        self._start = time.perf_counter()
        self.method = method
        self.config = config
        self.dtype = weight.dtype
        steps = self.method_class.refine_steps(config)
        self.stats = PruneStats(method=method, refine_steps=steps)
        self._method_weight: Tensor | None = None  # the method's point, kept for refinement
        device = weight.device
        #: Gram units -> solver units (losses are divided by it again for the stats).
        self.token_scale = token_scale(n_tokens)
        # IEEE fp32 products (SparseGPT, ALPS, ...) whatever the global matmul precision.
        with torch.autocast(device_type=device.type, enabled=False), matmul_precision():
            h = gram.detach().to(device=device, dtype=torch.float32)
            # In the Gram's own units, which the spread's sums share.
            ridge, rule = layer_ridge(config, h, n_tokens, spread)
            if self.token_scale != 1.0:
                h = h * self.token_scale
            self.norm = normalize(h)
            target = self.norm.to_normalized(weight.detach().to(torch.float32))
            #: column map of the ridge coordinates (``ProxConfig.ridge``): the problem is solved
            #: for ``B = W̃ diag(s)``, ``s_j^2 = 1 + ridge_j``; ``None`` without a ridge.
            self.col_scale: Tensor | None = None
            if ridge > 0:
                self.stats.extra["ridge"] = ridge
                self.stats.extra["ridge_rule"] = rule
                target_r, gram_r, self.col_scale = alps_coordinates(
                    target, self.norm, dampening=ridge
                )
                self.problem = LocalProblem(
                    gram=gram_r, target=target_r, lipschitz=lipschitz(gram_r)
                )
            else:
                self.problem = LocalProblem(
                    gram=self.norm.gram, target=target, lipschitz=lipschitz(self.norm.gram)
                )
            self._start_point = self.method_class.one_shot(target, self.norm, config)
            if self.col_scale is not None:
                if self._start_point is not None:
                    start_weight, start_mask = self._start_point
                    self._start_point = (start_weight * self.col_scale, start_mask)
                # Only the ridged problem is kept: its Gram replaces H̃ in memory.
                self.norm = dataclasses.replace(self.norm, gram=None)  # type: ignore[arg-type]
        self.stats.dead_features = self.norm.n_dead
        self.stats.extra["lipschitz"] = self.problem.lipschitz
        self._method_done = False
        self._method_objective = 0.0
        #: the exact mask search's factorisations: its shared inverse and one per row (at least:
        #: drifted rows are factored again).
        self._search_factorizations = 0
        self._trace: list[list[float]] | None = None
        if trace and self._start_point is None:
            self._trace = self.stats.extra["trace"] = []
        self.name: str | None = None
        self.optimizer: Prox24 | None = None

    def attach(self, optimizer: Prox24, name: str) -> None:
        """Hand the layer to ``optimizer`` as ``name``: baselines go straight to refinement."""
        rms = None
        if getattr(self.config, "lambda_scale", None) == "rms":
            rms = float(self.problem.target.square().mean().sqrt())
        hparams = optimizer_hparams(self.config, self.stats.refine_steps, rms)
        weight = mask = None
        if self._start_point is not None:
            weight, mask = self._start_point
        self.work = optimizer.add_layer(name, self.problem, weight=weight, mask=mask, **hparams)
        self._start_point = None
        self.name, self.optimizer = name, optimizer
        if mask is not None:
            self._record_method()

    def local_loss(self, work: Tensor, objective: float | None = None) -> float:
        """The local loss ``tr((W-Ŵ)H(W-Ŵ)ᵀ)`` of the working weight, in the Gram's units.

        With a ridge the problem is ``(B - B̂) G (B - B̂)ᵀ = (W̃ - T)(H̃ + diag(r))(W̃ - T)ᵀ``
        (``B = W̃ diag(s)``, ``s^2 = 1 + r``), so the local loss is that minus ``sum_ij r_j
        (W̃ - T)_ij^2``: no second Gram is kept for it. ``objective``: ``problem.loss(work)``
        when the caller has it (it costs a GEMM).
        """
        if objective is None:
            objective = self.problem.loss(work)
        if self.col_scale is not None:
            diff = (work - self.problem.target) / self.col_scale
            ridge = self.col_scale.square() - 1.0
            objective -= float((diff.square() * ridge).sum())
        return objective / self.token_scale

    def _status(self) -> LayerStatus:
        assert self.optimizer is not None and self.name is not None, "attach() first"
        return self.optimizer.status(self.name)

    def observe(self) -> None:
        """Call after every step: records the loss when the method's own phase ends."""
        if self._method_done:
            return
        st = self._status()
        if self._trace is not None:
            self._record_trace(st)
        if st.support_fixed:
            self._record_method()

    def _record_trace(self, st: LayerStatus) -> None:
        rows = self._trace
        assert rows is not None
        step = st.prox_steps
        if step == 0:
            return
        lam, frac = st.lam, st.frac_2of4
        if rows:
            last_step, last_lam, last_frac = rows[-1]
            if step == last_step:
                return
            final = st.support_fixed
            moved = abs(frac - last_frac) >= TRACE_DFRAC or lam >= last_lam * TRACE_LAMBDA_FACTOR
            if not final and (not moved or len(rows) >= TRACE_MAX_ROWS):
                return
        rows.append([step, lam, frac])

    def _record_method(self) -> None:
        st = self._status()
        assert self.problem.mask is not None
        self._search_mask()
        self.stats.iterations_to_2of4 = st.prox_steps
        self.stats.final_lambda = st.lam
        self.stats.forced_2of4 = st.forced
        cap = getattr(self.config, "max_prox_steps", None)
        self.stats.capped = cap is not None and st.prox_steps >= cap
        # Refinement is a descent on a convex problem: a higher objective at its end is fp32
        # rounding (e.g. gradient steps from the search's exact refit); result() then keeps this
        # point.
        self._method_objective = self.problem.loss(self.work)
        self.stats.loss_method = self.local_loss(self.work, self._method_objective)
        self._method_weight = self.work.clone() if self.stats.refine_steps > 0 else None
        self.stats.loss_mask_only = self.local_loss(
            apply_mask(self.problem.target, self.problem.mask)
        )
        self._method_done = True

    def _search_mask(self) -> None:
        """``mask_search_rounds > 0`` (prox): improve the method's mask by exact local moves
        (:func:`~prox24_lightning.solvers.mask_search.mask_search`) before the refinement,
        which then runs on the new mask from the search's refit. Records
        ``stats.extra["mask_search"]``."""
        rounds = int(getattr(self.config, "mask_search_rounds", 0) or 0)
        if rounds <= 0:
            return
        start = time.perf_counter()
        device = self.work.device.type
        loss_before = self.local_loss(self.work)
        ridge = float(self.config.mask_search_ridge)
        with torch.autocast(device_type=device, enabled=False), matmul_precision():
            target, gram, work = self.problem.target, self.problem.gram, self.work
            scale = None
            if ridge > 0:
                # ALPS's ridged objective, in its unit-diagonal coordinates B = W̃ diag(s).
                target, gram, scale = alps_coordinates(target, self.norm, dampening=ridge)
                work = work * scale
            found = mask_search(
                target,
                gram,
                work,
                self.problem.mask,
                rounds=rounds,
                swaps=self.config.mask_search_swaps,
                candidates=self.config.mask_search_candidates,
                dampening=self.config.mask_search_dampening,
            )
            weight = found.weight if scale is None else found.weight / scale
        assert self.optimizer is not None and self.name is not None
        # The optimizer owns the layer's point and support: it takes the search's result.
        self.optimizer.replace_support(self.name, weight, found.mask)
        self._search_factorizations = 1 + int(self.work.shape[0])
        self.stats.extra["mask_search"] = {
            "loss_before": loss_before,
            "moves": int(found.moves),
            "rows_kept": int(found.rows_kept),
            "dampening": found.dampening,
            "ridge": ridge,
            "seconds": time.perf_counter() - start,
        }

    def done(self) -> bool:
        return self._status().done

    def result(self) -> PruneResult:
        """Finish: final loss, back to original coordinates and dtype, exact 2:4 checked."""
        st = self._status()
        self.observe()
        mask = self.problem.mask
        assert mask is not None
        with torch.autocast(device_type=self.work.device.type, enabled=False):
            objective = self.problem.loss(self.work)
            if self._method_weight is not None and objective > self._method_objective:
                self.work.copy_(self._method_weight)
                objective = self._method_objective
            self._method_weight = None
            self.stats.loss_final = self.local_loss(self.work, objective)
            work = self.work if self.col_scale is None else self.work / self.col_scale
            final = apply_mask(self.norm.from_normalized(work), mask).to(self.dtype)
            # The cast can flush tiny kept weights to zero but must never leave -0.0 behind.
            final = apply_mask(final, mask)
        self.stats.gemms = st.gemms
        self.stats.extra["factorizations"] = st.factorizations + self._search_factorizations
        if not is_2of4(final):  # pragma: no cover - guaranteed by construction
            raise AssertionError("internal error: result is not 2:4")
        self.stats.seconds = time.perf_counter() - self._start
        return PruneResult(weight=final, mask=mask, stats=self.stats)

    def detach(self) -> None:
        """Remove the layer from its optimizer (after :meth:`result`)."""
        if self.optimizer is not None and self.name is not None:
            self.optimizer.remove_layer(self.name)
        self.optimizer = None

    def progress(self) -> dict[str, Any]:
        st = self._status()
        return {
            "phase": st.phase,
            "iteration": st.prox_steps + st.refine_done,
            "lambda": st.lam,
            "frac_2of4": st.frac_2of4,
        }


@torch.no_grad()
def prune_weight(
    weight: Tensor,
    gram: Tensor,
    method: str = "prox",
    *,
    refine_steps: int | None = None,
    config: MethodConfig | dict[str, Any] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    progress_every: int = 50,
    n_tokens: int | None = None,
    spread: GramSpread | None = None,
    **hparams: Any,
) -> PruneResult:
    """Prune one linear layer to 2:4 on its local squared loss ``tr((W-Ŵ)H(W-Ŵ)ᵀ)``.

    Args:
        weight: ``[d_out, d_in]`` weight (any float dtype; ``d_in`` divisible by 4).
        gram: ``[d_in, d_in]`` Gram matrix ``sum_t x_t x_t^T`` of the calibration inputs.
        method: a name in :data:`~prox24_lightning.solvers.methods.METHODS` (``"prox"``,
            ``"wanda"``, ``"sparsegpt"``, ``"magnitude"``).
        refine_steps: masked refinement iterations; ``None`` = the method's default (1000 for
            prox, 0 for the baselines).
        config: the method's config (e.g. ``RECIPES["fast"]``) or a mapping (``{"recipe":
            "fast"}``); ``hparams`` override its fields (``lambda0``, ``beta``, ``refine``, ...).
        progress: optional callback receiving ``{"phase", "iteration", "lambda", "frac_2of4"}``.
        progress_every: call ``progress`` every this many iterations.
        n_tokens: calibration tokens summed in ``gram`` (see :class:`LayerSolve`): with it, an
            absolute ``lambda0`` is in the units of the paper's 2^21 tokens at any token count.
        spread: the calibration sequences' spread (:class:`LayerSolve`), for the shrinkage ridge.

    Returns:
        :class:`PruneResult` with ``.weight``, ``.mask`` and ``.stats``.
    """
    if refine_steps is not None:
        hparams["refine_steps"] = refine_steps
    cfg = make_config(method, config, **hparams)
    solve = LayerSolve(weight, gram, method, cfg, n_tokens=n_tokens, spread=spread)
    optimizer = Prox24()
    solve.attach(optimizer, "layer")
    it = 0
    while not solve.done():
        optimizer.step()
        solve.observe()
        it += 1
        if progress is not None and it % progress_every == 0:
            progress(solve.progress())
    return solve.result()
