"""The 2:4 regularizer of Kübler et al. (TMLR 2025) and its exact proximal operator.

For a group of four consecutive weights ``w = (w1, w2, w3, w4)`` the regularizer is the sum of the
absolute values of all products of three distinct entries,

.. math:: r(w) = \\sum_{i<j<k} |w_i w_j w_k|,

which is zero exactly when at most two entries are non-zero. Its proximal operator

.. math:: \\operatorname{prox}_{\\tau r}(z) = \\arg\\min_w \\tfrac12 \\|w - z\\|^2 + \\tau r(w)

keeps signs and order of ``|z|`` (paper.md §3.1), so it is solved on ``z1 >= z2 >= z3 >= z4 >= 0``
and mapped back. The optimal support is a prefix of the sorted order: the top 2 (closed form
``(z1, z2, 0, 0)``), the top 3 or all 4. The 3- and 4-support candidates are found by exact
coordinate minimisation started at zero, smallest coordinate first (the scheme that matched a
brute-force minimiser on every instance in paper.md §3.5; it reaches the "-" root branch of the
smallest kept entry that Newton-from-``z`` misses). The best candidate by objective value is returned.

Everything is vectorised over groups; converged groups are dropped from the working set every few
sweeps so that the rare slow groups near a bifurcation cost little.

Reference: Kübler et al., "A Proximal Operator for Inducing 2:4-Sparsity", TMLR 2025,
arXiv:2501.18015.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["prox_2of4", "reg_2of4", "group_view", "prox_objective"]

_CHECK_EVERY = 4
_CPU_CHUNK_GROUPS = 1 << 18


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


def _tau_per_group(tau: Tensor | float, w: Tensor) -> Tensor:
    """Broadcast ``tau`` (a float, or a tensor broadcastable to ``w`` with last dim 1) to groups."""
    n_groups = w.shape[-1] // 4
    t = torch.as_tensor(tau, dtype=w.dtype, device=w.device)
    if t.dim() > 0 and t.shape[-1] not in (1,):
        raise ValueError("tau must be a scalar or broadcast along the last dim (shape [..., 1])")
    lead = w.shape[:-1]
    return t.expand(*lead, 1).expand(*lead, n_groups) if t.dim() > 0 else t.expand(*lead, n_groups)


def _symmetric_start(z: Tensor, tau: Tensor, size: int) -> Tensor:
    """Stationary point of the support's problem when its entries all equal their mean ``z̄``.

    With ``w_i = m`` for the ``size`` kept entries, stationarity reads ``m = z̄ - c tau m^2`` with
    ``c = 1`` (3 kept) or ``c = 3`` (4 kept); its positive root is ``2 z̄ / (1 + sqrt(1 + 4 c tau
    z̄))`` (written without cancellation). Starting here instead of at zero keeps coordinate
    descent from killing the largest entry first, which traps it on ties (e.g. ``z1 = z2 = z3``).
    """
    zbar = z[:, :size].mean(-1)
    c = 1.0 if size == 3 else 3.0
    return 2.0 * zbar / (1.0 + torch.sqrt(1.0 + 4.0 * c * tau * zbar))


def _cd_sweep(w: list[Tensor], zs: list[Tensor], t: Tensor) -> None:
    """One sweep of exact coordinate minimisation, smallest coordinate first (in place)."""
    size = len(w)
    for i in reversed(range(size)):
        a, b, *rest = (w[j] for j in range(size) if j != i)
        e2 = a * b if not rest else torch.addcmul(a * b, rest[0], a + b)
        w[i] = torch.clamp_min(torch.addcmul(zs[i], t, e2, value=-1.0), 0.0)


def _support_objective(w: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """``0.5 ||w - z||^2 + t e3(w)`` on ``[m, size]`` (the dropped entries add a constant)."""
    size = w.shape[1]
    if size == 3:
        e3 = w[:, 0] * w[:, 1] * w[:, 2]
    else:
        e3 = _triple_sum(w[:, 0], w[:, 1], w[:, 2], w[:, 3])
    return 0.5 * (w - z).square().sum(-1) + t * e3


def _kkt_residual(w: Tensor, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient on the support and the KKT residual of ``w >= 0`` (per group max)."""
    size = w.shape[1]
    total = w.sum(-1, keepdim=True)
    pair = (total.square() - w.square().sum(-1, keepdim=True)) / 2  # e2 of all entries
    if size == 3:
        e2_minus = torch.stack([w[:, 1] * w[:, 2], w[:, 0] * w[:, 2], w[:, 0] * w[:, 1]], -1)
    else:
        e2_minus = pair - w * (total - w)
    grad = w - z + t[:, None] * e2_minus
    res = torch.where(w > 0, grad.abs(), torch.clamp_min(-grad, 0.0)).amax(-1)
    return grad, res


def _newton_polish(w: Tensor, z: Tensor, t: Tensor, tol: Tensor, iters: int) -> Tensor:
    """Safeguarded Newton on the support for the few groups coordinate descent converges slowly on.

    Near a bifurcation the support's Hessian ``I + t S`` (``S_ij`` = sum of the other kept entries)
    is nearly singular and coordinate descent crawls; Newton converges quadratically there. A
    Newton step is kept only if it lowers the objective, otherwise a coordinate sweep is taken, so
    the objective never increases.
    """
    m, size = w.shape
    off = ~torch.eye(size, dtype=torch.bool, device=w.device)
    for _ in range(iters):
        grad, res = _kkt_residual(w, z, t)
        active = res > tol
        if not bool(active.any()):
            break
        total = w.sum(-1, keepdim=True)
        # S_ij = sum of kept entries other than i and j (size 4), or the third entry (size 3).
        s = total[:, :, None] - w[:, :, None] - w[:, None, :]
        hess = torch.eye(size, dtype=w.dtype, device=w.device) + t[:, None, None] * s * off
        free = (w > 0) | (grad < 0)
        # Freeze coordinates held at zero by their bound.
        hess = torch.where(
            free[:, :, None] & free[:, None, :],
            hess,
            torch.eye(size, dtype=w.dtype, device=w.device).expand_as(hess),
        )
        rhs = torch.where(free, -grad, torch.zeros_like(grad))
        step, info = torch.linalg.solve_ex(hess, rhs)
        trial = torch.clamp_min(w + torch.nan_to_num(step), 0.0)
        ok = (info == 0) & (_support_objective(trial, z, t) <= _support_objective(w, z, t))
        cols = [w[:, i].clone() for i in range(size)]
        _cd_sweep(cols, [z[:, i] for i in range(size)], t)
        swept = torch.stack(cols, -1)
        w = torch.where(active[:, None], torch.where(ok[:, None], trial, swept), w)
    return w


def _minimise_support(
    z: Tensor, tau: Tensor, size: int, max_sweeps: int, tol: float, newton_after: int = 48
) -> Tensor:
    """Exact coordinate minimisation on the first ``size`` sorted coordinates.

    ``z`` is ``[n, 4]`` sorted decreasing and non-negative, ``tau`` is ``[n]``. Coordinate ``i`` is
    set to ``max(0, z_i - tau * e2(w_{-i}))``, the exact minimiser of the objective in ``w_i``
    (it is a convex quadratic in one coordinate), smallest coordinate first, from the symmetric
    start of :func:`_symmetric_start`. Groups still moving after ``newton_after`` sweeps (near a
    bifurcation, where coordinate descent is slow) are finished by :func:`_newton_polish`.
    """
    n = z.shape[0]
    out = z.new_zeros(n, 4)
    if n == 0:
        return out
    idx = torch.arange(n, device=z.device)
    zs = [z[:, i].contiguous() for i in range(size)]
    t = tau
    start = _symmetric_start(z, tau, size)
    w = [start.clone() for _ in range(size)]
    scale = zs[0] + 1.0  # absolute-plus-relative tolerance
    sweeps = 0
    while True:
        for sweep in range(_CHECK_EVERY):
            if sweep == _CHECK_EVERY - 1:
                old = [x.clone() for x in w]
            _cd_sweep(w, zs, t)
        sweeps += _CHECK_EVERY
        delta = torch.stack([(a - b).abs() for a, b in zip(w, old, strict=True)]).amax(0)
        done = delta <= tol * scale
        if sweeps >= min(newton_after, max_sweeps):
            rest = ~done
            if bool(rest.any()):
                ws = torch.stack([x[rest] for x in w], -1)
                zr = torch.stack([x[rest] for x in zs], -1)
                polished = _newton_polish(ws, zr, t[rest], tol * scale[rest], max_sweeps)
                w = [torch.where(rest, torch.zeros_like(x), x) for x in w]
                for i in range(size):
                    w[i][rest] = polished[:, i]
            done = torch.ones_like(done)
        if bool(done.any()):
            sel = idx[done]
            for i in range(size):
                out[sel, i] = w[i][done]
            keep = ~done
            if not bool(keep.any()):
                return out
            idx = idx[keep]
            zs = [x[keep] for x in zs]
            w = [x[keep] for x in w]
            t = t[keep]
            scale = scale[keep]


def _e2(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``ab + ac + bc``."""
    return torch.addcmul(b * c, a, b + c)


def _candidates_needed(z: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """Which groups can have a 3-support / 4-support candidate better than the top 2.

    Screening by bounds that hold at every KKT point ``w`` of a support's problem: ``w_j <= z_j``
    (the regularizer only shrinks), hence ``w_i >= lb_i = max(0, z_i - tau e2(z_{-i}))``, hence
    the smallest kept entry obeys ``w_s <= z_s - tau e2(lb_{-s})``. Where that bound is ``<= 0``
    the smallest entry is zero at every KKT point, so the support's minimum lies on the smaller
    support and its candidate adds nothing (3-support: the top 2; 4-support: the 3-support
    problem). Late in Algorithm 2 most groups are screened out this way.
    """
    z1, z2, z3, z4 = z.unbind(-1)
    # 3-support (w4 = 0): lb_i = max(0, z_i - tau * product of the other two kept entries).
    lb1 = torch.clamp_min(z1 - tau * z2 * z3, 0.0)
    lb2 = torch.clamp_min(z2 - tau * z1 * z3, 0.0)
    need3 = z3 > tau * lb1 * lb2
    # 4-support: lb_i = max(0, z_i - tau * e2 of the other three).
    lb1 = torch.clamp_min(z1 - tau * _e2(z2, z3, z4), 0.0)
    lb2 = torch.clamp_min(z2 - tau * _e2(z1, z3, z4), 0.0)
    lb3 = torch.clamp_min(z3 - tau * _e2(z1, z2, z4), 0.0)
    need4 = z4 > tau * _e2(lb1, lb2, lb3)
    return need3, need4


def _prox_sorted(z: Tensor, tau: Tensor, max_sweeps: int, tol: float) -> Tensor:
    """Prox on ``[n, 4]`` rows sorted decreasing, non-negative; returns ``[n, 4]`` in sorted order."""
    best = z.clone()
    best[:, 2:] = 0.0
    if z.shape[0] == 0:
        return best
    # Groups with at most two non-zeros are fixed points (r(z) = 0): z3 = 0 is never "needed".
    need3, need4 = _candidates_needed(z, tau)
    best_f = 0.5 * z[:, 2:].square().sum(-1)
    for size, need in ((3, need3), (4, need4)):
        work = need.nonzero().squeeze(1)
        if work.numel() == 0:
            continue
        zw, tw = z[work], tau[work]
        cand = _minimise_support(zw, tw, size, max_sweeps, tol)
        reg = _triple_sum(cand[:, 0], cand[:, 1], cand[:, 2], cand[:, 3])
        f = 0.5 * (cand - zw).square().sum(-1) + tw * reg
        better = f < best_f[work]
        sel = work[better]
        best[sel] = cand[better]
        best_f[sel] = f[better]
    return best


def _prox_chunk(flat: Tensor, tau: Tensor, out: Tensor, max_sweeps: int, tol: float) -> None:
    """Prox of ``[n, 4]`` groups written into ``out`` (sort, solve sorted, un-sort, re-sign)."""
    mag, order = flat.abs().sort(dim=-1, descending=True, stable=True)
    sol_sorted = _prox_sorted(mag, tau, max_sweeps, tol)
    out.scatter_(-1, order, sol_sorted)
    # Re-apply signs; ``+ 0.0`` turns the -0.0 that copysign gives pruned negative entries into +0.0.
    torch.copysign(out, flat, out=out)
    out.add_(0.0)


@torch.no_grad()
def prox_2of4(
    w: Tensor,
    tau: Tensor | float,
    *,
    max_sweeps: int = 200,
    tol: float | None = None,
    chunk_groups: int | None = None,
) -> Tensor:
    """Exact proximal operator of ``tau * r`` applied to every group of 4 along the last dim.

    Args:
        w: input of any leading shape whose last dimension is divisible by 4 (fp32 or fp64).
        tau: a non-negative float, or a tensor broadcastable per row (shape ``[..., 1]``).
        max_sweeps: cap on safeguarded Newton iterations for the slowest groups (after 48
            coordinate sweeps).
        tol: convergence tolerance of a sweep, relative to ``1 + z1``; defaults to ``4 * sqrt(eps)``
            of the dtype (objective error is quadratic in it).
        chunk_groups: groups solved per pass (default: 2^18 on CPU, all at once elsewhere).

    Returns:
        The global minimiser of ``0.5 ||x - w||^2 + tau * r(x)`` for every group, same shape and
        dtype as ``w``. Signs and the order of magnitudes are kept; pruned entries are ``+0.0``.
    """
    if not w.is_floating_point():
        raise TypeError(f"prox_2of4 needs a floating tensor, got {w.dtype}")
    groups = group_view(w)
    tau_g = _tau_per_group(tau, w)
    if bool((tau_g < 0).any()):
        raise ValueError("tau must be non-negative")
    if tol is None:
        tol = 4.0 * torch.finfo(w.dtype).eps ** 0.5
    flat = groups.reshape(-1, 4)
    taus = tau_g.reshape(-1)
    out = torch.empty_like(flat)
    n = flat.shape[0]
    # On CPU, chunks that stay in cache are ~1.5x faster than whole-matrix passes; a GPU wants
    # the whole matrix at once.
    chunk = chunk_groups or (_CPU_CHUNK_GROUPS if flat.device.type == "cpu" else max(n, 1))
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        _prox_chunk(flat[sl], taus[sl].contiguous(), out[sl], max_sweeps, tol)
    return out.reshape(w.shape)
