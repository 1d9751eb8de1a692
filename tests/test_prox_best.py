"""The ``best`` prox recipe (ALPS warm start, exact local mask search, CG polish) and the search.

The references are brute force in fp64: every row's refit is an explicit solve on its support,
and a group move is scored by refitting the row on the moved mask, independent of the search's
rank updates, Schur complements and ``LDL^T`` prefixes.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_solvers import assert_exact_2of4, llm_like_layer, loss64

from prox24_lightning.ops import normalize
from prox24_lightning.ops.masks import mask_2of4
from prox24_lightning.solvers import RECIPES, ALPSConfig, ProxConfig, make_config, prune_weight
from prox24_lightning.solvers.mask_search import (
    _prefix_quadratic,
    mask_search,
    move_deltas,
    support_slots,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: The six 2:4 masks of a group of four.
GROUP_MASKS = list(itertools.combinations(range(4), 2))


def refit64(t: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row least squares on the support, explicit solves in fp64."""
    t, h = t.double(), h.double()
    w = torch.zeros_like(t)
    for i in range(t.shape[0]):
        s = torch.nonzero(mask[i]).flatten()
        w[i, s] = torch.linalg.solve(h[s][:, s], (t[i] @ h)[s])
    return w


def row_losses64(w: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    d = w.double() - t.double()
    return ((d @ h.double()) * d).sum(-1)


def normalised_layer(seed: int, d_in: int, d_out: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Ŵ̃, H̃)`` of an LLM-like layer in fp64."""
    w, h, _ = llm_like_layer(seed, d_in=d_in, d_out=d_out, **kw)
    norm = normalize(h)
    return norm.to_normalized(w).double(), norm.gram.double()


def moved(mask: torch.Tensor, row: int, group: int, keep: tuple[int, int]) -> torch.Tensor:
    out = mask.clone()
    out[row, 4 * group : 4 * group + 4] = False
    out[row, [4 * group + keep[0], 4 * group + keep[1]]] = True
    return out


# --------------------------------------------------------------------------------------------
# 1. The exact move scores and prefixes against brute force
# --------------------------------------------------------------------------------------------


def test_move_deltas_match_brute_force_refits():
    t, h = normalised_layer(0, 16, 3)
    mask = mask_2of4(t.abs())
    w = refit64(t, h, mask)
    g = w @ h - t @ h
    s_idx, q_idx = support_slots(mask)
    base = row_losses64(w, t, h)
    for i in range(t.shape[0]):
        s, q = s_idx[i], q_idx[i]
        p = torch.linalg.inv(h[s][:, s])
        c = p @ h[s][:, q]
        sig = h[q][:, q] - h[q][:, s] @ c
        for j in range(4):
            blk = slice(2 * j, 2 * j + 2)
            delta = move_deltas(w[i, s[blk]], g[i, q[blk]], p[blk, blk], c[blk, blk], sig[blk, blk])
            kept = [int(x) - 4 * j for x in s[blk]]
            pruned = [int(x) - 4 * j for x in q[blk]]
            # Moves 0..3 swap kept a = m // 2 for pruned b = m % 2; move 4 swaps both.
            targets = [tuple(sorted((pruned[m % 2], kept[1 - m // 2]))) for m in range(4)] + [
                tuple(sorted(pruned))
            ]
            for m, keep in enumerate(targets):
                other = moved(mask, i, j, keep)
                truth = row_losses64(refit64(t, h, other), t, h)[i] - base[i]
                assert float(delta[m]) == pytest.approx(float(truth), rel=1e-7, abs=1e-10)


def test_prefix_quadratic_matches_explicit_solves():
    gen = torch.Generator().manual_seed(1)
    n, r, a = 5, 6, 6
    x = torch.randn(n, r, 2 * r, generator=gen, dtype=torch.float64)
    p = x @ x.transpose(1, 2) / (2 * r) + 0.1 * torch.eye(r, dtype=torch.float64)
    y = torch.randn(n, a, 2 * a, generator=gen, dtype=torch.float64)
    sig = y @ y.transpose(1, 2) / (2 * a) + 0.1 * torch.eye(a, dtype=torch.float64)
    c = 0.3 * torch.randn(n, r, a, generator=gen, dtype=torch.float64)
    k = torch.cat([torch.cat([p, c], 2), torch.cat([c.transpose(1, 2), -sig], 2)], 1)
    v = torch.randn(n, r + a, generator=gen, dtype=torch.float64)
    # Moves of two removed and two added entries each, interleaved as the search orders them.
    order = torch.tensor([0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11])
    k, v = k[:, order][:, :, order], v[:, order]
    got = _prefix_quadratic(k, v, 3)
    for blocks in range(1, 4):
        m = 4 * blocks
        want = (v[:, :m, None] * torch.linalg.solve(k[:, :m, :m], v[:, :m, None])).sum((1, 2))
        torch.testing.assert_close(got[:, blocks - 1], want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 2. The search: exact descent to a local optimum, never worse than its start, deterministic
# --------------------------------------------------------------------------------------------


def test_search_descends_exactly_to_a_local_optimum():
    """fp64, negligible ridge: every round lowers every row's refit loss, and after the last one
    no single group move (of the 5 per group) lowers it, by brute force."""
    t, h = normalised_layer(2, 32, 4)
    mask = mask_2of4(t.abs())
    w = refit64(t, h, mask)
    losses = [row_losses64(w, t, h)]
    for _ in range(12):
        found = mask_search(t, h, w, mask, rounds=1, swaps=4, candidates=8, dampening=1e-12)
        assert_exact_2of4(found.weight, found.mask)
        w, mask = refit64(t, h, found.mask), found.mask
        losses.append(row_losses64(w, t, h))
        assert bool((losses[-1] <= losses[-2] * (1 + 1e-12)).all())
    assert float(losses[-1].sum()) < 0.99 * float(losses[0].sum())
    for i in range(t.shape[0]):
        for j in range(8):
            for keep in GROUP_MASKS:
                other = moved(mask, i, j, keep)
                loss = row_losses64(refit64(t[i : i + 1], h, other[i : i + 1]), t[i : i + 1], h)
                assert float(loss) >= float(losses[-1][i]) * (1 - 1e-9)


@pytest.mark.parametrize("d_in, swaps", [(64, 4), (128, 2)])
def test_search_result_is_its_ridge_refit_and_chunking_does_not_matter(d_in, swaps):
    """(128, 2): the rank updates stay factors for 4 rounds before they are folded into P."""
    t, h = normalised_layer(3, d_in, 12)
    mask = mask_2of4(t.abs())
    start = refit64(t, h, mask)
    kw = dict(rounds=6, swaps=swaps, candidates=8, polish=0)
    a = mask_search(t, h, start, mask, **kw)
    b = mask_search(t, h, start, mask, max_chunk_bytes=1, **kw)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-12)
    ridge = h + a.dampening * torch.eye(d_in, dtype=torch.float64)
    want = torch.zeros_like(t)
    for i in range(t.shape[0]):
        s = torch.nonzero(a.mask[i]).flatten()
        want[i, s] = torch.linalg.solve(ridge[s][:, s], (t[i] @ h)[s])
    torch.testing.assert_close(a.weight, want, rtol=1e-8, atol=1e-10)
    assert int(a.moves) > 0 and int(a.rows_kept) == 0


def near_duplicate_layer(seed: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Ŵ̃, H̃)`` whose inputs come in near-identical pairs (as attention heads that share a
    value head do in an ``o_proj``): cond(H̃) ~ 1e7, the regime where the search's rank-updated
    inverse drifts in fp32."""
    gen = torch.Generator().manual_seed(seed)
    kw = dict(generator=gen, dtype=torch.float64)
    base = torch.randn(4096, d_in // 2, **kw) @ torch.randn(d_in // 2, d_in // 2, **kw)
    x = torch.cat([base + 1e-2 * torch.randn(4096, d_in // 2, **kw) for _ in range(2)], 1)
    x = x[:, torch.randperm(d_in, generator=gen)]
    norm = normalize(x.T @ x)
    return norm.to_normalized(torch.randn(d_out, d_in, **kw)).double(), norm.gram.double()


def test_fp32_search_on_an_ill_conditioned_gram_returns_its_masks_refit():
    """The returned weight is the refit of the returned mask (not of the drifted inverse the
    moves were scored with) and no row comes back worse than its start. Without the residual
    check and the guard after the polish: 7.8x the exact refit's loss, 27 of 64 rows worse
    than the start."""
    t, h = near_duplicate_layer(0, 256, 64)
    mask = mask_2of4(t.abs())
    start = refit64(t, h, mask)
    found = mask_search(
        t.float(), h.float(), start.float(), mask, rounds=6, swaps=16, candidates=16
    )
    assert_exact_2of4(found.weight, found.mask)
    got = row_losses64(found.weight, t, h)
    exact = row_losses64(refit64(t, h, found.mask), t, h)
    before = row_losses64(start, t, h)
    assert float(got.sum()) <= 1.01 * float(exact.sum())
    assert bool((got <= before * (1 + 1e-4)).all())
    assert float(got.sum()) < 0.7 * float(before.sum())  # and the search did its job


def test_search_keeps_a_start_it_cannot_improve():
    t, h = normalised_layer(4, 32, 4)
    mask = mask_2of4(t.abs())
    w = refit64(t, h, mask)
    for _ in range(30):  # to the local optimum
        found = mask_search(t, h, w, mask, rounds=2, swaps=4, candidates=8, dampening=1e-12)
        if torch.equal(found.mask, mask):
            break
        w, mask = refit64(t, h, found.mask), found.mask
    again = mask_search(t, h, w, mask, rounds=2, swaps=4, candidates=8, dampening=1e-12)
    assert torch.equal(again.mask, mask) and int(again.moves) == 0


# --------------------------------------------------------------------------------------------
# 3. The recipe: exactly 2:4, better than ALPS and SparseGPT, deterministic
# --------------------------------------------------------------------------------------------

#: (seed, d_in, rank fraction) of tests/test_solvers.py's quality layers.
CASES = [(0, 128, 0.25), (1, 128, 0.25), (2, 256, 0.25), (0, 128, 0.03), (1, 128, 0.03)]
CG50 = dict(refine="cg", refine_steps=50)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c[0]}-d{c[1]}-rank{c[2]}")
def test_best_recipe_beats_alps_and_sparsegpt(case):
    seed, d_in, rank_frac = case
    w, h, _ = llm_like_layer(seed, d_in=d_in, d_out=32, rank_frac=rank_frac)
    best = prune_weight(w, h, "prox", config=RECIPES["best"])
    assert_exact_2of4(best.weight, best.mask)
    assert best.stats.iterations_to_2of4 == 0  # the warm start replaced the prox phase
    search = best.stats.extra["mask_search"]
    assert search["moves"] > 0 and search["loss_before"] > best.stats.loss_method
    loss = best.stats.loss_final
    assert loss64(best.weight, w, h) == pytest.approx(loss, rel=1e-3)
    for method, cfg in [("alps", {}), ("alps", CG50), ("sparsegpt", CG50)]:
        other = prune_weight(w, h, method, config=make_config(method, cfg)).stats.loss_final
        assert loss < other, (method, cfg, loss, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_best_recipe_is_deterministic_and_keeps_the_output_contract(dtype):
    w, h, _ = llm_like_layer(5, d_in=128, d_out=24)
    a = prune_weight(w.to(dtype), h, "prox", config=RECIPES["best"])
    b = prune_weight(w.to(dtype), h, "prox", config=RECIPES["best"])
    assert a.weight.dtype == dtype
    assert_exact_2of4(a.weight, a.mask)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
    assert a.stats.loss_final == b.stats.loss_final


def test_search_after_the_prox_phase_and_from_sparsegpt():
    w, h, _ = llm_like_layer(6, d_in=128, d_out=32)
    fast = prune_weight(w, h, "prox", config=RECIPES["fast"])
    searched = prune_weight(w, h, "prox", config={"recipe": "fast", "mask_search_rounds": 4})
    assert_exact_2of4(searched.weight, searched.mask)
    assert searched.stats.iterations_to_2of4 > 0  # the prox phase ran, then the search
    assert searched.stats.loss_final < fast.stats.loss_final
    sgpt = prune_weight(w, h, "sparsegpt", **CG50)
    warm = prune_weight(
        w, h, "prox", config={"recipe": "best", "warm_start": "sparsegpt"}
    )  # fmt: skip
    assert_exact_2of4(warm.weight, warm.mask)
    assert warm.stats.loss_final < sgpt.stats.loss_final


def test_search_recipe_beats_alps_and_sparsegpt_refits():
    """``RECIPES["search"]`` (prox phase, then the exact search) reaches a lower local loss than
    ALPS's and SparseGPT's masks with 50 CG steps."""
    w, h, _ = llm_like_layer(8, d_in=128, d_out=32)
    search = prune_weight(w, h, "prox", config={"recipe": "search"})
    assert search.stats.iterations_to_2of4 > 0 and search.stats.extra["mask_search"]["moves"] > 0
    assert torch.equal(search.weight, prune_weight(w, h, "prox", config=RECIPES["search"]).weight)
    assert_exact_2of4(search.weight, search.mask)
    for method in ("alps", "sparsegpt"):
        assert search.stats.loss_final < prune_weight(w, h, method, **CG50).stats.loss_final


@pytest.mark.parametrize("refine_steps", [0, 20])
def test_best_recipe_on_dead_features_and_a_rank_deficient_gram(refine_steps):
    d_in, d_out = 64, 16
    w, _, x = llm_like_layer(7, d_in=d_in, d_out=d_out, n_tokens=40)
    dead = torch.tensor([0, 1, 5, 13, 14, 15, 63])
    x[:, dead] = 0.0
    h = x.T @ x
    res = prune_weight(w, h, "prox", config=RECIPES["best"], refine_steps=refine_steps)
    assert_exact_2of4(res.weight, res.mask)
    assert math.isfinite(res.stats.loss_final)
    assert res.stats.extra["mask_search"]["dampening"] >= RECIPES["best"].mask_search_dampening
    assert not bool(res.mask[:, [0, 1]].any())
    assert bool(res.mask[:, [2, 3, 12]].all())
    alps = prune_weight(w, h, "alps", refine="cg", refine_steps=max(refine_steps, 1))
    assert res.stats.loss_final <= alps.stats.loss_final * 1.01
    zero = prune_weight(w, torch.zeros(d_in, d_in), "prox", config=RECIPES["best"])
    assert_exact_2of4(zero.weight, zero.mask)


def test_search_with_a_ridge_minimises_alps_ridged_objective():
    """``mask_search_ridge``: the search scores masks by ALPS's ridged objective, so its masks
    have a lower ridged loss than the plain search's and a higher plain local loss (each search
    is best on its own objective, checked on the exact fp64 refits of both masks); 0 is the
    plain search bit for bit."""
    w, h, _ = llm_like_layer(9, d_in=128, d_out=32, n_tokens=96)
    base = {"recipe": "search", "refine_steps": 0}
    plain = prune_weight(w, h, "prox", config=base)
    ridged = prune_weight(w, h, "prox", config={**base, "mask_search_ridge": 0.05})
    again = prune_weight(w, h, "prox", config={**base, "mask_search_ridge": 0.0})
    assert torch.equal(again.weight, plain.weight)
    assert_exact_2of4(ridged.weight, ridged.mask)
    assert ridged.stats.extra["mask_search"]["ridge"] == 0.05
    assert not torch.equal(ridged.mask, plain.mask)
    norm = normalize(h.double())
    t = norm.to_normalized(w.double())
    d2 = norm.scale.double().square()
    hr = norm.gram.double() + torch.diag(0.05 * d2.mean() / d2)  # ALPS's ridge on H̃
    fits = {k: refit64(t, hr, r.mask) for k, r in (("plain", plain), ("ridged", ridged))}
    exact = {k: refit64(t, norm.gram, r.mask) for k, r in (("plain", plain), ("ridged", ridged))}
    assert loss64(fits["ridged"], t, hr) < loss64(fits["plain"], t, hr)
    assert loss64(exact["plain"], t, norm.gram) < loss64(exact["ridged"], t, norm.gram)


# --------------------------------------------------------------------------------------------
# 4. Config
# --------------------------------------------------------------------------------------------


def test_best_recipe_settings_and_validation():
    best = make_config("prox", {"recipe": "best"})
    assert best == RECIPES["best"] and isinstance(best, ProxConfig)
    assert (best.warm_start, best.mask_search_rounds, best.refine) == ("alps", 6, "cg")
    assert ProxConfig().warm_start == "none" and ProxConfig().mask_search_rounds == 0
    for bad in (
        {"warm_start": "admm"},
        {"mask_search_rounds": -1},
        {"mask_search_swaps": 0},
        {"mask_search_swaps": 8, "mask_search_candidates": 4},
        {"mask_search_dampening": 0.0},
        {"mask_search_dampening": float("nan")},
        {"mask_search_ridge": -0.01},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_config("prox", {"recipe": "best", **bad})
    # One YAML serves every method: the search keys are the prox method's only.
    assert make_config("alps", {"mask_search_rounds": 3, "warm_start": "alps"}) == ALPSConfig()


def test_search_dampening_grows_with_the_conditioning():
    """A nearly collinear pair of inputs: the ridge grows tenfold until the fp32 inverses are
    accurate enough (``λ_max · max J_ii`` at most the limit)."""
    from prox24_lightning.solvers.mask_search import search_dampening

    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x[:, 1] = x[:, 0] + 1e-4 * x[:, 1]
    h = normalize(x.T @ x).gram.double()
    delta, j = search_dampening(h, 1e-6, 2e5)
    assert delta > 1e-6
    lam = float(torch.linalg.eigvalsh(h)[-1])
    assert lam * float(j.diagonal().max()) <= 2e5 * 1.001
    assert search_dampening(torch.eye(16, dtype=torch.float64), 1e-6, 2e5)[0] == 1e-6


def test_best_recipe_through_the_pipeline(tmp_path, text_files):
    """``solver: {recipe: best}`` in the Lightning pipeline: every layer searched, exactly 2:4."""
    from helpers import callback, fit_args

    from prox24_lightning.check import check_export
    from prox24_lightning.cli import cli_main
    from prox24_lightning.testing import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", "llama", num_layers=2)
    out = tmp_path / "run"
    export = callback(
        "prox24_lightning.callbacks.ExportPruned", dirpath=out / "export", overwrite="true"
    )
    args = fit_args(
        model_dir, out, text_files[0], method="prox", callbacks=export,
        **{"model.solver.recipe": "best"},
    )  # fmt: skip
    cli_main(args)
    assert check_export(out / "export").ok
    report = (out / "export" / "sparsity_report.json").read_text()
    assert '"all_2of4": true' in report
