"""fp32 exactness of the 2:4 prox on both solver paths, against an fp64 brute-force minimiser.

Tolerances are relative to each group's ``max |z|`` (the prox is homogeneous: ``prox_{tau r}(c z)
= c prox_{c tau r}(z)``): the KKT conditions hold within ``2e-5 max |z|`` and the objective is
within ``1e-5`` relative of the best of an independent fp64 search (grid over ``(w3, w4)`` with
the exact minimiser in ``(w1, w2)``, then projected Newton from the best point of every support).
"""

from __future__ import annotations

import math

import pytest
import torch

from prox24_lightning.ops import prox_2of4, prox_objective

pytestmark = pytest.mark.usefixtures("one_thread")

KKT_TOL = 2e-5
GAP_TOL = 1e-5


def _hard_groups(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 groups with near-ties, exact zeros, equal magnitudes and already-2:4 groups."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0], dtype=torch.float64)[
        torch.randint(0, 5, (n, 1), generator=g)
    ]
    z = torch.randn(n, 4, generator=g, dtype=torch.float64) * scale
    q = n // 8
    z[:q, 1] = z[:q, 0] * (1 + 1e-6)  # near-tie of the two largest (a few fp32 ulps)
    z[q : 2 * q, 2] = -z[q : 2 * q, 3]  # equal magnitudes, opposite signs
    z[2 * q : 3 * q, 3] = 0.0  # exact zeros
    z[3 * q : 4 * q, 2:] = 0.0  # already 2:4
    z[4 * q : 5 * q] = z[4 * q : 5 * q, :1].expand(-1, 4)  # all equal
    z[5 * q : 6 * q, 2] = z[5 * q : 6 * q, 1] * (1 - 1e-6)  # near-tie of the 2nd and 3rd
    # s = tau * max|z| log-uniform over [10^-2.5, 10^1.5]: 4-, 3- and 2-entry supports.
    s = 10 ** torch.empty(n, dtype=torch.float64).uniform_(-2.5, 1.5, generator=g)
    return z.float(), (s / z.abs().amax(-1).clamp_min(1e-30)).float()


def _scaled_groups(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 Gaussian groups with ``max |z|`` from 0.003 to 30 and ``tau max|z|`` from 0.01 to 10."""
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** torch.empty(n, 1, dtype=torch.float64).uniform_(
        math.log10(0.003), math.log10(30.0), generator=g
    )
    z = torch.randn(n, 4, generator=g, dtype=torch.float64) * scale
    s = 10 ** torch.empty(n, dtype=torch.float64).uniform_(-2.0, 1.0, generator=g)
    return z.float(), (s / z.abs().amax(-1)).float()


def _sorted_objective(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    a, b, c, d = w.unbind(-1)
    return 0.5 * (w - u).square().sum(-1) + s * (a * b * (c + d) + c * d * (a + b))


def _projected_newton(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, iters: int):
    """fp64 projected Newton on ``[..., 4]`` sorted problems; steps that raise the objective are
    replaced by an exact coordinate sweep (which never does)."""
    eye = torch.eye(4, dtype=w.dtype)
    for _ in range(iters):
        tot = w.sum(-1, keepdim=True)
        e2 = (tot.square() - w.square().sum(-1, keepdim=True)) / 2
        grad = w - u + s[..., None] * (e2 - w * (tot - w))
        hess = eye + s[..., None, None] * (tot[..., None] - w[..., :, None] - w[..., None, :])
        hess = hess * (1 - eye) + eye
        free = (w > 0) | (grad < 0)
        hess = torch.where(free[..., :, None] & free[..., None, :], hess, eye.expand_as(hess))
        step, _ = torch.linalg.solve_ex(hess, torch.where(free, -grad, torch.zeros_like(grad)))
        trial = torch.clamp_min(w + torch.nan_to_num(step), 0.0)
        swept = w.clone()
        for i in (3, 2, 1, 0):
            o = [swept[..., j] for j in range(4) if j != i]
            e2_i = o[0] * o[1] + o[0] * o[2] + o[1] * o[2]
            swept[..., i] = torch.clamp_min(u[..., i] - s * e2_i, 0.0)
        ok = _sorted_objective(trial, u, s) <= _sorted_objective(w, u, s)
        w = torch.where(ok[..., None], trial, swept)
    return w


def _brute_force_objective(z: torch.Tensor, tau: torch.Tensor, grid: int = 33) -> torch.Tensor:
    """fp64 global minimum of ``0.5 ||w - z||^2 + tau r(w)`` per group, independent of the prox.

    On sorted magnitudes ``u`` (units of ``max |z|``, ``s = tau max|z|``): a ``grid x grid`` grid
    of ``(w3, w4)`` in ``[0, u3] x [0, u4]``, each point with the exact minimiser in ``(w1, w2)``
    (a 2x2 quadratic: interior solution if convex and feasible, else the better edge). The best
    grid point overall, the best with ``w4 = 0`` (3-support), the best with ``w4 > 0`` and the
    top 2 are polished by projected Newton; the lowest objective is returned (original units).
    """
    z64, t64 = z.double(), tau.double()
    mag = z64.abs().sort(-1, descending=True).values
    z1 = mag[:, 0].clamp_min(1e-300)
    u, s = mag / z1[:, None], t64 * z1
    n = u.shape[0]
    lin = torch.linspace(0, 1, grid, dtype=torch.float64)
    w3 = (u[:, 2, None, None] * lin[:, None]).expand(n, grid, grid)
    w4 = (u[:, 3, None, None] * lin[None, :]).expand(n, grid, grid)
    sg = s[:, None, None]
    a, pi = sg * (w3 + w4), sg * w3 * w4  # inner problem: w1 + a w2 = u1 - pi, a w1 + w2 = u2 - pi
    b1, b2 = u[:, 0, None, None] - pi, u[:, 1, None, None] - pi
    det = 1 - a * a
    i1, i2 = (b1 - a * b2) / det, (b2 - a * b1) / det
    interior = (det > 0) & (i1 >= 0) & (i2 >= 0)
    best_w, best_f = None, None
    for k, (c1, c2) in enumerate(
        [(b1.clamp_min(0), torch.zeros_like(b1)), (torch.zeros_like(b2), b2.clamp_min(0)), (i1, i2)]
    ):
        w = torch.stack([c1, c2, w3, w4], -1)
        f = _sorted_objective(w, u[:, None, None, :], sg)
        if k == 2:  # the interior solution only where it is one
            f = torch.where(interior, f, torch.inf)
        if best_f is None:
            best_w, best_f = w, f
        else:
            better = f < best_f
            best_w = torch.where(better[..., None], w, best_w)
            best_f = torch.where(better, f, best_f)
    rows = torch.arange(n)
    flat_f, flat_w = best_f.reshape(n, -1), best_w.reshape(n, -1, 4)
    inner_f, inner_w = best_f[:, :, 1:].reshape(n, -1), best_w[:, :, 1:].reshape(n, -1, 4)
    top2 = u.clone()
    top2[:, 2:] = 0
    starts = torch.stack(
        [
            flat_w[rows, flat_f.argmin(1)],
            best_w[rows, best_f[:, :, 0].argmin(1), 0],
            inner_w[rows, inner_f.argmin(1)],
            top2,
        ],
        1,
    )
    uu, ss = u[:, None, :].expand_as(starts), s[:, None].expand(n, starts.shape[1])
    polished = _projected_newton(starts, uu, ss, 40)
    return _sorted_objective(polished, uu, ss).amin(1) * z1.square()


def _kkt_residual(w: torch.Tensor, z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Per-group KKT residual of the (signed, unsorted) prox problem in fp64, in units of z.

    Non-zero ``w_i``: ``|w_i - z_i + tau sign(w_i) e2(|w_{-i}|)|``, plus ``|w_i|`` if its sign is
    not that of ``z_i``; zero ``w_i``: ``max(0, |z_i| - tau e2(|w_{-i}|))`` (the subgradient).
    """
    w, z, t = w.double(), z.double(), tau.double()[:, None]
    a = w.abs()
    tot = a.sum(-1, keepdim=True)
    e2_others = (tot.square() - a.square().sum(-1, keepdim=True)) / 2 - a * (tot - a)
    grad = w - z + t * torch.sign(w) * e2_others
    res = torch.where(w != 0, grad.abs(), torch.clamp_min(z.abs() - t * e2_others, 0.0))
    wrong_sign = (w != 0) & (torch.sign(w) != torch.sign(z))
    return torch.where(wrong_sign, res + a, res).amax(-1)


@pytest.fixture(scope="module")
def groups() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1500 hard + 6000 scaled fp32 groups and their fp64 brute-force minimum objectives."""
    z1, t1 = _hard_groups(1500, seed=0)
    z2, t2 = _scaled_groups(6000, seed=1)
    z, tau = torch.cat([z1, z2]), torch.cat([t1, t2])
    return z, tau, _brute_force_objective(z, tau)


@pytest.mark.parametrize("static", [True, False], ids=["static", "eager"])
def test_fp32_prox_is_kkt_and_global(groups, static):
    z, tau, f_ref = groups
    sol = prox_2of4(z, tau[:, None], static=static)
    assert sol.dtype == torch.float32 and sol.shape == z.shape
    zmax = z.double().abs().amax(-1)
    kkt = _kkt_residual(sol, z, tau) / zmax
    assert float(kkt.max()) <= KKT_TOL, (int((kkt > KKT_TOL).sum()), float(kkt.max()))
    f = prox_objective(sol.double(), z.double(), tau.double()[:, None]).squeeze(-1)
    gap = (f - f_ref) / (f_ref + 1e-12 * zmax.square())
    assert float(gap.max()) <= GAP_TOL, (int((gap > GAP_TOL).sum()), float(gap.max()))
    # The sets exercise every support size, and pruned entries are +0.0.
    counts = torch.bincount((sol != 0).sum(-1), minlength=5)
    assert all(int(counts[k]) > 500 for k in (2, 3, 4)), counts
    assert not bool(torch.signbit(sol[sol == 0]).any())


def test_paths_agree_and_scale_invariance(groups):
    """Static and eager paths give the same minimiser, and prox(c z, tau / c) = c prox(z, tau)."""
    z, tau, _ = groups
    zd, td = z.double(), tau.double()[:, None]
    ref = prox_objective(prox_2of4(z, tau[:, None], static=False).double(), zd, td)
    for static in (True, False):
        for c in (2.0**-7, 2.0**5):  # powers of two: c z and tau / c are exact in fp32
            sol = prox_2of4(z * c, tau[:, None] / c, static=static).double() / c
            f = prox_objective(sol, zd, td)
            scale = zd.abs().amax(-1).square().squeeze(-1)
            excess = (f - ref).squeeze(-1) / (ref.squeeze(-1) + 1e-12 * scale)
            assert float(excess.abs().max()) <= GAP_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_solved_in_fp32(dtype):
    z, tau = _scaled_groups(400, seed=2)
    zh = z.to(dtype)
    for static in (True, False):
        out = prox_2of4(zh, tau[:, None], static=static)
        assert out.dtype == dtype
        want = prox_2of4(zh.float(), tau[:, None], static=static).to(dtype) + 0.0
        assert torch.equal(out, want)
        assert not bool(torch.signbit(out[out == 0]).any())


@pytest.mark.parametrize("shape", [(8,), (3, 16), (2, 5, 12)])
def test_compiled_static_path_traces_whole(shape):
    """``torch.compile(fullgraph=True)`` traces the whole prox (no graph breaks, no host syncs) and
    finds the same minimiser as the eager CPU path."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g) * 3
    tau = torch.rand(*shape[:-1], 1, generator=g) * 0.5
    compiled = torch.compile(prox_2of4, fullgraph=True, backend="eager")
    for t in (tau, 0.3):
        got = compiled(w, t)
        want = prox_2of4(w, t, static=False)
        f_got = prox_objective(got.double(), w.double(), t if isinstance(t, float) else t.double())
        f_want = prox_objective(
            want.double(), w.double(), t if isinstance(t, float) else t.double()
        )
        assert got.shape == w.shape and got.dtype == w.dtype
        assert float(((f_got - f_want).abs() / f_want.clamp_min(1e-12)).max()) <= 1e-6
    torch._dynamo.reset()


def test_tensor_tau_check_without_host_sync():
    """A negative tensor tau raises on both paths (ValueError eager, device assert static)."""
    w = torch.randn(2, 8)
    with pytest.raises(ValueError, match="non-negative"):
        prox_2of4(w, -torch.ones(2, 1), static=False)
    with pytest.raises(RuntimeError, match="non-negative"):
        prox_2of4(w, -torch.ones(2, 1), static=True)
