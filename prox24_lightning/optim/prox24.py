"""Algorithm 2 of Kübler et al. ("Matrix Prox Pruner 2:4") as a ``torch.optim.Optimizer``.

Each parameter is a weight matrix in the normalised coordinates of paper.md §4.1 (fp32), paired
with a :class:`LocalProblem` that holds the layer's normalised Gram ``H̃`` and dense target ``Ŵ̃``.
One call of :meth:`Prox24.step` is one iteration and costs one GEMM ``W H̃``:

* proximal phase, ``lambda_k = lambda0 * beta^k``::

      W <- prox_{(lambda_k / L) r}(W - (W - Ŵ̃) H̃ / L)

  until every group of 4 has at most two non-zeros; then the support is frozen as the mask ``M``
  (groups with fewer than two non-zeros are filled with their largest entries of ``|Ŵ̃|``);
  with ``prox_solver="admm"`` the same lambda path runs inside ALPS's ADMM splitting instead
  (:mod:`~prox24_lightning.optim.admm`), and ``M`` is the top two of every group of its last
  least-squares iterate;
* refinement phase on the local loss with ``M`` fixed (paper's equation 5), either plain masked
  gradient steps ``W <- W - M ⊙ (W - Ŵ̃) H̃ / L`` (``refine="gd"``, the paper's recipe) or
  conjugate gradients on the fixed support (``refine="cg"``, same limit: the per-row
  least-squares refit, reached in far fewer GEMMs).

**GPU grade.** A prox iteration is one call of the pure
:func:`~prox24_lightning.optim.functional.prox_phase_step`, with lambda and the counters as 0-d
tensors on the device; on CUDA it runs under ``torch.compile(fullgraph=True)`` by default
(``compile``). The host reads the counters back every ``check_every`` iterations (1 on a CPU,
where a read costs nothing, 10 elsewhere); the function stops changing anything once the phase
has ended, so the switch iteration, the mask and every later result are the same for every
``check_every``. Gradients are ``(W - Ŵ̃) H̃``, one GEMM without cancellation. Refinement always
runs in IEEE fp32 (:func:`~prox24_lightning.ops.precision.matmul_precision`); the prox phase may
use TF32 (``prox_tf32``).

The large per-layer tensors live in the :class:`LocalProblem`, never in ``optimizer.state``, so
Lightning checkpoints hold only a few scalars per layer.

Reference: Kübler et al., "A Proximal Operator for Inducing 2:4-Sparsity", TMLR 2025.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..ops.cg import MaskedCG
from ..ops.masks import apply_mask, mask_2of4
from ..ops.precision import matmul_precision
from .admm import Eigenbasis, admm_phase_step
from .device_state import ADMM_UPDATE_EVERY, DeviceADMM, DeviceProx
from .functional import compiled_prox_phase_step, prox_phase_step
from .settings import ProxPhaseSettings, RefineMethod

__all__ = ["LayerStatus", "LocalProblem", "Prox24"]


@dataclass
class LocalProblem:
    """One layer's local least-squares problem in normalised coordinates (all fp32).

    Attributes:
        gram: ``H̃`` ``[d_in, d_in]``.
        target: dense ``Ŵ̃`` ``[d_out, d_in]``.
        lipschitz: ``L >= lambda_max(H̃)``; gradient steps are ``1/L``.
        mask: the fixed 2:4 support, set when the proximal phase ends (or given, for "+GD" after a
            baseline).
    """

    gram: Tensor
    target: Tensor
    lipschitz: float
    mask: Tensor | None = None
    # Conjugate-gradient state of the refinement (``refine: cg``), started at its first step.
    cg: MaskedCG | None = field(default=None, init=False)
    # Previous prox iterate, for momentum.
    previous: Tensor | None = field(default=None, init=False)
    # ``H̃ = Q Λ Qᵀ`` for the ADMM prox phase (computed when it starts, dropped when it ends).
    basis: Eigenbasis | None = field(default=None, init=False)

    def gradient(self, w: Tensor) -> Tensor:
        """``(W - Ŵ̃) H̃``: one GEMM in IEEE fp32 (also under autocast or a TF32 setting).

        ``W H̃ - Ŵ̃ H̃`` would cost the same but cancels: near the optimum both products are
        large and nearly equal, so their difference loses the digits a refit needs in fp32
        (docs/results.md has the figures).
        """
        with _no_autocast(w.device.type), matmul_precision():
            return (w - self.target) @ self.gram

    def loss(self, w: Tensor, grad: Tensor | None = None) -> float:
        """``tr((W - Ŵ̃) H̃ (W - Ŵ̃)^T)``; free when the gradient is at hand."""
        g = self.gradient(w) if grad is None else grad
        return float(((w - self.target) * g).sum())


@dataclass(frozen=True)
class LayerStatus:
    """Where one layer of a :class:`Prox24` stands (a read-only copy of its host state).

    Attributes:
        phase: ``"prox"`` (the lambda path), ``"refine"`` (on the fixed support) or ``"done"``.
        prox_steps: prox iterations run; refine_done: refinement iterations run.
        lam: the schedule's current lambda; frac_2of4: fraction of groups with at most two
            non-zeros after the last prox iteration.
        forced: the prox phase ended by ``max_prox_steps`` or ``switch_at < 1`` with groups
            still denser than 2:4 (their two largest entries were kept).
        gemms: ``d_out x d_in`` by ``d_in x d_in`` products so far; factorizations: ``d_in x
            d_in`` eigendecompositions and inverses so far.
    """

    phase: str
    prox_steps: int
    refine_done: int
    lam: float
    frac_2of4: float
    forced: bool
    gemms: int
    factorizations: int

    @property
    def support_fixed(self) -> bool:
        """The prox phase has ended: the mask is the layer's fixed support."""
        return self.phase != "prox"

    @property
    def done(self) -> bool:
        return self.phase == "done"


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[None]:
    return torch.autocast(device_type=device_type, enabled=False)


def _check_hparams(h: dict) -> None:
    """Refuse settings that cannot work, naming them (before any iteration): the rules of
    :class:`ProxPhaseSettings`, plus the refinement's."""
    ProxPhaseSettings(**{k: h[k] for k in ProxPhaseSettings.names()}).validate_prox_phase("")
    if h["refine"] not in ("gd", "cg"):
        raise ValueError(f"refine must be 'gd' or 'cg', got {h['refine']!r}")
    if h["refine_steps"] < 0:
        raise ValueError(f"refine_steps must be >= 0, got {h['refine_steps']}")


class Prox24(torch.optim.Optimizer):
    """Proximal-gradient 2:4 pruner with a geometric lambda schedule, then masked refinement.

    The optimizer owns its problems: a layer joins with :meth:`add_layer` (its working weight
    becomes a param group named after the layer, its :class:`LocalProblem` is kept by name) and
    leaves with :meth:`remove_layer`; :meth:`step` advances every layer that is not done by one
    iteration. The keyword arguments are the defaults of every layer; :meth:`add_layer` may
    override them per layer.

    Args:
        refine_steps: refinement iterations once the weights are 2:4 (paper: 1000).
        refine: ``"gd"`` (paper's masked gradient) or ``"cg"`` (conjugate gradients on the fixed
            support, :class:`~prox24_lightning.ops.cg.MaskedCG`).
        settings: the prox phase's settings, :class:`~prox24_lightning.optim.settings.
            ProxPhaseSettings` (``lambda0``, ``beta``, ``momentum``, ``max_prox_steps``,
            ``switch_at``, ``prox_solver``, ...; names, defaults and rules are there). A layer
            capped by ``max_prox_steps`` or switched early by ``switch_at < 1`` is counted in the
            state as ``forced``.
    """

    #: ``torch.compile`` backend of the prox phase (``"eager"`` traces without code generation).
    compile_backend: str = "inductor"

    #: name of the placeholder group that keeps the optimizer valid without layers (torch
    #: optimizers refuse an empty parameter list).
    IDLE = "_idle"

    def __init__(
        self, *, refine_steps: int = 1000, refine: RefineMethod = "gd", **settings: Any
    ) -> None:
        # Unknown names fail here (TypeError), before anything is built.
        prox_phase = ProxPhaseSettings(**settings)
        defaults = dict(**asdict(prox_phase), refine_steps=refine_steps, refine=refine, name=None)
        _check_hparams(defaults)
        super().__init__([{"params": [torch.zeros(1)], "name": self.IDLE}], defaults)
        #: layer name -> its local problem (the large per-layer tensors live here, never in
        #: ``self.state``, so Lightning checkpoints hold only a few scalars per layer).
        self.problems: dict[str, LocalProblem] = {}
        #: layer name -> its prox-phase counters on the device (the host copy in ``self.state``
        #: is refreshed every ``check_every`` iterations, by :meth:`sync` and before
        #: :meth:`state_dict`).
        self._device: dict[str, DeviceProx | DeviceADMM] = {}
        self._compile_failed = False

    # -- layers ----------------------------------------------------------------------------------
    def add_layer(
        self,
        name: str,
        problem: LocalProblem,
        *,
        weight: Tensor | None = None,
        mask: Tensor | None = None,
        **hparams: object,
    ) -> Tensor:
        """Add one layer; returns its working weight (a copy of ``weight``, default the target).

        Args:
            name: the layer's name (unique among the layers being solved).
            problem: its :class:`LocalProblem`.
            weight: the starting point (e.g. a baseline's pruned weight); default ``Ŵ̃``.
            mask: skip the proximal phase and refine on this fixed 2:4 support ("+GD" after a
                baseline).
            hparams: per-layer overrides of the defaults (``lambda0``, ``beta``, ...).
        """
        if name in self.problems or name == self.IDLE:
            raise ValueError(f"layer {name!r} is already in the optimizer")
        unknown = set(hparams) - set(self.defaults)
        if unknown:
            raise TypeError(f"unknown Prox24 settings {sorted(unknown)}")
        _check_hparams({**self.defaults, **hparams})
        work = (problem.target if weight is None else weight).detach().clone()
        self.add_param_group({"params": [work], **hparams, "name": name})
        self.problems[name] = problem
        self._device.pop(name, None)
        self._state(work)
        if mask is not None:
            self.start_refinement(work, problem, mask)
        return work

    def remove_layer(self, name: str) -> None:
        """Drop a layer, its state and its problem (after its result was taken)."""
        group = self._group(name)
        for p in group["params"]:
            self.state.pop(p, None)
        self.param_groups[:] = [g for g in self.param_groups if g is not group]
        self.problems.pop(name, None)
        self._device.pop(name, None)

    @property
    def layers(self) -> list[str]:
        """Names of the layers in the optimizer, in the order they were added."""
        return [g["name"] for g in self.param_groups if g["name"] in self.problems]

    def weight(self, name: str) -> Tensor:
        """The working weight of layer ``name``."""
        return self._group(name)["params"][0]

    def layer_state(self, name: str) -> dict:
        """The scalar state of layer ``name`` (phase, steps, lambda, 2:4 fraction, ...).

        In the prox phase this is the host copy, at most ``check_every - 1`` iterations behind
        the device; :meth:`sync` brings it up to date.
        """
        return self._state(self.weight(name))

    def status(self, name: str) -> LayerStatus:
        """Layer ``name``'s :class:`LayerStatus` (host state: in the prox phase at most
        ``check_every - 1`` iterations behind the device)."""
        st = self.layer_state(name)
        return LayerStatus(
            phase=str(st["phase"]),
            prox_steps=int(st["prox_steps"]),
            refine_done=int(st["refine_done"]),
            lam=float(st["lam"]),
            frac_2of4=float(st["frac_2of4"]),
            forced=bool(st["forced"]),
            gemms=int(st["gemms"]),
            factorizations=int(st["factorizations"]),
        )

    def replace_support(self, name: str, weight: Tensor, mask: Tensor) -> None:
        """Give layer ``name`` a new point and fixed support after its prox phase (a mask
        search's result): its refinement continues from them (a CG refinement restarts)."""
        if not self.status(name).support_fixed:
            raise RuntimeError(f"layer {name!r} is still in its prox phase: no support to replace")
        problem = self.problems[name]
        self.weight(name).copy_(weight)
        problem.mask = mask
        problem.cg = None

    def _group(self, name: str) -> dict:
        for g in self.param_groups:
            if g["name"] == name:
                return g
        raise KeyError(f"layer {name!r} is not in the optimizer")

    # -- state helpers --------------------------------------------------------------------------
    def _state(self, p: Tensor) -> dict:
        st = self.state[p]
        # setdefault: state loaded from an older checkpoint gets the keys it lacks.
        for key, value in dict(
            phase="prox",
            prox_steps=0,
            refine_done=0,
            lam=0.0,
            frac_2of4=0.0,
            forced=0,
            tail_step=-1,
            tail_lam=0.0,
            rho=0.0,
            admm_hard=0,
            gemms=0,
            factorizations=0,
        ).items():
            st.setdefault(key, value)
        return st

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, keeping the ``"phase"`` strings.

        torch's loader rebuilds every iterable state value element by element, which turns a
        ``str`` into ``str(<generator>)``; the phases are restored from ``state_dict`` here.
        """
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        phases = {
            p: state_dict["state"][i]["phase"]
            for i, p in zip(saved_ids, params, strict=False)
            if "phase" in state_dict["state"].get(i, {})
        }
        super().load_state_dict(state_dict)
        for p, phase in phases.items():
            self.state[p]["phase"] = phase
        # The device counters restart from the loaded host state.
        self._device.clear()

    def state_dict(self) -> dict:
        """As :meth:`torch.optim.Optimizer.state_dict`, after :meth:`sync` (exact counters)."""
        self.sync()
        return super().state_dict()

    def sync(self) -> None:
        """Read every layer's prox-phase counters back to the host now (one read per layer),
        ending the phase of layers whose device state says it has ended."""
        for group in self.param_groups:
            dev = self._device.get(group["name"])
            if isinstance(dev, DeviceADMM):
                self._sync_admm(group["params"][0], group, self.problems[group["name"]], dev)
            elif dev is not None:
                self._sync(group["params"][0], group, self.problems[group["name"]])

    def phase(self, name: str) -> str:
        """``"prox"``, ``"refine"`` or ``"done"``."""
        return self.layer_state(name)["phase"]

    def finished(self) -> bool:
        return all(self.phase(n) == "done" for n in self.problems)

    def start_refinement(self, p: Tensor, problem: LocalProblem, mask: Tensor) -> None:
        """Skip the proximal phase: refine ``p`` on a given mask ("+GD" after a baseline)."""
        st = self._state(p)
        problem.mask = mask
        p.copy_(apply_mask(p, mask))
        st["phase"] = "refine" if self._group_of(p)["refine_steps"] > 0 else "done"
        st["frac_2of4"] = 1.0

    def _group_of(self, p: Tensor) -> dict:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise KeyError("parameter not managed by this optimizer")

    # -- the iteration ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], object] | None = None) -> object:  # type: ignore[override]
        """One iteration for every layer that is not done.

        Args:
            closure: called first (Lightning runs ``on_before_optimizer_step`` hooks inside it).
        """
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        for group in self.param_groups:
            problem = self.problems.get(group["name"])
            if problem is None:
                continue
            for p in group["params"]:
                with _no_autocast(p.device.type):
                    self._iterate(p, group, problem)
        return result

    def _iterate(self, p: Tensor, group: dict, problem: LocalProblem) -> None:
        st = self._state(p)
        if p.dtype != torch.float32 and p.dtype != torch.float64:
            raise TypeError(f"Prox24 works on fp32/fp64 weights, got {p.dtype}")
        if st["phase"] == "done":
            return
        if st["phase"] == "prox":
            self._prox_iteration(p, group, problem)
            return
        # Refinement is a least-squares solve: IEEE fp32 whatever the global setting.
        with matmul_precision():
            if group["refine"] == "cg":
                self._cg_step(p, problem)
            else:
                grad = problem.gradient(p)
                p.copy_(apply_mask(p - (1.0 / problem.lipschitz) * grad, problem.mask))
        st["refine_done"] += 1
        st["gemms"] += 1
        if st["refine_done"] >= group["refine_steps"]:
            st["phase"] = "done"
            problem.cg = None

    def _prox_iteration(self, p: Tensor, group: dict, problem: LocalProblem) -> None:
        """One call of :func:`prox_phase_step`; the host looks every ``check_every`` calls."""
        if group["prox_solver"] == "admm":
            self._admm_iteration(p, group, problem)
            return
        st = self._state(p)
        dev = self._device.get(group["name"])
        if dev is None:
            dev = self._device[group["name"]] = DeviceProx.start(p, group, problem, st)
        momentum = group["momentum"] > 0
        if momentum and problem.previous is None:
            # Before the first iteration Y = W_k (W_k - W_{k-1} taken as zero).
            problem.previous = p.clone()
        previous = problem.previous if momentum else p
        args = (p, previous, problem.target, problem.gram, dev.state, dev.const)
        fn = self._step_fn(p, group)
        # Eagerly, only the configured work; compiled, one general graph for every layer (a
        # momentum of 0 and an unreachable tail reduce it to the plain iteration).
        general = fn is not prox_phase_step
        kwargs = dict(momentum=momentum or general, tail=bool(group.get("beta_tail")) or general)
        with matmul_precision(tf32=bool(group.get("prox_tf32", False))):
            w, prev, dev.state = fn(*args, **kwargs)
        p.copy_(w)
        if momentum:
            problem.previous = prev
        dev.pending += 1
        if dev.pending >= dev.check_every or st["prox_steps"] + dev.pending >= dev.max_steps:
            self._sync(p, group, problem)

    def _admm_iteration(self, p: Tensor, group: dict, problem: LocalProblem) -> None:
        """One call of :func:`~prox24_lightning.optim.admm.admm_phase_step` (eager: its prox
        takes the static, sync-free path off the CPU); the host looks every ``check_every``."""
        st = self._state(p)
        dev = self._device.get(group["name"])
        if dev is None:
            dev = self._device[group["name"]] = DeviceADMM.start(p, group, problem, st)
            st["factorizations"] += 1 + (0 if dev.eigen else 1)
        assert isinstance(dev, DeviceADMM) and problem.basis is not None
        update = (dev.calls + 1) % ADMM_UPDATE_EVERY == 0
        # The host state is exact right after a read: then only the step in force is computed.
        sparse_step = "either" if dev.pending else ("project" if st["admm_hard"] else "prox")
        with matmul_precision(tf32=bool(group.get("prox_tf32", False))):
            b, dev.state = admm_phase_step(
                p,
                dev.y,
                problem.basis,
                dev.state,
                dev.const,
                update=update,
                eigen=dev.eigen,
                sparse_step=sparse_step,
            )
        p.copy_(b)
        dev.calls += 1
        dev.pending += 1
        if dev.pending >= dev.check_every or st["prox_steps"] + dev.pending >= dev.max_steps:
            self._sync_admm(p, group, problem, dev)

    def _sync_admm(self, p: Tensor, group: dict, problem: LocalProblem, dev: DeviceADMM) -> None:
        """Copy the ADMM counters to the host; once the phase ended, the support is the top two
        of every group of the last ``B`` (as ALPS projects it) and refinement starts."""
        step, lam, frac, rho, hard, done = dev.state.values()
        st = self._state(p)
        # Work of the iterations the device ran (calls after the stop change nothing): GEMMs,
        # and an inverse rebuilt at every ``ρ`` update unless it is applied through ``Q``.
        before, after = st["prox_steps"], int(step)
        st["gemms"] += (after - before) * (2 if dev.eigen else 1)
        if not dev.eigen:
            updates = after // ADMM_UPDATE_EVERY - before // ADMM_UPDATE_EVERY
            st["factorizations"] += updates
        st["prox_steps"], st["lam"], st["frac_2of4"] = after, lam, frac
        st["rho"], st["admm_hard"] = rho, int(hard)
        dev.pending = 0
        if done:
            del self._device[group["name"]]
            problem.basis = None
            mask = mask_2of4(p.abs())
            problem.mask = mask
            p.copy_(apply_mask(p, mask))
            st["phase"] = "refine" if group["refine_steps"] > 0 else "done"

    def _step_fn(self, p: Tensor, group: dict) -> Callable[..., tuple]:
        use = group.get("compile")
        if use is None:
            use = p.device.type == "cuda"
        if not use or self._compile_failed:
            return prox_phase_step
        compiled = compiled_prox_phase_step(self.compile_backend)

        def guarded(*args: object, **kwargs: object) -> tuple:
            try:
                return compiled(*args, **kwargs)
            except Exception as err:  # compile errors surface at the first call
                # The function is pure: running it again eagerly is safe.
                warnings.warn(
                    f"torch.compile of the prox phase failed ({type(err).__name__}: {err}); "
                    "running it eagerly (set compile=False to skip the attempt)",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self._compile_failed = True
                return prox_phase_step(*args, **kwargs)

        return guarded

    def _sync(self, p: Tensor, group: dict, problem: LocalProblem) -> None:
        """Copy the device counters to the host state; freeze the support if the phase ended."""
        dev = self._device.get(group["name"])
        if dev is None:
            return
        values = dev.state.values()
        st = self._state(p)
        # One GEMM per iteration the device ran (calls after the phase ended change nothing).
        st["gemms"] += int(values[0]) - st["prox_steps"]
        st["prox_steps"], st["lam"], st["frac_2of4"] = int(values[0]), values[1], values[2]
        st["tail_step"], st["tail_lam"] = int(values[3]), values[4]
        dev.pending = 0
        if values[5]:
            st["forced"] = int(st["frac_2of4"] < 1.0)
            del self._device[group["name"]]
            self._freeze_support(p, group, problem)

    def _freeze_support(self, p: Tensor, group: dict, problem: LocalProblem) -> None:
        st = self._state(p)
        # Non-zeros first, by current magnitude (groups still holding 3-4 after an early or forced
        # switch keep their two largest); the dense scores |Ŵ̃| (the Wanda score) fill groups the
        # prox left with fewer than two non-zeros. Exactly two per group are kept.
        mag = p.abs()
        dense = problem.target.abs()
        scores = torch.where(
            p != 0,
            2.0 + mag / mag.amax().clamp_min(torch.finfo(p.dtype).tiny),
            dense / dense.amax().clamp_min(torch.finfo(p.dtype).tiny),
        )
        mask = mask_2of4(scores)
        problem.mask = mask
        problem.previous = None
        p.copy_(apply_mask(p, mask))
        st["phase"] = "refine" if group["refine_steps"] > 0 else "done"

    def _cg_step(self, p: Tensor, problem: LocalProblem) -> None:
        """One step of row-wise conjugate gradients (:class:`~prox24_lightning.ops.cg.MaskedCG`)
        for ``min tr((W-Ŵ̃)H̃(W-Ŵ̃)^T)`` on the fixed support."""
        mask = problem.mask
        assert mask is not None
        if problem.cg is None:
            problem.cg = MaskedCG.start(apply_mask(-problem.gradient(p), mask))
        problem.cg.step(p, problem.gram, mask)
