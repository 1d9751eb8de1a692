"""The static exact solver of one support's problem for the 2:4 proximal operator.

:mod:`.prox` reduces the prox of a group to candidates on the sorted magnitudes in units of the
group's largest magnitude (``u``, ``u1 = 1``, ``s = tau max|z|``): the top 2 in closed form and
the minimisers of the 3- and 4-support problems ``min 0.5 ||w - u||^2 + s e3(w)`` over ``w >= 0``
with ``n = 3, 4`` kept entries. This module owns the fixed-budget solver of those support
problems (bisection on a one-parameter curve, then Newton), with a fixed amount of work per group
and no host syncs: it runs under ``torch.compile`` and on accelerators, and finishes the groups
that the eager CPU path of :mod:`.prox` cannot settle. It also owns the support problem's
gradient and KKT residual that both paths use.

**The exact solver (static shapes, any device).** For an ``n``-support (``n = 3, 4``) write
``x = s w``, ``y = s u`` (the problem with ``s = 1``). Stationarity ``x_i - y_i + e2(x_{-i}) = 0``
says that every ``y_i = q(x_i)`` for one quadratic ``q(x) = (x - v)^2 + D`` with vertex
``v = (sigma - 1) / 2``, ``sigma = sum(x)``. At a local minimiser at most one kept entry lies
left of the vertex (two would make a 2x2 Hessian minor negative), and by order preservation it is
the smallest, so ``x_i = v + r_i`` with ``r_i = sqrt(y_i - y_n + rho^2)`` for ``i < n`` and
``x_n = v + rho``, one signed parameter ``rho``. Along this curve the gradient is ``E(rho) 1``:

* ``n = 4``: ``sigma = 2 - A - rho``, ``E = sigma^2/4 - rho^2 + (1 - 2Y + 4y4)/4``,
  ``x4 = (1 - A + rho)/2``;
* ``n = 3``: ``sigma = 3 - 2(A + rho)``, ``E = (sigma + 1)^2/8 - rho^2/2 + (y3 - Y)/2``,
  ``x3 = 1 - A``,

with ``A = sum_{i<n} r_i`` and ``Y = sum_{i<=n} y_i``, so the stationary points are the roots of
the scalar ``E``. Where ``sigma > 0`` (which every feasible point has), ``E`` is *concave* on
``rho <= 0`` (for ``n = 4``, ``dE/drho = -[sigma(1 - pH) - 4p]/2`` with ``p = -rho``,
``H = sum 1/r_i``, ``delta_i = y_i - y_n``, and ``d/dp [sigma(1 - pH) - 4p] = (1 - pH)^2 - 4 -
sigma sum delta_i/r_i^3 <= 0`` as ``0 <= pH <= 3``; likewise for ``n = 3``) and *decreasing* on
``rho >= 0`` (there ``E`` increases with ``D = y_n - rho^2``: ``dE/dD = 1 + sigma sigma'/2 > 0``
for ``n = 4``, similarly for ``n = 3``). So ``E`` is unimodal and has at most two roots: a rising
one ``r_a < 0``, which is a saddle, and a falling one ``r_b``, the interior local minimiser
(checked with the Hessian on 400k random and tied instances: ``r_a`` always indefinite, ``r_b``
always positive definite; and ``r_b`` alone matched an fp64 brute-force minimiser on 31k
instances). Feasibility ``x_n >= 0`` holds on an interval in ``rho`` (``A`` is
convex) inside ``[-1/4, 1/2]`` (``n = 4``) or ``[-1/2, 1/2]`` (``n = 3``). Hence the predicate
"``rho < r_b``", i.e. ``x_n < 0 or E > 0 or E' > 0`` for ``rho < 0`` and ``sigma > 0 and E > 0``
for ``rho >= 0``, is monotone on that bracket, and a fixed number of bisection steps brackets
``r_b`` to ``2^-k`` whatever the input: no iteration count depends on the data.

Bisection alone is accurate to ``eps`` in ``x`` units, i.e. ``eps / s`` in ``w`` units (the curve
parameterisation cancels for small ``s``), so the candidate is finished by
:data:`_POLISH_STEPS` Newton steps on the support's stationarity system in ``w`` units, each kept
only if it lowers the KKT residual. From ``2^-16`` Newton converges quadratically unless the
Hessian is nearly singular, and there the residual is already small; for ``s < 1e-3`` the problem
is nearly linear and Newton starts from ``u`` instead (error ``O(s^3)`` after one step).
:data:`_BISECT_STEPS` keeps a margin over the fewest steps that met the KKT conditions in fp32 on
test and adversarial groups (near-ties, equal magnitudes, supports on the verge of changing;
docs/results.md has the figures).

Reference: Kübler et al., "A Proximal Operator for Inducing 2:4-Sparsity", TMLR 2025,
arXiv:2501.18015.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Bisection steps of the exact solver (brackets ``r_b`` to ``0.75 * 2^-16``).
_BISECT_STEPS = 16
#: Newton steps that finish the bisection's candidate (fp32; fp64 takes one more).
_POLISH_STEPS = 2
#: ``s = tau max|z|`` from which the top 2 is optimal (see the :mod:`.prox` docstring).
_S_TOP2 = 6.0
#: Below this ``s`` Newton starts from ``u`` instead of the curve's (cancelling) candidate.
_S_LINEAR = 1e-3

Cols = list[Tensor]


# --- per-candidate math, shared by both paths ------------------------------------------------
# A candidate is a list of columns (one [m] tensor per kept entry, in sorted order) in units of
# the group's largest magnitude: ``u`` the sorted magnitudes (``u[0] = 1``), ``s = tau max|z|``.


def _others_e2(w: Cols) -> Cols:
    """``e2`` of the other entries for every entry, i.e. ``d e3(w) / d w_i`` (3 or 4 entries)."""
    if len(w) == 3:
        a, b, c = w
        return [b * c, a * c, a * b]
    a, b, c, d = w
    ab, cd, apb, cpd = a * b, c * d, a + b, c + d
    return [b * cpd + cd, a * cpd + cd, d * apb + ab, c * apb + ab]


def _residual(w: Cols, u: Cols, s: Tensor) -> Tensor:
    """KKT residual of ``min 0.5 ||w - u||^2 + s e3(w)`` over ``w >= 0``, max over entries.

    ``|g_i|`` where ``w_i > 0`` and ``max(0, -g_i)`` where ``w_i = 0``, with the gradient
    ``g_i = w_i - u_i + s e2(w_{-i})``. With all four entries (pruned ones zero) it is the KKT
    residual of the full prox problem on the sorted magnitudes.
    """
    out = None
    for wi, ui, ei in zip(w, u, _others_e2(w), strict=True):
        g = wi - ui + s * ei
        r = torch.where(wi > 0, g.abs(), torch.clamp_min(-g, 0.0))
        out = r if out is None else torch.maximum(out, r)
    return out


# --- the static exact solver: Newton polish, bisection on the curve --------------------------


def _newton_trial(w: Cols, u: Cols, s: Tensor) -> Cols:
    """One Newton step on the support's stationarity system, clipped to ``w >= 0``.

    The Hessian is ``I + s S`` with ``S_ij`` the sum of the kept entries other than ``i`` and
    ``j``; it is positive definite at the minimiser the step is aimed at, so the small system is
    solved by unrolled elimination without pivoting (elementwise over groups, no batched LAPACK).
    A failed step (a zero pivot) gives non-finite values, which are mapped to "no step".
    """
    n = len(w)
    g = [wi - ui + s * ei for wi, ui, ei in zip(w, u, _others_e2(w), strict=True)]
    tot = sum(w)
    # Upper triangle of the symmetric system; symmetric elimination keeps the trailing block
    # symmetric, so the lower triangle is never needed.
    up = {(i, j): s * (tot - w[i] - w[j]) for i in range(n) for j in range(i + 1, n)}
    diag: list[Tensor | float] = [1.0] * n
    rhs = [-gi for gi in g]
    for k in range(n):
        inv = 1.0 / diag[k]
        for i in range(k + 1, n):
            f = up[k, i] * inv
            diag[i] = diag[i] - f * up[k, i]
            for j in range(i + 1, n):
                up[i, j] = up[i, j] - f * up[k, j]
            rhs[i] = rhs[i] - f * rhs[k]
    step: dict[int, Tensor] = {}
    for i in reversed(range(n)):
        acc = rhs[i]
        for j in range(i + 1, n):
            acc = acc - up[i, j] * step[j]
        step[i] = acc / diag[i]
    return [
        torch.clamp_min(torch.where(torch.isfinite(step[i]), wi + step[i], wi), 0.0)
        for i, wi in enumerate(w)
    ]


def _polish(w: Cols, u: Cols, s: Tensor, steps: int) -> Cols:
    """``steps`` Newton steps, each kept where it does not increase the KKT residual.

    The residual, not the objective, is the safeguard: near the minimiser the objective changes by
    the square of the step, below fp32 resolution, while the residual changes by the step itself.
    """
    res = _residual(w, u, s)
    for _ in range(steps):
        trial = _newton_trial(w, u, s)
        res_t = _residual(trial, u, s)
        ok = res_t <= res
        w = [torch.where(ok, t, a) for t, a in zip(trial, w, strict=True)]
        res = torch.where(ok, res_t, res)
    return w


def _curve(
    y: Cols, n: int, rho: Tensor, slope: bool
) -> tuple[Cols, Tensor, Tensor, Tensor, Tensor | None]:
    """``(r, sigma, E, x_n, dE/drho)`` at ``rho`` on the curve of the module docstring (``s = 1``).

    ``dE/drho`` is only computed with ``slope`` and only meaningful for ``rho < 0``.
    """
    rho2 = rho * rho
    r = [torch.sqrt(y[i] - y[n - 1] + rho2) for i in range(n - 1)]
    a = r[0] + r[1] + (r[2] if n == 4 else 0.0)
    if n == 4:
        sigma = 2.0 - a - rho
        e = 0.25 * sigma * sigma - rho2 + 0.25 * (1.0 - 2.0 * (y[0] + y[1] + y[2]) + 2.0 * y[3])
        xn = 0.5 * (1.0 - a + rho)
    else:
        sigma = 3.0 - 2.0 * (a + rho)
        e = 0.125 * (sigma + 1.0).square() - 0.5 * rho2 - 0.5 * (y[0] + y[1])
        xn = 1.0 - a
    if not slope:
        return r, sigma, e, xn, None
    p = -rho
    ph = sum(p / torch.clamp_min(ri, 1e-30) for ri in r)
    if n == 4:
        de = -0.5 * (sigma * (1.0 - ph) - 4.0 * p)
    else:
        de = -(0.5 * (sigma + 1.0) * (1.0 - ph) - p)
    return r, sigma, e, xn, de


def _curve_candidate(u: Cols, s: Tensor, n: int, steps: int) -> Cols:
    """The interior stationary point ``r_b`` of the ``n``-support problem, by bisection.

    Returns ``n`` columns in ``w`` units, clipped to ``>= 0``; where the curve has no feasible
    point, ``(u_1, ..., u_{n-1}, 0)``. Where no interior minimiser exists the point is merely
    feasible, which the caller's comparison of objectives sorts out.
    """
    sc = torch.clamp(s, max=_S_TOP2)  # larger s never needs this candidate; keeps y bounded
    y = [sc * ui for ui in u[:n]]
    lo = torch.full_like(sc, -0.25 if n == 4 else -0.5)
    hi = torch.full_like(sc, 0.5)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        _, sigma, e, xn, de = _curve(y, n, mid, slope=True)
        left = torch.where(mid < 0, (xn < 0) | (e > 0) | (de > 0), (sigma > 0) & (e > 0))
        lo = torch.where(left, mid, lo)
        hi = torch.where(left, hi, mid)
    r, sigma, _, xn, _ = _curve(y, n, 0.5 * (lo + hi), slope=False)
    v = 0.5 * (sigma - 1.0)
    x = [v + ri for ri in r] + [xn]
    linear = s < _S_LINEAR
    inv = 1.0 / torch.where(linear, torch.ones_like(sc), sc)
    # Without a feasible interior point: the top n - 1, a start that Newton keeps on the boundary.
    none = xn <= 0
    w = []
    for i in range(n):
        wi = torch.clamp_min(x[i] * inv, 0.0)
        if i < n - 1:
            wi = torch.where(none, u[i], wi)
        w.append(torch.where(linear, u[i], wi))
    return w


def _solve_support_static(u: Cols, s: Tensor, n: int, steps: int, polish: int) -> Cols:
    """Exact ``n``-support candidate with a fixed amount of work per group (no host syncs)."""
    return _polish(_curve_candidate(u, s, n, steps), u[:n], s, polish)
