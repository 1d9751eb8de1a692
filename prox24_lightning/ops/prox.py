"""The 2:4 regularizer of Kübler et al. (TMLR 2025) and its exact proximal operator.

For a group of four consecutive weights ``w = (w1, w2, w3, w4)`` the regularizer is the sum of the
absolute values of all products of three distinct entries,

.. math:: r(w) = \\sum_{i<j<k} |w_i w_j w_k|,

which is zero exactly when at most two entries are non-zero. Its proximal operator

.. math:: \\operatorname{prox}_{\\tau r}(z) = \\arg\\min_w \\tfrac12 \\|w - z\\|^2 + \\tau r(w)

keeps signs and order of ``|z|`` (paper.md §3.1), so it is solved on ``z1 >= z2 >= z3 >= z4 >= 0``
and mapped back. The optimal support is a prefix of the sorted order: the top 2 (closed form
``(z1, z2, 0, 0)``), the top 3 or all 4 (paper.md §3.2).

**Units.** ``r`` is cubic, so ``prox_{tau r}(c z) = c prox_{c tau r}(z)``: every group is solved in
units of its largest magnitude, on ``u = |z|_sorted / z1`` (``u1 = 1``) with ``s = tau z1``. All
tolerances are therefore relative to ``max |z|`` of the group, and the iteration counts below do
not depend on the scale of the weights. For ``s >= 6`` the top 2 is optimal: a local minimiser
of an ``n``-support problem has ``s w_k <= 1`` for every kept entry (its 2x2 Hessian minors
``1 - (s w_k)^2`` or ``1 - s^2 (w_k + w_l)^2`` must be non-negative), so with
``(u - w)^2 >= u^2 - 2uw`` its objective is at least ``0.5 (1 - 1/s)^2 - (u3 + u4)/s +
0.5 (u3^2 + u4^2)``, more than the top-2 value ``0.5 (u3^2 + u4^2)`` as ``(u3 + u4)/s <= 1/3``.

**This module** owns the public functions (:func:`prox_2of4`, :func:`reg_2of4`,
:func:`group_view`, :func:`prox_objective`), the reduction to sorted, scaled groups, the dispatch
between the two paths below, the eager CPU path and the choice among candidates. **The exact
solver** of the 3- and 4-support problems (fixed-budget bisection on a one-parameter curve of
stationary points, then Newton; static shapes, no host syncs) lives in :mod:`.prox_static`, whose
docstring derives it.

**The eager CPU path.** On a CPU the same candidates are cheaper by exact coordinate minimisation
(smallest coordinate first, from the symmetric start, paper.md §3.5), which converges in a few
sweeps for most groups, with converged groups dropped from the working set every few sweeps and
groups that the screens of :func:`_candidates_needed` rule out never entering it. Convergence is
judged by the support's KKT residual in units of ``max |z|`` (``tol``). Groups still moving after
:data:`_CD_SWEEPS` sweeps, and groups whose smallest kept entry ended at zero or whose order is
not that of ``u`` (coordinate descent can stop at such KKT points while an interior minimiser is
better, for a small fraction of groups) unless the support's problem is convex on the box
``[0, u]``, are also solved by the exact solver, and the better of the two candidates is kept.
This path needs host syncs, so it runs only in eager mode on a CPU; under ``torch.compile`` and on
accelerators the static solver runs (``static=`` forces either).

**Choosing among candidates.** The best objective wins; when two candidates' objectives agree to
rounding (``8 eps`` relative), the one with the smaller KKT residual wins. Near a support change
the objectives differ by the square of the small entry, below fp32 resolution, while the wrong
pick violates the KKT conditions by that entry itself.

Reference: Kübler et al., "A Proximal Operator for Inducing 2:4-Sparsity", TMLR 2025,
arXiv:2501.18015.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .prox_static import (
    _BISECT_STEPS,
    _POLISH_STEPS,
    _S_TOP2,
    Cols,
    _others_e2,
    _residual,
    _solve_support_static,
)

__all__ = ["prox_2of4", "reg_2of4", "group_view", "prox_objective"]

#: Coordinate-descent sweeps before the first convergence check and between later ones (most
#: groups need 5 to 12 sweeps to the fp32 tolerance; each check costs about two sweeps).
_FIRST_CHECK = 8
_CHECK_EVERY = 4
_CPU_CHUNK_GROUPS = 1 << 18
#: Coordinate-descent sweeps of the eager path before the exact solver takes over.
_CD_SWEEPS = 32


def group_view(w: Tensor) -> Tensor:
    """View ``w`` (any leading shape, last dim divisible by 4) as ``[..., n_groups, 4]``."""
    if w.shape[-1] % 4 != 0:
        raise ValueError(
            f"last dimension must be divisible by 4 for 2:4 groups, got {tuple(w.shape)}"
        )
    return w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4)


def _triple_sum(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """``abc + abd + acd + bcd`` for non-negative entries."""
    ab = a * b
    cd = c * d
    return ab * (c + d) + cd * (a + b)


def reg_2of4(w: Tensor) -> Tensor:
    """Regularizer ``R(w) = sum over groups of sum_{i<j<k} |w_i w_j w_k|`` (a scalar)."""
    g = group_view(w).abs()
    return _triple_sum(g[..., 0], g[..., 1], g[..., 2], g[..., 3]).sum()


def prox_objective(w: Tensor, z: Tensor, tau: Tensor | float) -> Tensor:
    """Per-group objective ``0.5 ||w - z||^2 + tau * r(w)``, shape ``[..., n_groups]``."""
    gw, gz = group_view(w), group_view(z)
    a = gw.abs()
    reg = _triple_sum(a[..., 0], a[..., 1], a[..., 2], a[..., 3])
    tau_g = _tau_per_group(tau, w)
    return 0.5 * (gw - gz).square().sum(-1) + tau_g * reg


def _tau_per_group(tau: Tensor | float, w: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Broadcast ``tau`` (a float, or a tensor broadcastable to ``w`` with last dim 1) to groups."""
    n_groups = w.shape[-1] // 4
    t = torch.as_tensor(tau, dtype=dtype or w.dtype, device=w.device)
    if t.dim() > 0 and t.shape[-1] not in (1,):
        raise ValueError("tau must be a scalar or broadcast along the last dim (shape [..., 1])")
    lead = w.shape[:-1]
    return t.expand(*lead, 1).expand(*lead, n_groups) if t.dim() > 0 else t.expand(*lead, n_groups)


# --- per-candidate objective -----------------------------------------------------------------
# A candidate is a list of columns (one [m] tensor per kept entry, in sorted order) in units of
# the group's largest magnitude: ``u`` the sorted magnitudes (``u[0] = 1``), ``s = tau max|z|``.
# Its gradient, KKT residual (``_residual``) and the exact solver are in .prox_static.


def _objective(w: Cols, u: Cols, s: Tensor) -> Tensor:
    """``0.5 ||w - u||^2 + s e3(w)`` over the given entries."""
    if len(w) == 3:
        e3 = w[0] * w[1] * w[2]
    else:
        e3 = _triple_sum(*w)
    quad = sum((a - b).square() for a, b in zip(w, u, strict=True))
    return 0.5 * quad + s * e3


# --- the eager CPU path: coordinate descent with compaction ----------------------------------


def _symmetric_start(u: Cols, s: Tensor, n: int) -> Tensor:
    """Stationary point of the support's problem when its entries all equal their mean ``ū``.

    With ``w_i = m`` for the ``n`` kept entries, stationarity reads ``m = ū - c s m^2`` with
    ``c = 1`` (3 kept) or ``c = 3`` (4 kept); its positive root is ``2 ū / (1 + sqrt(1 + 4 c s
    ū))`` (written without cancellation). Starting here instead of at zero keeps coordinate
    descent from killing the largest entry first, which traps it on ties (e.g. ``z1 = z2 = z3``).
    """
    ubar = sum(u[:n]) / n
    c = 1.0 if n == 3 else 3.0
    return 2.0 * ubar / (1.0 + torch.sqrt(1.0 + 4.0 * c * s * ubar))


def _cd_sweep(w: Cols, u: Cols, s: Tensor) -> None:
    """One sweep of exact coordinate minimisation, smallest coordinate first (in place).

    Coordinate ``i`` is set to ``max(0, u_i - s e2(w_{-i}))``, the exact minimiser of the
    objective in ``w_i`` (a convex quadratic in one coordinate).
    """
    n = len(w)
    for i in reversed(range(n)):
        a, b, *rest = (w[j] for j in range(n) if j != i)
        e2 = a * b if not rest else torch.addcmul(a * b, rest[0], a + b)
        w[i] = torch.clamp_min(torch.addcmul(u[i], s, e2, value=-1.0), 0.0)


def _cd_residual(w: Cols, u: Cols, s: Tensor) -> Tensor:
    """:func:`_residual` right after :func:`_cd_sweep`: the first coordinate, updated last, is
    exactly optimal given the others (its residual is zero), so it is skipped."""
    out = None
    for i, ei in enumerate(_others_e2(w)[1:], start=1):
        g = w[i] - u[i] + s * ei
        r = torch.where(w[i] > 0, g.abs(), torch.clamp_min(-g, 0.0))
        out = r if out is None else torch.maximum(out, r)
    return out


def _solve_support_eager(
    u: Tensor, s: Tensor, n: int, max_sweeps: int, tol: float, steps: int, polish: int
) -> Tensor:
    """``n``-support candidate by coordinate descent with compaction (eager, host syncs).

    ``u`` holds the sorted entries as rows (``[>= n, m]``); returns ``[n, m]``. Groups whose KKT
    residual is at most ``tol`` after a block of sweeps leave the working set. Groups still moving
    after ``min(max_sweeps, _CD_SWEEPS)`` sweeps, and converged groups whose smallest entry is
    zero or whose order is not that of ``u`` (coordinate descent can stop at such KKT points of
    the support's problem, e.g. on the boundary while an interior minimiser exists) where that problem is not provably convex, also get the exact candidate of
    :func:`_solve_support_static`; the better of the two is kept.
    """
    m = s.shape[0]
    out = u.new_empty(n, m)
    if m == 0:
        return out
    start = _symmetric_start(list(u[:n]), s, n)
    w = [start] * n
    data = torch.cat([u[:n], s[None]])  # the working set's u rows and s, gathered together
    idx = torch.arange(m, device=s.device)
    budget = max(_CHECK_EVERY, min(max_sweeps, _CD_SWEEPS))
    exact: list[Tensor] = []
    sweeps = 0
    while True:
        *us, t = data.unbind(0)
        block = _FIRST_CHECK if sweeps == 0 else _CHECK_EVERY
        for _ in range(block):
            _cd_sweep(w, us, t)
        sweeps += block
        done = _cd_residual(w, us, t) <= tol
        final = sweeps >= budget
        # On the boundary, or out of order (e.g. (0, u2, u3) for large s): possibly not this
        # support's minimiser, although a KKT point of its problem, unless that problem is convex
        # on the box [0, u] holding all iterates (Gershgorin on I + sS: every row of S sums to at
        # most u1 + u2, resp. 2 (u1 + u2 + u3)), where every KKT point is the minimiser.
        odd = w[n - 1] == 0
        for i in range(n - 1):
            odd |= w[i] + tol < w[i + 1]
        row_sum = us[0] + us[1] if n == 3 else 2.0 * (us[0] + us[1] + us[2])
        convex = t * row_sum < 1.0
        suspect = done & odd & ~convex
        if final:
            suspect |= ~done
        if bool(suspect.any()):
            exact.append(idx[suspect])
        if final or bool(done.all()):
            out.index_copy_(1, idx, torch.stack(w))
            break
        if bool(done.any()):
            fin, keep = done.nonzero().squeeze(1), (~done).nonzero().squeeze(1)
            iterate = torch.stack(w)
            out.index_copy_(1, idx.index_select(0, fin), iterate.index_select(1, fin))
            w = list(iterate.index_select(1, keep).unbind(0))
            data, idx = data.index_select(1, keep), idx.index_select(0, keep)
    if exact:
        sel = torch.cat(exact)
        ue, se = list(u[:n].index_select(1, sel)), s.index_select(0, sel)
        cand = _solve_support_static(ue, se, n, steps, polish)
        cd = list(out.index_select(1, sel))
        better = _better(
            _objective(cand, ue, se),
            _residual(cand, ue, se),
            _objective(cd, ue, se),
            _residual(cd, ue, se),
        )
        best = [torch.where(better, c, d) for c, d in zip(cand, cd, strict=True)]
        out.index_copy_(1, sel, torch.stack(best))
    return out


def _better(f: Tensor, res: Tensor, best_f: Tensor, best_res: Tensor) -> Tensor:
    """Where candidate ``(f, res)`` beats ``(best_f, best_res)``: lower objective, or an
    objective equal to rounding (``8 eps`` relative; objectives are sums of non-negative terms)
    and a lower KKT residual."""
    slack = 8.0 * torch.finfo(f.dtype).eps * torch.maximum(f, best_f)
    return (f < best_f - slack) | ((f <= best_f + slack) & (res < best_res))


def _e2(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``ab + ac + bc``."""
    return torch.addcmul(b * c, a, b + c)


def _candidates_needed(z: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """Which groups can have a 3-support / 4-support candidate better than the top 2.

    Two screens, each ruling out supports whose minimum lies on the smaller support (so their
    candidate adds nothing: 3-support, the top 2; 4-support, the 3-support problem):

    * Bounds that hold at every KKT point ``w`` of a support's problem: ``w_j <= z_j`` (the
      regularizer only shrinks), hence ``w_i >= lb_i = max(0, z_i - tau e2(z_{-i}))``, hence the
      smallest kept entry obeys ``w_s <= z_s - tau e2(lb_{-s})``. Where that bound is ``<= 0`` the
      smallest entry is zero at every KKT point.
    * No interior local minimiser exists where the curve of :mod:`.prox_static` has no feasible
      point: with ``y = tau z`` and ``delta_i = y_i - y_n``, ``x3 = 1 - A(rho) <= 1 - sum_i
      sqrt(delta_i)`` (3-support), and ``x4 = (1 + rho - A(rho))/2 <= (1 + rho - sqrt(S^2 + 9
      rho^2))/2 <= (1 - 2 sqrt(2) S / 3)/2`` with ``S = sum_i sqrt(delta_i)`` (4-support,
      Minkowski's inequality, maximised over ``rho``).

    Late in Algorithm 2 most groups are screened out this way. Both screens are homogeneous: the
    same in units of ``max |z|`` (``z = u``, ``tau = s``).
    """
    z1, z2, z3, z4 = z.unbind(-1)
    # 3-support (w4 = 0): lb_i = max(0, z_i - tau * product of the other two kept entries).
    lb1 = torch.clamp_min(z1 - tau * z2 * z3, 0.0)
    lb2 = torch.clamp_min(z2 - tau * z1 * z3, 0.0)
    need3 = z3 > tau * lb1 * lb2
    need3 &= torch.sqrt(tau * (z1 - z3)) + torch.sqrt(tau * (z2 - z3)) < 1.0
    # 4-support: lb_i = max(0, z_i - tau * e2 of the other three).
    lb1 = torch.clamp_min(z1 - tau * _e2(z2, z3, z4), 0.0)
    lb2 = torch.clamp_min(z2 - tau * _e2(z1, z3, z4), 0.0)
    lb3 = torch.clamp_min(z3 - tau * _e2(z1, z2, z4), 0.0)
    need4 = z4 > tau * _e2(lb1, lb2, lb3)
    roots = torch.sqrt(tau * (z1 - z4)) + torch.sqrt(tau * (z2 - z4)) + torch.sqrt(tau * (z3 - z4))
    need4 &= roots < 0.75 * 2.0**0.5  # 3 / (2 sqrt 2)
    return need3, need4


def _budget(dtype: torch.dtype) -> tuple[float, int, int]:
    """Default KKT tolerance (units of ``max |z|``), bisection steps and Newton steps."""
    eps = torch.finfo(dtype).eps
    if eps > 1e-10:  # fp32
        return 16.0 * eps, _BISECT_STEPS, _POLISH_STEPS
    # fp64: bisection to 2^-30, then Newton squares the error (1e-9 -> 1e-18 -> eps).
    return 64.0 * eps, 30, _POLISH_STEPS + 1


def _minimise_support(z: Tensor, tau: Tensor, size: int, max_sweeps: int, tol: float) -> Tensor:
    """Minimiser of the ``size``-support problem of ``[n, 4]`` sorted non-negative rows.

    The eager path's candidate, or the smaller support's minimiser where that is better (the
    support's problem may have its minimum on the boundary). Returns ``[n, 4]`` in the units of
    ``z`` with zeros beyond ``size``; ``tol`` is the KKT tolerance in units of each row's ``z1``.
    """
    z1 = z[:, 0]
    scale = torch.where(z1 > 0, z1, torch.ones_like(z1))
    u = (z / scale[:, None]).T.contiguous()
    _, steps, polish = _budget(z.dtype)
    cand = _solve_support_eager(u, tau * z1, size, max_sweeps, tol, steps, polish)
    out = z.new_zeros(z.shape)
    out[:, :size] = cand.T * scale[:, None]
    if size == 3:
        smaller = z.clone()
        smaller[:, 2:] = 0.0
    else:
        smaller = _minimise_support(z, tau, 3, max_sweeps, tol)
    zc = list(z.T)
    cols, small_cols = list(out.T), list(smaller.T)
    better = _better(
        _objective(small_cols, zc, tau),
        _residual(small_cols, zc, tau) / scale,
        _objective(cols, zc, tau),
        _residual(cols, zc, tau) / scale,
    )
    return torch.where(better[:, None], smaller, out)


def _prox_sorted(
    u: Tensor, s: Tensor, static: bool, max_sweeps: int, tol: float, steps: int, polish: int
) -> Tensor:
    """Prox on ``[m, 4]`` sorted rows in units of ``u1`` (``u1 = 1``, or a zero row).

    Returns the minimiser in the same units and order: the best of the top 2 and the 3- and
    4-support candidates (see :func:`_better`).
    """
    uc = list(u.T.contiguous())
    zero = torch.zeros_like(s)
    best = torch.stack([uc[0], uc[1], zero, zero], -1)
    best_f = 0.5 * (uc[2].square() + uc[3].square())
    best_r = torch.clamp_min(uc[2] - s * uc[0] * uc[1], 0.0)
    if static:
        allowed = s < _S_TOP2
        for n in (3, 4):
            cand = _solve_support_static(uc, s, n, steps, polish) + [zero] * (4 - n)
            f, r = _objective(cand, uc, s), _residual(cand, uc, s)
            better = _better(f, r, best_f, best_r) & allowed & (cand[n - 1] > 0)
            best = torch.where(better[:, None], torch.stack(cand, -1), best)
            best_f = torch.where(better, f, best_f)
            best_r = torch.where(better, r, best_r)
        return best
    need3, need4 = _candidates_needed(u, s)
    rows = torch.stack(uc)
    for n, need in ((3, need3), (4, need4)):
        work = (need & (s < _S_TOP2)).nonzero().squeeze(1)
        if work.numel() == 0:
            continue
        uw, sw = rows.index_select(1, work), s.index_select(0, work)
        cand = list(_solve_support_eager(uw, sw, n, max_sweeps, tol, steps, polish))
        cand = cand + [torch.zeros_like(sw)] * (4 - n)
        f, r = _objective(cand, list(uw), sw), _residual(cand, list(uw), sw)
        better = _better(f, r, best_f[work], best_r[work]) & (cand[n - 1] > 0)
        pick = better.nonzero().squeeze(1)
        sel = work.index_select(0, pick)
        best.index_copy_(0, sel, torch.stack(cand, -1).index_select(0, pick))
        best_f.index_copy_(0, sel, f.index_select(0, pick))
        best_r.index_copy_(0, sel, r.index_select(0, pick))
    return best


def _prox_chunk(
    flat: Tensor, tau: Tensor, static: bool, max_sweeps: int, tol: float | None
) -> Tensor:
    """Prox of ``[m, 4]`` groups (sort, scale to ``max |z| = 1``, solve, un-scale, un-sort,
    re-sign)."""
    mag, order = flat.abs().sort(dim=-1, descending=True, stable=True)
    z1 = mag[:, 0]
    scale = torch.where(z1 > 0, z1, torch.ones_like(z1))
    u = mag / scale[:, None]
    default_tol, steps, polish = _budget(flat.dtype)
    w = _prox_sorted(
        u, tau * z1, static, max_sweeps, default_tol if tol is None else tol, steps, polish
    )
    # Back in the input's units as ``|z| - shrinkage``: exact (bit for bit) on kept entries that
    # the prox leaves alone, e.g. tau = 0 or groups that already are 2:4.
    shrink = torch.clamp_min(u - w, 0.0) * scale[:, None]
    sol = torch.where(w > 0, torch.clamp_min(mag - shrink, 0.0), torch.zeros_like(mag))
    out = torch.zeros_like(flat).scatter(-1, order, sol)
    # Re-apply signs; ``+ 0.0`` turns the -0.0 copysign gives pruned negative entries into +0.0.
    return torch.copysign(out, flat) + 0.0


@torch.no_grad()
def prox_2of4(
    w: Tensor,
    tau: Tensor | float,
    *,
    max_sweeps: int = 200,
    tol: float | None = None,
    chunk_groups: int | None = None,
    static: bool | None = None,
) -> Tensor:
    """Exact proximal operator of ``tau * r`` applied to every group of 4 along the last dim.

    Args:
        w: input of any leading shape whose last dimension is divisible by 4. fp32 and fp64 are
            solved in their own precision; fp16 and bf16 are solved in fp32 and rounded back.
        tau: a non-negative float, or a tensor broadcastable per row (shape ``[..., 1]``).
        max_sweeps: cap on the coordinate-descent sweeps of the eager CPU path before the exact
            solver takes over (effective cap ``min(max_sweeps, 32)``; the static path has a fixed
            budget and ignores it).
        tol: KKT tolerance of the eager path's coordinate descent, in units of each group's
            ``max |z|``; defaults to ``16 eps`` (fp32) or ``64 eps`` (fp64) of the compute dtype.
        chunk_groups: groups solved per pass (default: 2^18 on CPU, all at once elsewhere).
        static: ``True`` for the fixed-shape solver without host syncs (what runs under
            ``torch.compile`` and on accelerators), ``False`` for the eager CPU path with
            compaction; ``None`` picks the static one when compiling or off the CPU.

    Returns:
        The global minimiser of ``0.5 ||x - w||^2 + tau * r(x)`` for every group, same shape and
        dtype as ``w``. Signs and the order of magnitudes are kept; pruned entries are ``+0.0``.

    Raises:
        TypeError: for a non-floating ``w``.
        ValueError: for a bad shape of ``w`` or ``tau``, or a negative ``tau`` (a tensor ``tau``
            on the static path is checked with :func:`torch._assert_async` instead, which raises
            ``RuntimeError`` without a host sync).
    """
    if not w.is_floating_point():
        raise TypeError(f"prox_2of4 needs a floating tensor, got {w.dtype}")
    if static is None:
        static = torch.compiler.is_compiling() or w.device.type != "cpu"
    compute = torch.float32 if torch.finfo(w.dtype).bits < 32 else w.dtype
    groups = group_view(w)
    tau_g = _tau_per_group(tau, w, compute)
    if isinstance(tau, (int, float)):
        if tau < 0:
            raise ValueError("tau must be non-negative")
    elif static:
        torch._assert_async((tau_g >= 0).all(), "tau must be non-negative")
    elif bool((tau_g < 0).any()):
        raise ValueError("tau must be non-negative")
    flat = groups.reshape(-1, 4).to(compute)
    taus = tau_g.reshape(-1)
    n = flat.shape[0]
    # On CPU, chunks that stay in cache beat whole-matrix passes; a GPU wants the whole matrix
    # at once.
    chunk = chunk_groups or (_CPU_CHUNK_GROUPS if flat.device.type == "cpu" else max(n, 1))
    parts = [
        _prox_chunk(flat[i : i + chunk], taus[i : i + chunk], static, max_sweeps, tol)
        for i in range(0, n, chunk)
    ]
    out = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else flat.clone()
    out = out.reshape(w.shape)
    if out.dtype != w.dtype:
        # Rounding to fp16 can flush a tiny negative entry to -0.0; + 0.0 makes it +0.0.
        out = out.to(w.dtype) + 0.0
    return out
