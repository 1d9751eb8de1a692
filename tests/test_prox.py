"""The 2:4 proximal operator against independent brute-force minimisers, plus its invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prox24_lightning.ops import group_view, is_2of4, prox_2of4, prox_objective, reg_2of4


def _random_groups(n: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups across scales with near-ties, exact zeros and equal magnitudes, and log-uniform tau."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0], dtype=dtype)[
        torch.randint(0, 5, (n, 1), generator=g)
    ]
    z = torch.randn(n, 4, generator=g, dtype=dtype) * scale
    q = n // 8
    z[:q, 1] = z[:q, 0] * (1 + 1e-7)  # near-tie of the two largest
    z[q : 2 * q, 2] = -z[q : 2 * q, 3]  # equal magnitudes, opposite signs
    z[2 * q : 3 * q, 3] = 0.0  # exact zeros
    z[3 * q : 4 * q, 2:] = 0.0  # already 2:4
    z[4 * q : 5 * q] = z[4 * q : 5 * q, :1].expand(-1, 4)  # all equal
    log_tau = torch.empty(n, 1, dtype=dtype).uniform_(-3, 1.5, generator=g)
    tau = 10**log_tau / scale  # cubic homogeneity: tau * scale is what matters
    return z, tau


def _objective_np(w: np.ndarray, z: np.ndarray, tau: float) -> float:
    a = np.abs(w)
    r = a[0] * a[1] * (a[2] + a[3]) + a[2] * a[3] * (a[0] + a[1])
    return 0.5 * float(((w - z) ** 2).sum()) + tau * r


def test_prox_matches_scipy_multistart_minimiser():
    """Independent oracle: multi-start bounded L-BFGS-B on the 4-d objective (|z| orthant)."""
    from scipy.optimize import minimize

    z, tau = _random_groups(240, seed=1)
    sol = prox_2of4(z, tau)
    f_sol = prox_objective(sol, z, tau).squeeze(-1).numpy()
    rng = np.random.default_rng(0)
    for i in range(z.shape[0]):
        az, t = np.abs(z[i].numpy()), float(tau[i])

        def f(x, az=az, t=t):
            return _objective_np(x, az, t)

        def grad(x, az=az, t=t):
            e2 = np.array(
                [
                    x[1] * x[2] + x[1] * x[3] + x[2] * x[3],
                    x[0] * x[2] + x[0] * x[3] + x[2] * x[3],
                    x[0] * x[1] + x[0] * x[3] + x[1] * x[3],
                    x[0] * x[1] + x[0] * x[2] + x[1] * x[2],
                ]
            )
            return x - az + t * e2

        starts = [az, 0.5 * az, np.zeros(4)] + [rng.uniform(0, 1, 4) * az for _ in range(10)]
        best = min(
            minimize(f, s, jac=grad, method="L-BFGS-B", bounds=[(0, v) for v in az]).fun
            for s in starts
        )
        assert f_sol[i] <= best + 1e-6 * max(abs(best), 1e-12) + 1e-14, (z[i], t, f_sol[i], best)


def test_prox_global_on_large_random_set_against_vectorised_search():
    """Thousands of groups: never worse than a vectorised multi-start projected-gradient search."""
    z, tau = _random_groups(6000, seed=2)
    sol = prox_2of4(z, tau)
    f_sol = prox_objective(sol, z, tau).squeeze(-1)
    az = z.abs()
    n, starts = az.shape[0], 24
    g = torch.Generator().manual_seed(3)
    # Starts: uniform in the box [0, |z|], plus |z| itself and every face of the sorted prefix.
    w = torch.rand(n, starts, 4, generator=g, dtype=z.dtype) * az[:, None, :]
    w[:, 0] = az
    order = az.argsort(dim=-1, descending=True)
    for k, size in enumerate((2, 3)):
        face = torch.zeros_like(az).scatter(-1, order[:, :size], az.gather(-1, order[:, :size]))
        w[:, 1 + k] = face
    t = tau[:, None, :]
    step = 1.0 / (1.0 + 3.0 * t * az.amax(-1, keepdim=True)[:, None, :] ** 1)
    for _ in range(3000):
        a, b, c, d = w.unbind(-1)
        e2 = torch.stack(
            [
                b * c + b * d + c * d,
                a * c + a * d + c * d,
                a * b + a * d + b * d,
                a * b + a * c + b * c,
            ],
            -1,
        )
        w = (w - step * (w - az[:, None, :] + t * e2)).clamp(min=0).minimum(az[:, None, :])
    f_ref = (
        0.5 * (w - az[:, None, :]).square().sum(-1)
        + t.squeeze(-1) * (lambda a, b, c, d: a * b * (c + d) + c * d * (a + b))(*w.unbind(-1))
    ).amin(1)
    excess = (f_sol - f_ref) / f_ref.abs().clamp_min(1e-12)
    assert float(excess.max()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prox_invariants(dtype):
    z, tau = _random_groups(4000, seed=4, dtype=dtype)
    sol = prox_2of4(z, tau)
    assert sol.dtype == dtype and sol.shape == z.shape
    # signs kept (or zero), magnitudes shrink, order of |z| kept
    assert bool(((sol == 0) | (torch.sign(sol) == torch.sign(z))).all())
    assert bool((sol.abs() <= z.abs() + 1e-12).all())
    az, asol = z.abs(), sol.abs()
    bigger = az[:, :, None] > az[:, None, :]
    # Iterates converge to the sweep tolerance (4 sqrt(eps) relative); on near-ties the two kept
    # entries may differ by that much while the objective is exact (checked above/below).
    slack = 8 * torch.finfo(dtype).eps ** 0.5 * (1 + az.amax(-1))[:, None, None]
    assert bool((asol[:, :, None] >= asol[:, None, :] - slack)[bigger].all())
    # support is a prefix of the sorted magnitudes (size 2, 3 or 4, or all of z's non-zeros)
    srt = asol.gather(-1, az.argsort(dim=-1, descending=True, stable=True))
    nz = srt != 0
    assert bool((nz[:, 1:] <= nz[:, :-1]).all())
    # never -0.0
    assert not bool(torch.signbit(sol[sol == 0]).any())
    # 2:4 exactly when the regulariser vanishes
    reg_per_group = torch.stack([reg_2of4(row) for row in sol[:200]])
    nnz = (sol[:200] != 0).sum(-1)
    assert bool(((reg_per_group == 0) == (nnz <= 2)).all())


def test_prox_limits_and_fixed_points():
    z, _ = _random_groups(2000, seed=5)
    assert torch.allclose(prox_2of4(z, 1e-12), z, atol=1e-9)
    assert torch.equal(prox_2of4(z, 0.0), torch.where(z == 0, torch.zeros_like(z), z))
    big = prox_2of4(z, 1e4 / z.abs().amax(-1, keepdim=True).clamp_min(1e-3).square())
    top2 = torch.zeros_like(z)
    idx = z.abs().sort(dim=-1, descending=True, stable=True).indices[:, :2]
    top2.scatter_(-1, idx, z.gather(-1, idx))
    assert torch.equal(big, top2)
    sparse = z.clone()
    sparse[:, 2:] = 0
    assert torch.equal(prox_2of4(sparse, 5.0), sparse)  # r = 0: a fixed point


def test_prox_shapes_tau_per_row_and_errors():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 16, generator=g)
    tau = torch.rand(3, 5, 1, generator=g)
    out = prox_2of4(w, tau)
    rows = torch.stack([prox_2of4(w[i, j], float(tau[i, j])) for i in range(3) for j in range(5)])
    assert torch.equal(out.reshape(15, 16), rows)
    assert torch.equal(prox_2of4(w, tau), out)  # deterministic
    with pytest.raises(ValueError, match="divisible by 4"):
        prox_2of4(torch.zeros(3, 6), 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        prox_2of4(torch.zeros(3, 8), -1.0)
    assert is_2of4(prox_2of4(w, 1e3))
    assert group_view(w).shape == (3, 5, 4, 4)


def test_screened_candidates_add_nothing():
    """The bound screening only skips supports whose smallest entry is zero at the optimum."""
    from prox24_lightning.ops.prox import _candidates_needed, _minimise_support

    z, tau = _random_groups(6000, seed=6)
    mag = z.abs().sort(dim=-1, descending=True).values
    t = tau.squeeze(-1)
    need3, need4 = _candidates_needed(mag, t)
    assert 0 < int(need4.sum()) < int((mag[:, 3] > 0).sum())  # the screen does screen
    tol = 4.0 * torch.finfo(mag.dtype).eps ** 0.5
    for size, need in ((3, need3), (4, need4)):
        skipped = ~need & (mag[:, size - 1] > 0)
        cand = _minimise_support(mag[skipped], t[skipped], size, 200, tol)
        # The support's own minimiser puts its smallest entry at zero (up to the sweep tolerance).
        assert float(cand[:, size - 1].max()) <= 1e-6


def test_chunked_prox_equals_one_pass():
    z, tau = _random_groups(3000, seed=7, dtype=torch.float32)
    w = z.reshape(100, 120)
    t = tau.reshape(100, 30)[:, :1]
    assert torch.equal(prox_2of4(w, t, chunk_groups=7), prox_2of4(w, t, chunk_groups=1 << 20))
