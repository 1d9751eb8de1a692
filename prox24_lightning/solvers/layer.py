"""One entry point per layer, :func:`prune_weight`, and the :class:`LayerSolve` behind it.

``prune_weight(weight, gram, method)`` normalises the problem (paper.md §4.1), runs the chosen
method through the :class:`~prox24_lightning.optim.Prox24` optimizer, optionally refines the kept
weights on the fixed mask ("+GD"), maps back to the original coordinates and returns an exactly
2:4 weight in the input dtype. The Lightning pipeline drives the same :class:`LayerSolve` objects
through its own (Lightning-wrapped) optimizer, so both paths compute the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from ..ops.gram import lipschitz, normalize
from ..ops.masks import apply_mask, is_2of4
from ..optim.prox24 import LocalProblem, Prox24
from .baselines import magnitude_prune, sparsegpt_prune, wanda_prune

__all__ = [
    "METHODS",
    "RECIPES",
    "LayerSolve",
    "PruneResult",
    "PruneStats",
    "SolverConfig",
    "prune_weight",
]

Method = Literal["magnitude", "wanda", "sparsegpt", "prox"]
METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt", "prox")


@dataclass
class SolverConfig:
    """Hyper-parameters of the layer solvers (all in the normalised coordinates).

    Attributes:
        refine_steps: masked refinement iterations after the method; ``None`` means the method's
            default (1000 for prox, 0 for the baselines). ``> 0`` after a baseline is its "+GD".
        refine: ``"gd"`` (the paper's masked gradient, step ``1/L``) or ``"cg"`` (conjugate
            gradients on the fixed support: same limit, the per-row refit, in far fewer GEMMs).
        lambda0: first lambda of the prox schedule (paper: 0.01; 1e-3 for 70B).
        lambda_scale: ``absolute`` uses ``lambda0`` as given (the paper); ``rms`` divides it by the
            RMS of the layer's normalised weights. ``r`` is cubic, so ``prox_{c lam r}(c z) =
            c prox_{lam c r}(z)``: only ``lambda * scale`` matters, and with ``rms`` every layer
            starts at the same point of its own path (layers with small normalised weights no
            longer need hundreds of extra iterations).
        beta: geometric growth of lambda per prox iteration (paper: 1.01; 1.005 for 70B).
        momentum: extrapolation in the prox phase; 0 is the paper's plain proximal gradient.
        max_prox_steps: cap on prox iterations (then forced to 2:4 by magnitude, reported).
        switch_at: end the prox phase once this fraction of groups is 2:4 (1.0 = the paper).
        beta_tail: lambda growth once ``tail_from`` of the groups are 2:4 (None = ``beta``).
        tail_from: where ``beta_tail`` takes over.
        sparsegpt_blocksize: SparseGPT's lazy-update block size (multiple of 4).
        sparsegpt_dampening: SparseGPT's dampening relative to the (unit) diagonal.
    """

    refine_steps: int | None = None
    refine: Literal["gd", "cg"] = "gd"
    lambda0: float = 0.01
    lambda_scale: Literal["absolute", "rms"] = "absolute"
    beta: float = 1.01
    momentum: float = 0.0
    max_prox_steps: int = 20000
    switch_at: float = 1.0
    beta_tail: float | None = None
    tail_from: float = 0.9
    sparsegpt_blocksize: int = 128
    sparsegpt_dampening: float = 0.01

    def steps_for(self, method: str) -> int:
        if self.refine_steps is not None:
            return int(self.refine_steps)
        return 1000 if method == "prox" else 0


#: Named solver settings. ``paper`` is the recipe of Kübler et al.: plain proximal gradient with
#: lambda0 0.01, beta 1.01 until every group is 2:4, then 1000 masked-gradient steps. ``fast``
#: reaches a lower local loss in about a quarter of the time: (i) momentum 0.9 in the prox phase
#: (FISTA-style extrapolation; it finds better masks, see the toy experiment), which lets lambda
#: grow (ii) 1.03x per step, and 1.1x once 90% of the groups are 2:4, from (iii) lambda0 relative
#: to the RMS of the layer's normalised weights (every layer starts at the same point of its
#: path; with an absolute lambda0 the quick schedule is too quick for small weights), (iv) the
#: prox stops at 99.9% (the last groups keep their two largest compensated entries) and (v) 50
#: conjugate-gradient steps reach the per-row least-squares refit that 1000 gradient steps only
#: approach. Measured by ``tools/bench_solver.py`` on SmolLM2-135M (docs/results.md);
#: ``tests/test_recipes.py`` guards loss and cost.
RECIPES: dict[str, SolverConfig] = {
    "paper": SolverConfig(lambda0=0.01, beta=1.01, momentum=0.0, refine="gd", refine_steps=1000),
    "fast": SolverConfig(
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
}


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

    ``extra`` holds ``lipschitz`` and, for prox, ``trace`` (see :data:`TRACE_DFRAC`).
    """

    method: str
    refine_steps: int
    iterations_to_2of4: int = 0
    final_lambda: float = 0.0
    forced_2of4: bool = False
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


class LayerSolve:
    """One layer's solve, driven one optimizer step at a time.

    Args:
        weight: ``[d_out, d_in]`` dense weight (any float dtype).
        gram: ``[d_in, d_in]`` Gram matrix ``sum_t x_t x_t^T``.
        method: ``"magnitude" | "wanda" | "sparsegpt" | "prox"``.
        config: :class:`SolverConfig`.
        trace: record the prox phase's ``[step, lambda, frac_2of4]`` rows in
            ``stats.extra["trace"]`` (a few dozen rows; see :data:`TRACE_DFRAC`).
    """

    def __init__(
        self,
        weight: Tensor,
        gram: Tensor,
        method: str,
        config: SolverConfig,
        *,
        trace: bool = True,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        check_layer_inputs(weight, gram)
        if config.sparsegpt_blocksize % 4:
            raise ValueError("sparsegpt_blocksize must be a multiple of 4")
        self._start = time.perf_counter()
        self.method = method
        self.config = config
        self.dtype = weight.dtype
        steps = config.steps_for(method)
        self.stats = PruneStats(method=method, refine_steps=steps)
        device = weight.device
        with torch.autocast(device_type=device.type, enabled=False):
            h = gram.detach().to(device=device, dtype=torch.float32)
            self.norm = normalize(h)
            target = self.norm.to_normalized(weight.detach().to(torch.float32))
            self.problem = LocalProblem(
                gram=self.norm.gram, target=target, lipschitz=lipschitz(self.norm.gram)
            )
            self.work = target.clone()
            self._baseline_mask: Tensor | None = None
            if method == "magnitude":
                pruned, self._baseline_mask = magnitude_prune(target, self.norm.scale)
            elif method == "wanda":
                pruned, self._baseline_mask = wanda_prune(target)
            elif method == "sparsegpt":
                pruned, self._baseline_mask = sparsegpt_prune(
                    target,
                    self.norm.gram,
                    blocksize=config.sparsegpt_blocksize,
                    dampening=config.sparsegpt_dampening,
                )
            if self._baseline_mask is not None:
                self.work.copy_(pruned)
        self.stats.dead_features = self.norm.n_dead
        self.stats.extra["lipschitz"] = self.problem.lipschitz
        self._method_done = False
        self._trace: list[list[float]] | None = None
        if trace and method == "prox":
            self._trace = self.stats.extra["trace"] = []

    def param_group(self, name: str) -> dict[str, Any]:
        """A param group for :class:`Prox24` holding this layer's working weight."""
        c = self.config
        lambda0 = c.lambda0
        if c.lambda_scale == "rms":
            rms = float(self.problem.target.square().mean().sqrt())
            lambda0 = c.lambda0 / max(rms, 1e-12)
        return dict(
            params=[self.work],
            name=name,
            lambda0=lambda0,
            beta=c.beta,
            momentum=c.momentum,
            refine=c.refine,
            refine_steps=self.stats.refine_steps,
            max_prox_steps=c.max_prox_steps,
            switch_at=c.switch_at,
            beta_tail=c.beta_tail,
            tail_from=c.tail_from,
        )

    def attach(self, optimizer: Prox24) -> None:
        """Call once the param group is in ``optimizer``: baselines go straight to refinement."""
        if self._baseline_mask is not None:
            optimizer.start_refinement(self.work, self.problem, self._baseline_mask)
            self._record_method(optimizer)

    def observe(self, optimizer: Prox24) -> None:
        """Call after every step: records the loss when the method's own phase ends."""
        if self._method_done:
            return
        if self._trace is not None:
            self._record_trace(optimizer.state[self.work])
        if optimizer.phase(self.work) != "prox":
            self._record_method(optimizer)

    def _record_trace(self, st: dict[str, Any]) -> None:
        rows = self._trace
        assert rows is not None
        step = int(st.get("prox_steps", 0))
        if step == 0:
            return
        lam, frac = float(st["lam"]), float(st["frac_2of4"])
        if rows:
            last_step, last_lam, last_frac = rows[-1]
            if step == last_step:
                return
            final = st["phase"] != "prox"
            moved = abs(frac - last_frac) >= TRACE_DFRAC or lam >= last_lam * TRACE_LAMBDA_FACTOR
            if not final and (not moved or len(rows) >= TRACE_MAX_ROWS):
                return
        rows.append([step, lam, frac])

    def _record_method(self, optimizer: Prox24) -> None:
        st = optimizer.state[self.work]
        assert self.problem.mask is not None
        self.stats.iterations_to_2of4 = st["prox_steps"]
        self.stats.final_lambda = st["lam"]
        self.stats.forced_2of4 = bool(st["forced"])
        self.stats.loss_method = self.problem.loss(self.work)
        self.stats.loss_mask_only = self.problem.loss(
            apply_mask(self.problem.target, self.problem.mask)
        )
        self._method_done = True

    def done(self, optimizer: Prox24) -> bool:
        return optimizer.phase(self.work) == "done"

    def result(self, optimizer: Prox24) -> PruneResult:
        """Finish: final loss, back to original coordinates and dtype, exact 2:4 checked."""
        st = optimizer.state[self.work]
        self.observe(optimizer)
        mask = self.problem.mask
        assert mask is not None
        with torch.autocast(device_type=self.work.device.type, enabled=False):
            self.stats.loss_final = self.problem.loss(self.work)
            final = apply_mask(self.norm.from_normalized(self.work), mask).to(self.dtype)
            # The cast can flush tiny kept weights to zero but must never leave -0.0 behind.
            final = apply_mask(final, mask)
        self.stats.gemms = st["prox_steps"] + st["refine_done"]
        if not is_2of4(final):  # pragma: no cover - guaranteed by construction
            raise AssertionError("internal error: result is not 2:4")
        self.stats.seconds = time.perf_counter() - self._start
        return PruneResult(weight=final, mask=mask, stats=self.stats)

    def progress(self, optimizer: Prox24) -> dict[str, Any]:
        st = optimizer.state[self.work]
        return {
            "phase": st["phase"],
            "iteration": st["prox_steps"] + st["refine_done"],
            "lambda": st["lam"],
            "frac_2of4": st["frac_2of4"],
        }


@torch.no_grad()
def prune_weight(
    weight: Tensor,
    gram: Tensor,
    method: Method | str = "prox",
    *,
    refine_steps: int | None = None,
    config: SolverConfig | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    progress_every: int = 50,
    **hparams: Any,
) -> PruneResult:
    """Prune one linear layer to 2:4 on its local squared loss ``tr((W-Ŵ)H(W-Ŵ)ᵀ)``.

    Args:
        weight: ``[d_out, d_in]`` weight (any float dtype; ``d_in`` divisible by 4).
        gram: ``[d_in, d_in]`` Gram matrix ``sum_t x_t x_t^T`` of the calibration inputs.
        method: ``"magnitude" | "wanda" | "sparsegpt" | "prox"``.
        refine_steps: masked refinement iterations; ``None`` = the method's default (1000 for
            prox, 0 for the baselines).
        config: a :class:`SolverConfig` (e.g. ``RECIPES["fast"]``); ``hparams`` override its
            fields (``lambda0``, ``beta``, ``momentum``, ``refine``, ...).
        progress: optional callback receiving ``{"phase", "iteration", "lambda", "frac_2of4"}``.
        progress_every: call ``progress`` every this many iterations.

    Returns:
        :class:`PruneResult` with ``.weight``, ``.mask`` and ``.stats``.
    """
    cfg = replace(config or SolverConfig(), **hparams)
    if refine_steps is not None:
        cfg = replace(cfg, refine_steps=refine_steps)
    solve = LayerSolve(weight, gram, method, cfg)
    optimizer = Prox24([solve.param_group("layer")])
    solve.attach(optimizer)
    it = 0
    while not solve.done(optimizer):
        optimizer.step(problems={"layer": solve.problem})
        solve.observe(optimizer)
        it += 1
        if progress is not None and it % progress_every == 0:
            progress(solve.progress(optimizer))
    return solve.result(optimizer)
