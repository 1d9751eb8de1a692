"""Algorithm 2 of Kübler et al. ("Matrix Prox Pruner 2:4") as a ``torch.optim.Optimizer``.

Each parameter is a weight matrix in the normalised coordinates of paper.md §4.1 (fp32), paired
with a :class:`LocalProblem` that holds the layer's normalised Gram ``H̃`` and dense target ``Ŵ̃``.
One call of :meth:`Prox24.step` is one iteration and costs one GEMM ``W H̃``:

* proximal phase, ``lambda_k = lambda0 * beta^k``::

      W <- prox_{(lambda_k / L) r}(W - (W H̃ - Ŵ̃ H̃) / L)

  until every group of 4 has at most two non-zeros; then the support is frozen as the mask ``M``
  (groups with fewer than two non-zeros are filled with their largest entries of ``|Ŵ̃|``);
* refinement phase on the local loss with ``M`` fixed (paper's equation 5), either plain masked
  gradient steps ``W <- W - M ⊙ (W H̃ - Ŵ̃ H̃) / L`` (``refine="gd"``, the paper's recipe) or
  conjugate gradients on the fixed support (``refine="cg"``, same limit: the per-row
  least-squares refit, reached in far fewer GEMMs).

The large per-layer tensors live in the :class:`LocalProblem`, never in ``optimizer.state``, so
Lightning checkpoints hold only a few scalars per layer.

Reference: Kübler et al., "A Proximal Operator for Inducing 2:4-Sparsity", TMLR 2025.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..ops.masks import apply_mask, mask_2of4
from ..ops.prox import group_view, prox_2of4

__all__ = ["LocalProblem", "Prox24"]

RefineMethod = Literal["gd", "cg"]


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
    target_gram: Tensor = field(init=False)
    # Conjugate-gradient state (residual, direction, squared residual norms per row).
    cg: dict[str, Tensor] = field(default_factory=dict, init=False)
    # Previous prox iterate, for momentum.
    previous: Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # Ŵ̃ H̃ once, so each iteration's gradient (W - Ŵ̃) H̃ = W H̃ - Ŵ̃ H̃ costs one GEMM.
        # fp32 even when built or evaluated under autocast (which would run these GEMMs in bf16).
        with _no_autocast(self.target.device.type):
            self.target_gram = self.target @ self.gram

    def gradient(self, w: Tensor) -> Tensor:
        with _no_autocast(w.device.type):
            return w @ self.gram - self.target_gram

    def loss(self, w: Tensor, grad: Tensor | None = None) -> float:
        """``tr((W - Ŵ̃) H̃ (W - Ŵ̃)^T)``; free when the gradient is at hand."""
        g = self.gradient(w) if grad is None else grad
        return float(((w - self.target) * g).sum())


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[None]:
    return torch.autocast(device_type=device_type, enabled=False)


def _check_hparams(h: dict) -> None:
    """Refuse settings that cannot work, naming them (before any iteration)."""
    if not 0.0 < h["switch_at"] <= 1.0:
        raise ValueError(f"switch_at must be in (0, 1], got {h['switch_at']}")
    if h["beta_tail"] is not None and h["beta_tail"] < 1:
        raise ValueError(f"beta_tail must be >= 1, got {h['beta_tail']}")
    if h["lambda0"] <= 0 or h["beta"] < 1:
        raise ValueError(
            f"need lambda0 > 0 and beta >= 1, got lambda0={h['lambda0']} beta={h['beta']}"
        )
    if not 0.0 <= h["momentum"] < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {h['momentum']}")
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
        lambda0: first regularisation strength (paper: 0.01; 1e-3 for 70B models).
        beta: geometric growth of lambda per iteration (paper: 1.01; 1.005 for 70B models).
        refine_steps: refinement iterations once the weights are 2:4 (paper: 1000).
        refine: ``"gd"`` (paper's masked gradient) or ``"cg"`` (conjugate gradients).
        max_prox_steps: safety cap on proximal iterations; the support is then forced to 2:4 with
            the largest magnitudes (counted in the state as ``forced``).
        momentum: heavy-ball/Nesterov extrapolation ``Y = W_k + m (W_k - W_{k-1})`` before the
            gradient step of the proximal phase (0 is the paper's plain proximal gradient). With
            0.9 the same local loss is reached with several times fewer iterations (see
            ``tools/bench_solver.py``).
        switch_at: end the proximal phase once this fraction of groups is 2:4 (1.0: the paper's
            rule, every group); the remaining groups keep the two largest entries of the current,
            already compensated iterate. Counted in the state as ``forced`` when < 1.
        beta_tail: if set, lambda grows by this factor (instead of ``beta``) once ``tail_from`` of
            the groups are 2:4: the mask is mostly decided and the last groups only need lambda
            to grow past their threshold.
        tail_from: fraction of 2:4 groups where ``beta_tail`` takes over.
    """

    #: name of the placeholder group that keeps the optimizer valid without layers (torch
    #: optimizers refuse an empty parameter list).
    IDLE = "_idle"

    def __init__(
        self,
        *,
        lambda0: float = 0.01,
        beta: float = 1.01,
        refine_steps: int = 1000,
        refine: RefineMethod = "gd",
        max_prox_steps: int = 20000,
        momentum: float = 0.0,
        switch_at: float = 1.0,
        beta_tail: float | None = None,
        tail_from: float = 0.9,
    ) -> None:
        defaults = dict(
            lambda0=lambda0,
            beta=beta,
            refine_steps=refine_steps,
            refine=refine,
            max_prox_steps=max_prox_steps,
            momentum=momentum,
            switch_at=switch_at,
            beta_tail=beta_tail,
            tail_from=tail_from,
            name=None,
        )
        _check_hparams(defaults)
        super().__init__([{"params": [torch.zeros(1)], "name": self.IDLE}], defaults)
        #: layer name -> its local problem (the large per-layer tensors live here, never in
        #: ``self.state``, so Lightning checkpoints hold only a few scalars per layer).
        self.problems: dict[str, LocalProblem] = {}

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

    @property
    def layers(self) -> list[str]:
        """Names of the layers in the optimizer, in the order they were added."""
        return [g["name"] for g in self.param_groups if g["name"] in self.problems]

    def weight(self, name: str) -> Tensor:
        """The working weight of layer ``name``."""
        return self._group(name)["params"][0]

    def layer_state(self, name: str) -> dict:
        """The scalar state of layer ``name`` (phase, steps, lambda, 2:4 fraction, ...)."""
        return self._state(self.weight(name))

    def _group(self, name: str) -> dict:
        for g in self.param_groups:
            if g["name"] == name:
                return g
        raise KeyError(f"layer {name!r} is not in the optimizer")

    # -- state helpers --------------------------------------------------------------------------
    def _state(self, p: Tensor) -> dict:
        st = self.state[p]
        if not st:
            st.update(
                phase="prox",
                prox_steps=0,
                refine_done=0,
                lam=0.0,
                frac_2of4=0.0,
                forced=0,
                tail_step=-1,
                tail_lam=0.0,
            )
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
        inv_l = 1.0 / problem.lipschitz
        if st["phase"] == "prox":
            k = st["prox_steps"]
            beta_tail = group.get("beta_tail")
            if beta_tail and st.get("tail_step", -1) < 0 and st["frac_2of4"] >= group["tail_from"]:
                st["tail_step"], st["tail_lam"] = k, group["lambda0"] * group["beta"] ** k
            if beta_tail and st.get("tail_step", -1) >= 0:
                lam = st["tail_lam"] * beta_tail ** (k - st["tail_step"])
            else:
                lam = group["lambda0"] * group["beta"] ** k
            point = p
            if group["momentum"] > 0:
                if problem.previous is not None:
                    point = p + group["momentum"] * (p - problem.previous)
                problem.previous = p.clone()
            grad = problem.gradient(point)
            p.copy_(prox_2of4(point - inv_l * grad, lam * inv_l))
            st["prox_steps"] += 1
            st["lam"] = lam
            nnz = (group_view(p) != 0).sum(-1)
            st["frac_2of4"] = float((nnz <= 2).float().mean())
            switch_at = group.get("switch_at", 1.0)
            if st["frac_2of4"] >= switch_at or st["prox_steps"] >= group["max_prox_steps"]:
                st["forced"] = int(st["frac_2of4"] < 1.0)
                self._freeze_support(p, group, problem)
            return
        if group["refine"] == "cg":
            self._cg_step(p, problem)
        else:
            grad = problem.gradient(p)
            p.copy_(apply_mask(p - inv_l * grad, problem.mask))
        st["refine_done"] += 1
        if st["refine_done"] >= group["refine_steps"]:
            st["phase"] = "done"
            problem.cg.clear()

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
        """Row-wise conjugate gradients for ``min tr((W-Ŵ̃)H̃(W-Ŵ̃)^T)`` on the fixed support.

        The rows are independent problems sharing ``H̃``, so every scalar of CG is per row and
        the matrix product ``M ⊙ (P H̃)`` is one GEMM for all rows.
        """
        mask = problem.mask
        assert mask is not None
        cg = problem.cg
        tiny = torch.finfo(p.dtype).tiny
        if not cg:
            r = apply_mask(-problem.gradient(p), mask)
            cg.update(r=r, d=r.clone(), rr=(r * r).sum(-1, keepdim=True))
        r, d, rr = cg["r"], cg["d"], cg["rr"]
        q = apply_mask(d @ problem.gram, mask)
        dq = (d * q).sum(-1, keepdim=True)
        alpha = torch.where(dq > tiny, rr / dq.clamp_min(tiny), torch.zeros_like(rr))
        p.add_(alpha * d)
        r.sub_(alpha * q)
        rr_new = (r * r).sum(-1, keepdim=True)
        beta = torch.where(rr > tiny, rr_new / rr.clamp_min(tiny), torch.zeros_like(rr))
        d.mul_(beta).add_(r)
        cg["rr"] = rr_new
        # Keep pruned entries exactly +0.0 (rounding in add_ could leave -0.0 otherwise).
        p.copy_(apply_mask(p, mask))
