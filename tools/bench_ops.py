"""Benchmarks of the 2:4 proximal operator and of the per-layer solver.

(a) Prox throughput. ``prox_2of4`` on a ``size x size`` fp32 matrix (default 4096x4096, 4M groups)
    against ONE ``torch.sort(x.view(-1, 4).abs(), dim=-1)`` of the same groups, best of
    ``--repeats``. Inputs:

    * ``gaussian``: i.i.d. ``N(0, 1)`` entries with ``tau`` chosen (bisection on a sample) so that
      about 10% / 50% / 90% of the output groups are 2:4;
    * ``alg2``: the prox inputs ``W - (W H̃ - Ŵ̃ H̃)/L`` and ``tau = lambda_k / L`` that Algorithm 2
      actually produces on a synthetic correlated layer, captured at the first iterations whose
      output has >= 10% / 50% / 90% 2:4 groups, then tiled to the full size. These are the
      realistic inputs: most groups sit close to a previous prox output, many near the
      2-vs-3-support bifurcation where the coordinate solver is slowest.

    The issue's bar is ``prox time / sort time <= 10``; PASS/FAIL is printed per case.

(b) Solver cost per layer for the linear-layer shapes of a 7B Llama (q/k/v/o 4096x4096, gate/up
    11008x4096, down 4096x11008), every dimension scaled by ``--scale`` (rounded to multiples of
    4) so that a CPU solves them in minutes. Synthetic layer: ``W ~ N(0, 1/d_in)`` and
    ``H = X^T X`` from ``4 d_in`` correlated, heavy-tailed samples (``_common.correlated_features``).
    ``prune_weight(..., "prox")`` runs with the ``paper`` and ``fast`` recipes; Wanda and
    SparseGPT with a converged CG refit are printed as reference losses.

    Caveat: by the regularizer's cubic homogeneity, the number of prox iterations depends on the
    scale of the normalised weights ``W_ij sqrt(H_jj)``, i.e. on the weight scale and, unless
    ``prune_weight`` is given ``n_tokens`` (then the Gram is taken to the paper's 2^21 tokens),
    on the number of calibration tokens, so iteration counts of a real model differ.

Usage::

    python tools/bench_ops.py                     # full: 4096^2 prox, layers at 1/8 scale
    python tools/bench_ops.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import (
    FeatureSpec,
    best_time,
    correlated_features,
    markdown_table,
    recipe,
    round_to_multiple,
    set_threads,
)
from torch import Tensor

from prox24_lightning.ops import frac_groups_2of4, lipschitz, normalize, prox_2of4
from prox24_lightning.optim.prox24 import LocalProblem, Prox24
from prox24_lightning.solvers import prune_weight

__all__ = [
    "LLAMA_7B_SHAPES",
    "bench_prox",
    "bench_solver",
    "capture_alg2_inputs",
    "layer_shapes",
    "synthetic_layer",
    "tau_for_fraction",
    "main",
]

#: ``(name, d_out, d_in)`` of the distinct linear-layer shapes of Llama(-2)-7B.
LLAMA_7B_SHAPES: tuple[tuple[str, int, int], ...] = (
    ("q/k/v/o_proj", 4096, 4096),
    ("gate/up_proj", 11008, 4096),
    ("down_proj", 4096, 11008),
)
RATIO_BAR = 10.0
TARGET_FRACTIONS = (0.1, 0.5, 0.9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_layer(
    d_out: int, d_in: int, seed: int, *, tokens_per_input: int = 4, device: str = "cpu"
) -> tuple[Tensor, Tensor]:
    """A dense ``W ~ N(0, 1/d_in)`` ``[d_out, d_in]`` and ``H = X^T X`` (fp32) of correlated inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = correlated_features(tokens_per_input * d_in, d_in, gen, FeatureSpec())
    w = torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in)
    return w.to(device), (x.T @ x).float().to(device)


def tau_for_fraction(z: Tensor, target: float, *, iters: int = 20) -> tuple[float, float]:
    """``tau`` such that about ``target`` of the groups of ``prox_2of4(z, tau)`` are 2:4.

    Bisection on ``log tau`` (the fraction grows with ``tau``). Returns ``(tau, fraction)``.
    """
    lo, hi = math.log(1e-4), math.log(1e2)
    best = (math.exp(hi), 1.0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        frac = frac_groups_2of4(prox_2of4(z, math.exp(mid)))
        if abs(frac - target) < abs(best[1] - target):
            best = (math.exp(mid), frac)
        if frac < target:
            lo = mid
        else:
            hi = mid
    return best


def capture_alg2_inputs(
    d_out: int,
    d_in: int,
    seed: int,
    targets: tuple[float, ...] = TARGET_FRACTIONS,
    *,
    lambda0: float | None = None,
    beta: float | None = None,
    max_iters: int = 5000,
) -> list[dict[str, Any]]:
    """Run Algorithm 2 (plain proximal gradient, :class:`Prox24`) on a synthetic layer and keep the
    prox input of the first iteration whose output reaches each target fraction of 2:4 groups.
    ``lambda0``/``beta`` default to the paper recipe.

    Returns a list of ``{"target", "z" [d_out, d_in] (normalised coords), "tau", "iteration",
    "fraction"}``.
    """
    paper = recipe("paper")
    lambda0 = paper["lambda0"] if lambda0 is None else lambda0
    beta = paper["beta"] if beta is None else beta
    w, h = synthetic_layer(d_out, d_in, seed)
    norm = normalize(h)
    target_w = norm.to_normalized(w)
    problem = LocalProblem(gram=norm.gram, target=target_w, lipschitz=lipschitz(norm.gram))
    opt = Prox24(lambda0=lambda0, beta=beta, refine_steps=0, max_prox_steps=max_iters)
    work = opt.add_layer("layer", problem)
    inv_l = 1.0 / problem.lipschitz
    pending = sorted(targets)
    captured: list[dict[str, Any]] = []
    while pending and opt.phase("layer") == "prox":
        k = opt.layer_state("layer")["prox_steps"]
        # The exact input and tau of this iteration's prox (momentum 0, so no extrapolation).
        z = work - inv_l * problem.gradient(work)
        tau = lambda0 * beta**k * inv_l
        opt.step()
        frac = opt.layer_state("layer")["frac_2of4"]
        while pending and frac >= pending[0]:
            captured.append(dict(target=pending.pop(0), z=z, tau=tau, iteration=k, fraction=frac))
    return captured


def _tile(z: Tensor, rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """``z`` repeated to ``[rows, cols]`` with its groups of 4 randomly shuffled.

    The shuffle matters: a periodic input lets the CPU's branch predictor learn the sort network
    of a few thousand repeated groups, which made the plain sort ~3x faster than on real data.
    """
    reps = (math.ceil(rows / z.shape[0]), math.ceil(cols / z.shape[1]))
    groups = z.repeat(*reps)[:rows, :cols].reshape(-1, 4)
    perm = torch.randperm(groups.shape[0], generator=generator)
    return groups[perm].reshape(rows, cols).contiguous()


def bench_prox(
    size: int = 4096,
    *,
    repeats: int = 3,
    seed: int = 0,
    device: str = "cpu",
    capture_shape: tuple[int, int] = (128, 512),
    gaussian_targets: tuple[float, ...] = TARGET_FRACTIONS,
    alg2_targets: tuple[float, ...] = TARGET_FRACTIONS,
) -> list[dict[str, Any]]:
    """Time ``prox_2of4`` against one ``torch.sort`` of the same groups (see module docstring).

    Returns one dict per input case with ``case``, ``tau``, ``frac_2of4`` (of the output),
    ``prox_s``, ``sort_s``, ``groups_per_s``, ``ratio`` and ``pass``.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    cases: list[tuple[str, Tensor, float]] = []
    gauss = torch.randn(size, size, generator=gen)
    # The bisection runs on a slice of rows (same distribution) to keep it cheap.
    sample = gauss[: max(1, min(size, 16384 * 4 // size))].to(dev)
    for t in gaussian_targets:
        tau, _ = tau_for_fraction(sample, t)
        cases.append((f"gaussian, ~{t:.0%} 2:4", gauss, tau))
    if alg2_targets:
        for cap in capture_alg2_inputs(*capture_shape, seed, alg2_targets):
            label = f"alg2 state, iter {cap['iteration']}, >={cap['target']:.0%} 2:4"
            cases.append((label, _tile(cap["z"], size, size, gen), cap["tau"]))
    results = []
    n_groups = size * size // 4
    for label, z, tau in cases:
        x = z.to(dev)
        frac = frac_groups_2of4(prox_2of4(x, tau))
        t_prox = best_time(lambda x=x, tau=tau: prox_2of4(x, tau), repeats, sync=lambda: _sync(dev))
        t_sort = best_time(
            lambda x=x: torch.sort(x.view(-1, 4).abs(), dim=-1), repeats, sync=lambda: _sync(dev)
        )
        ratio = t_prox / t_sort
        results.append(
            dict(
                case=label,
                size=size,
                groups=n_groups,
                tau=tau,
                frac_2of4=frac,
                prox_s=t_prox,
                sort_s=t_sort,
                groups_per_s=n_groups / t_prox,
                ratio=ratio,
                passed=ratio <= RATIO_BAR,
            )
        )
        del x
    return results


def layer_shapes(scale: float) -> list[tuple[str, int, int]]:
    """:data:`LLAMA_7B_SHAPES` with both dimensions scaled and rounded to multiples of 4."""
    return [
        (n, round_to_multiple(o * scale), round_to_multiple(i * scale))
        for n, o, i in LLAMA_7B_SHAPES
    ]


def bench_solver(
    scale: float = 1 / 8,
    *,
    recipes: tuple[str, ...] = ("paper", "fast"),
    references: tuple[str, ...] = ("wanda", "sparsegpt"),
    reference_cg_steps: int = 50,
    seed: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``prune_weight`` on the scaled 7B layer shapes; one dict per (layer, method) run.

    ``log`` (e.g. ``print`` to stderr) receives one line per finished run, since the full-size
    table can take many minutes on a CPU.

    References (``wanda``/``sparsegpt`` followed by ``reference_cg_steps`` CG steps, i.e. their
    converged masked refit) give the local loss to compare against; ``loss_vs_wanda`` is the
    ratio to the Wanda+refit loss of the same layer.
    """
    out = []
    for li, (name, d_out, d_in) in enumerate(layer_shapes(scale)):
        w, h = synthetic_layer(d_out, d_in, seed + li, device=device)
        runs: list[tuple[str, str, dict[str, Any]]] = [
            (f"{m} + CG refit", m, dict(refine="cg", refine_steps=reference_cg_steps))
            for m in references
        ]
        runs += [(f"prox ({r} recipe)", "prox", recipe(r)) for r in recipes]
        layer_rows = []
        for label, method, kwargs in runs:
            res = prune_weight(w, h, method, **kwargs)
            st = res.stats
            layer_rows.append(
                dict(
                    layer=name,
                    shape=f"{d_out}x{d_in}",
                    run=label,
                    iterations_to_2of4=st.iterations_to_2of4,
                    refine=f"{kwargs['refine']} x{kwargs['refine_steps']}",
                    gemms=st.gemms,
                    seconds=st.seconds,
                    loss_method=st.loss_method,
                    loss_final=st.loss_final,
                    forced_2of4=st.forced_2of4,
                )
            )
            if log is not None:
                log(f"{name} {d_out}x{d_in} {label}: {st.seconds:.1f} s, {st.gemms} GEMMs")
        ref = next((r["loss_final"] for r in layer_rows if r["run"].startswith("wanda")), None)
        for r in layer_rows:
            r["loss_vs_wanda"] = r["loss_final"] / ref if ref else float("nan")
        out += layer_rows
    return out


def format_prox_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`bench_prox` results."""
    return markdown_table(
        [
            "input",
            "tau",
            "2:4 groups out",
            "prox (s)",
            "sort (s)",
            "Mgroups/s",
            "prox/sort",
            f"<= {RATIO_BAR:g}",
        ],
        [
            [
                r["case"],
                f"{r['tau']:.3g}",
                f"{r['frac_2of4']:.1%}",
                f"{r['prox_s']:.3f}",
                f"{r['sort_s']:.3f}",
                f"{r['groups_per_s'] / 1e6:.2f}",
                f"{r['ratio']:.1f}",
                "PASS" if r["passed"] else "FAIL",
            ]
            for r in rows
        ],
    )


def format_solver_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`bench_solver` results (with a footnote for early-ended prox)."""
    table = markdown_table(
        [
            "layer",
            "shape",
            "run",
            "iters to 2:4",
            "refine",
            "GEMMs",
            "seconds",
            "local loss",
            "loss / Wanda+refit",
        ],
        [
            [
                r["layer"],
                r["shape"],
                r["run"],
                (str(r["iterations_to_2of4"]) + (" *" if r["forced_2of4"] else ""))
                if r["iterations_to_2of4"]
                else "-",
                r["refine"],
                str(r["gemms"]),
                f"{r['seconds']:.1f}",
                f"{r['loss_final']:.4g}",
                f"{r['loss_vs_wanda']:.3f}",
            ]
            for r in rows
        ],
    )
    if any(r["forced_2of4"] for r in rows):
        table += (
            "\n\n\\* the prox phase ended before every group was 2:4 (the recipe's `switch_at`"
            " or the `max_prox_steps` cap); the remaining groups kept their two largest entries."
        )
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns everything that ``--json`` would save."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--size", type=int, default=None, help="prox matrix side (default 4096; quick 1024)"
    )
    ap.add_argument(
        "--scale", type=float, default=None, help="7B layer scale (default 1/8; quick 1/32)"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (default 3; quick 2)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (on an oversubscribed machine 1 can be much faster)",
    )
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-prox", action="store_true", help="skip part (a)")
    ap.add_argument("--skip-solver", action="store_true", help="skip part (b)")
    ap.add_argument("--json", type=Path, default=None, help="save the results here")
    args = ap.parse_args(argv)
    size = args.size or (1024 if args.quick else 4096)
    scale = args.scale or (1 / 32 if args.quick else 1 / 8)
    repeats = args.repeats or (2 if args.quick else 3)
    threads = set_threads(args.threads)
    result: dict[str, Any] = dict(
        config=dict(
            size=size,
            scale=scale,
            repeats=repeats,
            threads=threads,
            device=args.device,
            seed=args.seed,
            torch=torch.__version__,
        )
    )
    print(f"torch {torch.__version__}, device {args.device}, {threads} threads", flush=True)
    if not args.skip_prox:
        print(
            f"\n### (a) prox_2of4 throughput, {size}x{size} fp32 ({size * size // 4:,} groups), best of {repeats}\n",
            flush=True,
        )
        result["prox"] = bench_prox(size, repeats=repeats, seed=args.seed, device=args.device)
        print(format_prox_table(result["prox"]), flush=True)
        n_pass = sum(r["passed"] for r in result["prox"])
        print(
            f"\nprox/sort <= {RATIO_BAR:g}: {n_pass}/{len(result['prox'])} cases PASS", flush=True
        )
    if not args.skip_solver:
        print(f"\n### (b) solver per layer, Llama-7B shapes x {scale:g}\n", flush=True)
        result["solver"] = bench_solver(
            scale,
            seed=args.seed,
            device=args.device,
            log=lambda msg: print(f"  done: {msg}", file=sys.stderr, flush=True),
        )
        print(format_solver_table(result["solver"]), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nresults saved to {args.json}", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
