"""Toy experiment: how often does each 2:4 method find the optimal mask of a 16-input row?

With ``d_in = 16`` (4 groups of 4) every row has only ``6^4 = 1296`` 2:4 masks, so the best mask
under the exact per-row refit can be found by enumeration (paper.md §8 "Test oracles", §9). For a
mask with kept set ``S`` and pruned set ``P`` the refit is

    w_S = ŵ_S + H_SS^{-1} H_SP ŵ_P,   w_P = 0,
    loss = ŵ_P^T (H_PP - H_PS H_SS^{-1} H_SP) ŵ_P,

with the loss convention of the library, ``(w - ŵ)^T H (w - ŵ)`` per row. All rows share ``H``,
so the 1296 Schur complements are computed once (batched 8x8 solves) and every row's 1296 losses
are one batched quadratic form.

Each method (magnitude, Wanda, SparseGPT, the prox pruner with the paper's settings, the same with
momentum 0.9, the library's ``fast`` recipe and its default, ``RECIPES["default"]``) is run through
:func:`prox24_lightning.solvers.prune_weight`, and scored three ways per row:

* ``hits``: its mask is the optimal mask;
* excess of the *exact refit on its mask* over the optimal refit (the mask quality);
* excess of its weights *as returned*, without refinement and after its masked refinement ("+GD").

Usage::

    python tools/toy_experiment.py --rows 40 --samples 256 --seed 0 1 2 --out docs/toy_experiment.png
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import FeatureSpec, correlated_features, markdown_table, recipe, set_threads
from torch import Tensor

from prox24_lightning.solvers import prune_weight

__all__ = [
    "D_IN",
    "METHOD_SPECS",
    "all_masks",
    "combine",
    "format_table",
    "main",
    "make_problem",
    "mask_index",
    "plot",
    "refit_losses",
    "refit_weights",
    "run_toy",
]

D_IN = 16
_PAIRS: tuple[tuple[int, int], ...] = tuple(itertools.combinations(range(4), 2))

#: ``name -> (prune_weight method, kwargs of the refined run)``. The unrefined run uses the same
#: kwargs with ``refine_steps=0``. Baselines get the paper's "+GD" (1000 masked gradient steps).
METHOD_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "magnitude": ("magnitude", dict(refine="gd", refine_steps=1000)),
    "wanda": ("wanda", dict(refine="gd", refine_steps=1000)),
    "sparsegpt": ("sparsegpt", dict(refine="gd", refine_steps=1000)),
    "prox (paper)": ("prox", recipe("paper")),
    "prox (paper, momentum 0.9)": ("prox", recipe("paper", momentum=0.9)),
    "prox (fast recipe)": ("prox", recipe("fast")),
    "prox (default)": ("prox", recipe("default")),
}


def all_masks(d_in: int = D_IN) -> Tensor:
    """All 2:4 masks of a row of ``d_in`` inputs, ``[6^(d_in/4), d_in]`` bool.

    Mask ``m`` has base-6 digits (most significant = first group) indexing :data:`_PAIRS`, the
    kept pair of each group; :func:`mask_index` inverts this.
    """
    groups = d_in // 4
    rows = []
    for choice in itertools.product(range(len(_PAIRS)), repeat=groups):
        m = torch.zeros(d_in, dtype=torch.bool)
        for g, c in enumerate(choice):
            a, b = _PAIRS[c]
            m[4 * g + a] = m[4 * g + b] = True
        rows.append(m)
    return torch.stack(rows)


def mask_index(mask: Tensor) -> Tensor:
    """Index into :func:`all_masks` of every row of an exactly-2:4 ``mask`` ``[rows, d_in]``."""
    bits = mask.reshape(mask.shape[0], -1, 4).long()
    if not bool((bits.sum(-1) == 2).all()):
        raise ValueError("every group must keep exactly two entries")
    # Pattern bits -> pair id: a 16-entry lookup table over the 4-bit group pattern.
    lut = torch.full((16,), -1, dtype=torch.long)
    for i, (a, b) in enumerate(_PAIRS):
        lut[(1 << a) | (1 << b)] = i
    codes = lut[(bits * torch.tensor([1, 2, 4, 8])).sum(-1)]
    weights = len(_PAIRS) ** torch.arange(codes.shape[1] - 1, -1, -1)
    return (codes * weights).sum(-1)


def refit_losses(weight: Tensor, gram: Tensor, masks: Tensor) -> Tensor:
    """Exact refit loss of every row for every mask, ``[rows, n_masks]`` (float64).

    Uses the Schur complement ``H_PP - H_PS H_SS^{-1} H_SP`` of each mask, shared by all rows.
    """
    h = gram.to(torch.float64)
    w = weight.to(torch.float64)
    idx = torch.arange(masks.shape[1])
    keep = torch.stack([idx[m] for m in masks])  # [M, k]
    drop = torch.stack([idx[~m] for m in masks])  # [M, p]
    h_ss = h[keep[:, :, None], keep[:, None, :]]
    h_sp = h[keep[:, :, None], drop[:, None, :]]
    h_pp = h[drop[:, :, None], drop[:, None, :]]
    # Cholesky solves: H_SS is a principal block of a PD matrix, hence PD.
    chol = torch.linalg.cholesky(h_ss)
    schur = h_pp - h_sp.transpose(1, 2) @ torch.cholesky_solve(h_sp, chol)
    w_p = w[:, drop]  # [rows, M, p]
    return torch.einsum("rmi,mij,rmj->rm", w_p, schur, w_p)


def refit_weights(weight: Tensor, gram: Tensor, mask: Tensor) -> Tensor:
    """Per-row exact refit ``w_S = ŵ_S + H_SS^{-1} H_SP ŵ_P`` on ``mask`` (float64; for checks)."""
    h = gram.to(torch.float64)
    out = torch.zeros(weight.shape, dtype=torch.float64)
    for r in range(weight.shape[0]):
        w = weight[r].to(torch.float64)
        s, p = mask[r], ~mask[r]
        out[r, s] = w[s] + torch.linalg.solve(h[s][:, s], h[s][:, p] @ w[p])
    return out


def _row_losses(w: Tensor, w0: Tensor, gram: Tensor) -> Tensor:
    """``(w_r - ŵ_r)^T H (w_r - ŵ_r)`` for every row, float64."""
    d = w.to(torch.float64) - w0.to(torch.float64)
    return ((d @ gram.to(torch.float64)) * d).sum(-1)


def make_problem(rows: int, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """The toy layer: dense rows ``Ŵ`` ``[rows, 16]`` and ``H = X^T X`` from ``samples`` inputs.

    Weights are i.i.d. ``N(0, 1/d_in)`` (the usual initialisation scale); the features come from
    :func:`_common.correlated_features` with its default :class:`FeatureSpec`.
    """
    gen = torch.Generator().manual_seed(seed)
    x = correlated_features(samples, D_IN, gen, FeatureSpec())
    w = torch.randn(rows, D_IN, generator=gen, dtype=torch.float64) / D_IN**0.5
    return w, x.T @ x


def _pct(loss: Tensor, opt: Tensor) -> Tensor:
    return 100.0 * (loss - opt) / opt


def run_toy(
    rows: int = 40, samples: int = 256, seed: int = 0, methods: list[str] | None = None
) -> dict[str, Any]:
    """Run every method on one seeded toy layer and score it against the enumerated optimum.

    Args:
        rows: number of dense rows (independent 16-input problems sharing ``H``).
        samples: calibration samples behind ``H``.
        seed: seed of the data generator.
        methods: subset of :data:`METHOD_SPECS` (default: all).

    Returns:
        ``{"config", "optimal_loss", "methods"}`` where ``methods[name]`` holds the summary numbers
        (``hits``, ``rows``, ``mean_/median_excess_refit_pct``, ``total_excess_refit_pct``,
        ``mean_excess_raw_pct``, ``mean_excess_refined_pct``, ``iterations_to_2of4``, ``seconds``)
        and per-row lists (``excess_refit_pct``, ``excess_raw_pct``, ``excess_refined_pct``,
        ``refit_loss``, ``raw_loss``, ``refined_loss``, ``hit``).
    """
    w0, h = make_problem(rows, samples, seed)
    masks = all_masks()
    table = refit_losses(w0, h, masks)
    opt_loss, opt_idx = table.min(dim=1)
    w32, h32 = w0.float(), h.float()
    # One untimed call first: the first prune_weight of a process pays lazy imports (~1 s).
    prune_weight(w32, h32, "wanda", refine_steps=1)
    out: dict[str, Any] = {
        "config": dict(
            rows=rows, samples=samples, seed=seed, d_in=D_IN, features=vars(FeatureSpec())
        ),
        "optimal_loss": opt_loss.tolist(),
        "methods": {},
    }
    for name in methods or list(METHOD_SPECS):
        method, kwargs = METHOD_SPECS[name]
        start = time.perf_counter()
        raw = prune_weight(w32, h32, method, **dict(kwargs, refine_steps=0))
        refined = prune_weight(w32, h32, method, **kwargs)
        seconds = time.perf_counter() - start
        # The method phase is deterministic, so both runs share the mask; check rather than assume.
        if not torch.equal(raw.mask, refined.mask):
            raise AssertionError(f"{name}: refined run chose a different mask")
        idx = mask_index(refined.mask)
        refit = table.gather(1, idx[:, None]).squeeze(1)
        raw_loss = _row_losses(raw.weight, w0, h)
        refined_loss = _row_losses(refined.weight, w0, h)
        hit = idx == opt_idx
        ex_refit = _pct(refit, opt_loss)
        out["methods"][name] = dict(
            hits=int(hit.sum()),
            rows=rows,
            mean_excess_refit_pct=float(ex_refit.mean()),
            median_excess_refit_pct=float(ex_refit.median()),
            total_excess_refit_pct=float(_pct(refit.sum(), opt_loss.sum())),
            mean_excess_raw_pct=float(_pct(raw_loss, opt_loss).mean()),
            mean_excess_refined_pct=float(_pct(refined_loss, opt_loss).mean()),
            iterations_to_2of4=refined.stats.iterations_to_2of4,
            refine=f"{kwargs['refine']} x{kwargs['refine_steps']}",
            seconds=seconds,
            hit=hit.tolist(),
            refit_loss=refit.tolist(),
            raw_loss=raw_loss.tolist(),
            refined_loss=refined_loss.tolist(),
            excess_refit_pct=ex_refit.tolist(),
            excess_raw_pct=_pct(raw_loss, opt_loss).tolist(),
            excess_refined_pct=_pct(refined_loss, opt_loss).tolist(),
        )
    return out


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the rows of several :func:`run_toy` results (e.g. seeds) into one summary."""
    if len(results) == 1:
        return results[0]
    pooled: dict[str, Any] = {
        "config": dict(results[0]["config"], seed=[r["config"]["seed"] for r in results]),
        "optimal_loss": sum((r["optimal_loss"] for r in results), []),
        "methods": {},
    }
    for name in results[0]["methods"]:
        per = [r["methods"][name] for r in results]
        cat = {k: sum((p[k] for p in per), []) for k in per[0] if isinstance(per[0][k], list)}
        opt = torch.tensor(pooled["optimal_loss"])
        ex_refit = torch.tensor(cat["excess_refit_pct"])
        pooled["methods"][name] = dict(
            cat,
            hits=sum(p["hits"] for p in per),
            rows=sum(p["rows"] for p in per),
            mean_excess_refit_pct=float(ex_refit.mean()),
            median_excess_refit_pct=float(ex_refit.median()),
            total_excess_refit_pct=float(_pct(torch.tensor(cat["refit_loss"]).sum(), opt.sum())),
            mean_excess_raw_pct=float(torch.tensor(cat["excess_raw_pct"]).mean()),
            mean_excess_refined_pct=float(torch.tensor(cat["excess_refined_pct"]).mean()),
            iterations_to_2of4=max(p["iterations_to_2of4"] for p in per),
            iterations_range=(
                min(p["iterations_to_2of4"] for p in per),
                max(p["iterations_to_2of4"] for p in per),
            ),
            refine=per[0]["refine"],
            seconds=sum(p["seconds"] for p in per),
        )
    return pooled


def _iters(m: dict[str, Any]) -> str:
    """Prox iterations to 2:4; a min-max range when several seeds are pooled."""
    if not m["iterations_to_2of4"]:
        return "-"
    lo, hi = m.get("iterations_range", (m["iterations_to_2of4"],) * 2)
    return str(hi) if lo == hi else f"{lo}-{hi}"


def format_table(result: dict[str, Any]) -> str:
    """The summary of :func:`run_toy` (or :func:`combine`) as a Markdown table."""
    headers = [
        "method",
        "optimal mask",
        "mean excess, refit on mask",
        "median excess, refit",
        "total-loss excess, refit",
        "mean excess, as returned (no refine)",
        "mean excess, as returned (+refine)",
        "refine",
        "prox iters",
        "seconds",
    ]
    rows = []
    for name, m in result["methods"].items():
        rows.append(
            [
                name,
                f"{m['hits']}/{m['rows']}",
                f"{m['mean_excess_refit_pct']:.3g}%",
                f"{m['median_excess_refit_pct']:.3g}%",
                f"{m['total_excess_refit_pct']:.3g}%",
                f"{m['mean_excess_raw_pct']:.3g}%",
                f"{m['mean_excess_refined_pct']:.3g}%",
                m["refine"],
                _iters(m),
                f"{m['seconds']:.1f}",
            ]
        )
    return markdown_table(headers, rows)


def plot(result: dict[str, Any], path: Path) -> None:
    """Bar chart of optimal-mask hits and strip plot of per-row refit excess, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    ms = [result["methods"][n] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    pos = range(len(names))
    bars = ax1.bar(pos, [100.0 * m["hits"] / m["rows"] for m in ms], color="tab:blue")
    ax1.bar_label(bars, labels=[f"{m['hits']}/{m['rows']}" for m in ms], padding=2)
    ax1.set_xticks(list(pos), names, rotation=30, ha="right")
    ax1.set_ylabel("rows with the optimal mask (%)")
    ax1.set_ylim(0, 100)
    ax1.set_title("Optimal-mask hits")
    gen = torch.Generator().manual_seed(0)
    # The excess spans 0 (hits) to hundreds of %, so a symmetric log axis keeps zeros visible.
    for i, m in enumerate(ms):
        ex = torch.tensor(m["excess_refit_pct"])
        jitter = 0.15 * (2 * torch.rand(ex.numel(), generator=gen) - 1)
        ax2.scatter(i + jitter, ex, s=8, alpha=0.5, color="tab:gray")
        ax2.scatter([i], [m["mean_excess_refit_pct"]], marker="D", color="tab:red", zorder=3)
    ax2.set_yscale("symlog", linthresh=0.01)
    ax2.set_xticks(list(pos), names, rotation=30, ha="right")
    ax2.set_ylabel("excess loss of refit on mask over optimum (%)")
    ax2.set_title("Per-row excess (dots) and mean (red)")
    cfg = result["config"]
    fig.suptitle(
        f"2:4 toy, d_in={cfg['d_in']}, rows/seed={cfg['rows']}, samples={cfg['samples']}, "
        f"seed={cfg['seed']}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns the (pooled) result."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=40, help="dense rows per seed")
    ap.add_argument("--samples", type=int, default=256, help="calibration samples behind H")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more data seeds")
    ap.add_argument("--out", type=Path, default=Path("docs/toy_experiment.png"), help="PNG path")
    ap.add_argument("--methods", nargs="+", choices=list(METHOD_SPECS), default=None)
    # Tiny matrices gain nothing from threads and lose a lot to contention on a shared machine.
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    results = []
    for seed in args.seed:
        res = run_toy(args.rows, args.samples, seed, args.methods)
        results.append(res)
        if len(args.seed) > 1:
            print(f"\n### seed {seed} ({args.rows} rows, {args.samples} samples)\n")
            print(format_table(res))
    pooled = combine(results)
    title = "all seeds pooled" if len(args.seed) > 1 else f"seed {args.seed[0]}"
    print(f"\n### {title} ({len(pooled['optimal_loss'])} rows, {args.samples} samples)\n")
    print(format_table(pooled))
    plot(pooled, args.out)
    print(f"\nplot written to {args.out}")
    return pooled


if __name__ == "__main__":
    main(sys.argv[1:])
