"""One iteration of the proximal phase of Algorithm 2 (Kübler et al., TMLR 2025) as a pure function.

:func:`prox_phase_step` does everything :class:`~prox24_lightning.optim.Prox24` needs per prox
iteration on tensors alone: the lambda schedule, the momentum extrapolation, the one GEMM of the
gradient, the group prox and the fraction of 2:4 groups, plus the decision that the phase is
over. Nothing in it reads a tensor value on the host or branches on one (the two Python flags are
configuration, fixed per layer), so it traces whole under ``torch.compile(fullgraph=True)``: on a
GPU one iteration is one compiled graph without host synchronisation, and the optimizer reads the
small :class:`ProxPhaseState` back only every ``check_every`` iterations.

With ``k`` the prox iterations done so far, one call computes (paper.md §4.2)::

    lambda_k = lambda0 beta^k                           (beta_tail^(k - k_t) from step k_t on)
    Y        = W_k + m (W_k - W_{k-1})                  (momentum m; Y = W_k without)
    W_{k+1}  = prox_{(lambda_k / L) r}(Y - (Y - Ŵ̃) H̃ / L)
    frac     = #{groups of W_{k+1} with <= 2 non-zeros} / #groups

where ``k_t`` is the first iteration that starts with ``frac >= tail_from``. The state gets
``done = frac >= switch_at or k + 1 >= max_prox_steps`` and **every later call is the identity**
(weights, previous iterate and state are returned unchanged). That is what makes the result
independent of how often the host looks: reading ``done`` after ``k`` iterations or after
``k + 4`` finds the same iterate, the one at which the phase ended, and the support is frozen
from it exactly as with a check after every iteration.

The gradient is ``(Y - Ŵ̃) H̃``: one GEMM, and unlike ``Y H̃ - Ŵ̃ H̃`` it does not cancel (both
products are large and nearly equal once ``Y`` is close to ``Ŵ̃``).

Eagerly (the CPU default) only the configured work runs (``momentum=False`` skips the
extrapolation, ``tail=False`` the tail schedule, and ``prox_2of4`` takes its eager CPU path).
Compiled, every layer calls the same general graph (``momentum=True, tail=True``; a momentum of
0 and the "no tail" constants make it the plain iteration), with dynamic shapes, so a model
compiles once, not once per layer shape and recipe; there ``prox_2of4`` runs its static solver.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..ops.masks import groups_2of4_fraction
from ..ops.prox import prox_2of4

__all__ = [
    "SETTINGS",
    "ProxPhaseConstants",
    "ProxPhaseState",
    "compiled_prox_phase_step",
    "prox_phase_step",
]

#: The per-layer settings (``Prox24`` hyper-parameters) that :class:`ProxPhaseConstants` holds.
SETTINGS = ("lambda0", "beta", "beta_tail", "tail_from", "momentum", "switch_at", "max_prox_steps")


def _real(device: torch.device | str) -> torch.dtype:
    # float64 keeps the schedule as exact as the host's Python floats (MPS has no float64).
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class ProxPhaseConstants(NamedTuple):
    """A layer's settings as 0-d tensors on its device (tensors, so that layers with different
    values share one compiled graph instead of recompiling per value).

    ``inv_l``, ``lambda0``, ``beta``, ``beta_tail``, ``tail_from``, ``momentum`` and
    ``switch_at`` are float64 (the schedule is exact in double, as on the host before);
    ``max_steps`` is int64.
    """

    inv_l: Tensor
    lambda0: Tensor
    beta: Tensor
    beta_tail: Tensor
    tail_from: Tensor
    momentum: Tensor
    switch_at: Tensor
    max_steps: Tensor

    @classmethod
    def create(
        cls,
        device: torch.device | str,
        *,
        lipschitz: float,
        lambda0: float,
        beta: float,
        beta_tail: float | None = None,
        tail_from: float = 0.9,
        momentum: float = 0.0,
        switch_at: float = 1.0,
        max_prox_steps: int = 20000,
    ) -> ProxPhaseConstants:
        """From the host values. Without ``beta_tail`` the tail never starts (``tail_from`` is
        stored as infinity, ``beta_tail`` as 1), so the general graph (``tail=True``) computes
        the plain schedule exactly."""
        real = _real(device)

        def scalar(value: float) -> Tensor:
            return torch.tensor(float(value), dtype=real, device=device)

        return cls(
            inv_l=scalar(1.0 / lipschitz),
            lambda0=scalar(lambda0),
            beta=scalar(beta),
            beta_tail=scalar(beta_tail or 1.0),
            tail_from=scalar(tail_from if beta_tail else math.inf),
            momentum=scalar(momentum),
            switch_at=scalar(switch_at),
            max_steps=torch.tensor(int(max_prox_steps), dtype=torch.int64, device=device),
        )


class ProxPhaseState(NamedTuple):
    """The prox phase's counters, 0-d tensors on the layer's device.

    Attributes:
        step: prox iterations done (int64), i.e. ``k`` of the next iteration.
        lam: ``lambda`` of the last iteration (float64; 0 before the first).
        frac: fraction of 2:4 groups after the last iteration (float64; 0 before the first).
        tail_step: first iteration of the ``beta_tail`` schedule (int64; -1: not reached).
        tail_lam: ``lambda`` at ``tail_step`` (float64).
        done: the phase has ended (bool); further calls change nothing.
    """

    step: Tensor
    lam: Tensor
    frac: Tensor
    tail_step: Tensor
    tail_lam: Tensor
    done: Tensor

    @classmethod
    def create(
        cls,
        device: torch.device | str,
        *,
        step: int = 0,
        lam: float = 0.0,
        frac: float = 0.0,
        tail_step: int = -1,
        tail_lam: float = 0.0,
    ) -> ProxPhaseState:
        """From the host values (a fresh layer, or one resumed from its checkpointed state)."""
        real = _real(device)
        return cls(
            step=torch.tensor(int(step), dtype=torch.int64, device=device),
            lam=torch.tensor(float(lam), dtype=real, device=device),
            frac=torch.tensor(float(frac), dtype=real, device=device),
            tail_step=torch.tensor(int(tail_step), dtype=torch.int64, device=device),
            tail_lam=torch.tensor(float(tail_lam), dtype=real, device=device),
            done=torch.zeros((), dtype=torch.bool, device=device),
        )

    def values(self) -> list[float]:
        """``[step, lam, frac, tail_step, tail_lam, done]`` on the host: one device read."""
        real = self.lam.dtype
        parts = [self.step.to(real), self.lam, self.frac, self.tail_step.to(real)]
        return torch.stack([*parts, self.tail_lam, self.done.to(real)]).tolist()


def prox_phase_step(
    w: Tensor,
    previous: Tensor,
    target: Tensor,
    gram: Tensor,
    state: ProxPhaseState,
    const: ProxPhaseConstants,
    *,
    momentum: bool,
    tail: bool,
) -> tuple[Tensor, Tensor, ProxPhaseState]:
    """One prox-phase iteration; returns ``(W_{k+1}, W_k, state)`` (see the module docstring).

    Args:
        w: the iterate ``W_k`` ``[d_out, d_in]`` (fp32, normalised coordinates).
        previous: ``W_{k-1}`` for the extrapolation (``w`` itself before the first iteration);
            ignored and returned as is without ``momentum``.
        target: the dense ``Ŵ̃``.
        gram: ``H̃``.
        state: the counters after iteration ``k - 1``.
        const: the layer's settings.
        momentum: extrapolate with ``const.momentum`` (a configuration flag, not a value test).
        tail: the layer has a ``beta_tail`` schedule.

    Returns:
        The new iterate, the new "previous" iterate and the new state; all three equal the
        inputs once ``state.done`` is set. The matrix product runs at the caller's matmul
        precision (:func:`~prox24_lightning.ops.precision.matmul_precision`).
    """
    active = ~state.done
    k = state.step
    plain = const.lambda0 * const.beta**k
    if tail:
        start = (state.tail_step < 0) & (state.frac >= const.tail_from)
        tail_step = torch.where(start, k, state.tail_step)
        tail_lam = torch.where(start, plain, state.tail_lam)
        lam = torch.where(tail_step >= 0, tail_lam * const.beta_tail ** (k - tail_step), plain)
    else:
        tail_step, tail_lam, lam = state.tail_step, state.tail_lam, plain
    point = w + const.momentum * (w - previous) if momentum else w
    grad = (point - target) @ gram
    new = prox_2of4(point - const.inv_l * grad, lam * const.inv_l)
    frac = groups_2of4_fraction(new, const.lambda0.dtype)
    step = k + 1
    done = (frac >= const.switch_at) | (step >= const.max_steps)
    out = ProxPhaseState(
        step=torch.where(active, step, k),
        lam=torch.where(active, lam, state.lam),
        frac=torch.where(active, frac, state.frac),
        tail_step=torch.where(active, tail_step, state.tail_step),
        tail_lam=torch.where(active, tail_lam, state.tail_lam),
        done=state.done | done,
    )
    w_next = torch.where(active, new, w)
    prev_next = torch.where(active, w, previous) if momentum else previous
    return w_next, prev_next, out


_COMPILED: dict[str, Callable[..., tuple[Tensor, Tensor, ProxPhaseState]]] = {}


def _no_duck_shapes() -> contextlib.AbstractContextManager[object]:
    """Trace without "duck sizing": by default dynamo unifies sizes that happen to be equal when
    it traces (a square q_proj would make ``d_out == d_in`` a guard and force a second compile
    for gate/up/down). A private setting, hence the guard: without it, only that recompile."""
    config = getattr(torch.fx.experimental, "_config", None)
    if config is not None and hasattr(config, "use_duck_shape"):
        return config.patch(use_duck_shape=False)
    return contextlib.nullcontext()


def compiled_prox_phase_step(
    backend: str = "inductor",
) -> Callable[..., tuple[Tensor, Tensor, ProxPhaseState]]:
    """:func:`prox_phase_step` under ``torch.compile(fullgraph=True, dynamic=True)``.

    One per backend, shared by every optimizer of the process. Call it with ``momentum=True,
    tail=True`` for every layer (a momentum of 0 and the "no tail" constants of
    :meth:`ProxPhaseConstants.create` reduce it to the plain iteration): one graph with dynamic
    shapes then serves every layer shape and setting, instead of one compilation (minutes with
    inductor) per shape and flag combination.
    """
    fn = _COMPILED.get(backend)
    if fn is None:
        compiled = torch.compile(prox_phase_step, fullgraph=True, backend=backend, dynamic=True)

        def fn(*args: object, **kwargs: object) -> tuple[Tensor, Tensor, ProxPhaseState]:
            with _no_duck_shapes():
                return compiled(*args, **kwargs)

        _COMPILED[backend] = fn
    return fn
