"""GPU check: the solver on a Llama-2-7B-shaped block, a bf16 fit, offload and the 2:4 kernel.

Runs anywhere from a checkout (``tools/gpu_check.sh`` puts the repository root on
``PYTHONPATH``; no packaged model, no network) and prints **one table** at the end. Every part
runs in its own process with its own timeout, writes what it reached as it goes, and a part that
fails or times out makes the exit status non-zero (the table says which and how far it got):

``methods`` (what users run)
    The default prox solver (``RECIPES["default"]``), ALPS and SparseGPT on a Llama-2-7B-shaped
    block (the Grams of ``block``) and on Llama-2-70B's down_proj shape (8192 x 28672, 2^16
    tokens), layer by layer as ``prune_weight`` runs them: time, peak memory of each method on
    its own, ADMM iterations and the summed local loss relative to SparseGPT + 50 CG steps.
``block`` (Llama-2-7B shapes: d 4096, MLP 11008; q/k/v/o, gate/up, down)
    Grams of the four distinct layer inputs from correlated synthetic activations with an
    LLM-like spectrum (power-law factor variances, log-normal feature scales, a few massive
    outlier features), accumulated in IEEE fp32 over the paper's 2^21 tokens; one prox-phase
    iteration of the whole block split into GEMM / prox / host sync (the compiled
    :func:`~prox24_lightning.optim.functional.prox_phase_step`, timed without and with a read
    after every iteration); the ``fast`` recipe solved to the end in one ``Prox24`` like the
    pipeline (iterations, prox and refinement time); the ``paper`` recipe with an iteration cap
    and its extrapolated full time; Wanda and SparseGPT on the same block; peak memory.
``fit``
    ``prox24 fit`` of a tiny random Llama with ``--trainer.precision bf16-true`` on CUDA, then
    ``prox24 check`` of its export.
``offload``
    ``pytest -m gpu tests/test_offload.py`` (the CUDA onload test).
``sparse``
    A Wanda-pruned 4096x11008 layer through ``torch.sparse.to_sparse_semi_structured`` against
    the dense bf16 matmul (time, speedup, max difference).

The GPU budget is about 8 minutes in all (the sum of the default timeouts, 460 s, plus process
start-up). ``--dry-run`` runs the same parts on the CPU with every shape divided by 32, 2048 calibration
tokens and the fast recipe capped at 30 prox iterations; the prox phase runs eagerly there (a CPU user's path) after one full-graph
trace of the step with the ``eager`` backend. ``tests/test_gpu_check.py`` runs it in CI.

    tools/gpu_check.sh                 # on a CUDA machine
    tools/gpu_check.sh --dry-run       # anywhere, ~1-2 minutes
    tools/gpu_check.sh --parts block sparse --timeout block=400
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("methods", "block", "fit", "offload", "sparse")
#: Seconds per part on a GPU (sum 460 s: the 8-minute budget with room for start-up).
TIMEOUTS = {"methods": 170, "block": 170, "fit": 60, "offload": 35, "sparse": 25}
#: Seconds per part in the dry run (the CI test allows 180 s in all).
DRY_TIMEOUTS = {"methods": 60, "block": 90, "fit": 60, "offload": 60, "sparse": 30}


@dataclass(frozen=True)
class Scale:
    """Shapes and caps of one run."""

    d: int
    mlp: int
    tokens: int
    chunk: int
    paper_prox_cap: int
    paper_gd_cap: int
    reps: int
    sparse_tokens: int
    #: cap on the fast recipe's prox iterations (``None``: run it to the end).
    fast_prox_cap: int | None = None
    #: Llama-2-70B's down_proj (``d_out x d_in``) and its calibration tokens (``methods``).
    wide: tuple[int, int] = (8192, 28672)
    wide_tokens: int = 2**16
    #: calibration sequence length: tokens are handed to the Gram as ``[-1, seqlen, d]``.
    seqlen: int = 2048


GPU_SCALE = Scale(
    d=4096, mlp=11008, tokens=2**21, chunk=2**14, paper_prox_cap=60, paper_gd_cap=60, reps=10,
    sparse_tokens=8192,
)  # fmt: skip
DRY_SCALE = Scale(
    d=128, mlp=344, tokens=2048, chunk=1024, paper_prox_cap=8, paper_gd_cap=8, reps=2,
    sparse_tokens=256, fast_prox_cap=30, wide=(256, 896), wide_tokens=2048, seqlen=256,
)  # fmt: skip


# ------------------------------------------------------------------------------------- records
class Reporter:
    """Appends one JSON line per measured item to a file (flushed: a killed part keeps them)."""

    def __init__(self, path: Path, part: str) -> None:
        self.path, self.part = path, part

    def __call__(self, item: str, value: str, status: str = "ok") -> None:
        rec = {"part": self.part, "item": item, "value": value, "status": status}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"  [{self.part}] {item}: {value}" + ("" if status == "ok" else f" ({status})"),
              flush=True)  # fmt: skip


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.1f} s"


# --------------------------------------------------------------------------- synthetic block
def llm_like_chunks(
    d: int, tokens: int, chunk: int, seed: int, device: Any, token_seed: int | None = None
) -> Iterator[Any]:
    """Activations ``[chunk, d]`` (fp32) with an LLM-like spectrum, ``tokens`` rows in all.

    ``x = (F diag(sqrt(v)) A + 0.1 E) diag(s)``: ``k = d/4`` shared factors with power-law
    variances ``v_f ∝ 1/f`` (the decaying covariance spectrum of real hidden states), unit-norm
    mixing ``A``, isotropic noise, log-normal scales ``s`` (sigma 0.5) and four features 30x
    larger (the "massive activations"). The factors are rounded to bf16 (as a bf16 model's activations),
    the generation GEMM runs in bf16: only the Gram that follows is measured in fp32.
    ``token_seed``: draw the tokens from their own generator (the same layer's inputs on other
    text: a held-out Gram); by default they follow the factors' generator.
    """
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    k = max(1, d // 4)
    var = 1.0 / torch.arange(1, k + 1, device=device, dtype=torch.float32)
    var = var / var.sum() * 4.0
    mixing = torch.randn(k, d, generator=g, device=device) / math.sqrt(k)
    mixing = (mixing * var.sqrt()[:, None] * math.sqrt(k)).to(torch.bfloat16)
    scales = torch.exp(0.5 * torch.randn(d, generator=g, device=device))
    scales[torch.randperm(d, generator=g, device=device)[:4]] *= 30.0
    if token_seed is not None:
        g = torch.Generator(device=device).manual_seed(token_seed)
    done = 0
    while done < tokens:
        n = min(chunk, tokens - done)
        f = torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16)
        x = (f @ mixing).float() + 0.1 * torch.randn(n, d, generator=g, device=device)
        yield x * scales
        done += n


def as_sequences(x: Any, seqlen: int) -> Any:
    """A chunk of generated tokens as calibration sequences (``[-1, seqlen, d]`` where it divides,
    as the pipeline's batches), so the Gram also gets the sequences' spread (the default's ridge)."""
    if x.shape[0] % seqlen:
        return x
    return x.reshape(-1, seqlen, x.shape[-1])


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: Any, reps: int) -> float:
    """Mean seconds of ``reps`` calls after one warm-up, synchronised around (not inside)."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def _peak(device: Any) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (CPU)"


def block_problem(
    report: Reporter, scale: Scale, device: str
) -> tuple[dict[str, tuple[int, int, str]], dict[str, Any], dict[str, Any]]:
    """``(layers, grams, weights)`` of a Llama-2-7B-shaped block: ``layers`` maps a name to
    ``(d_out, d_in, input)`` (q/k/v and gate/up share their input, as in the pipeline), the
    Grams are accumulated in IEEE fp32 (timed; generation untimed), the weights are random."""
    import torch

    from prox24_lightning.ops import GramAccumulator

    d, mlp = scale.d, scale.mlp
    layers = {
        "q_proj": (d, d, "attn"), "k_proj": (d, d, "attn"), "v_proj": (d, d, "attn"),
        "o_proj": (d, d, "o"), "gate_proj": (mlp, d, "mlp"), "up_proj": (mlp, d, "mlp"),
        "down_proj": (d, mlp, "down"),
    }  # fmt: skip
    inputs = {"attn": d, "o": d, "mlp": d, "down": mlp}
    grams, t_acc, t_gen = {}, 0.0, time.perf_counter()
    spreads = {}
    for i, (name, width) in enumerate(inputs.items()):
        acc = GramAccumulator(width, device, spread=True)
        for x in llm_like_chunks(width, scale.tokens, scale.chunk, seed=i, device=device):
            _sync(device)
            t0 = time.perf_counter()
            acc.update(as_sequences(x, scale.seqlen))
            _sync(device)
            t_acc += time.perf_counter() - t0
        grams[name], spreads[name] = acc.gram, acc.spread
    t_gen = time.perf_counter() - t_gen - t_acc
    report("Gram accumulation (4 inputs, with the sequence spread)",
           f"{_fmt_s(t_acc)} (+{_fmt_s(t_gen)} generating)")  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(1)
    weights = {
        n: 0.02 * torch.randn(o, i, generator=gen, device=device) for n, (o, i, _) in layers.items()
    }
    return layers, grams, weights, spreads


def _reset_peak(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def part_methods(report: Reporter, scale: Scale, device: str, deadline: float) -> None:
    """What users run (see the module docstring): the default prox solver, ALPS and SparseGPT on
    the 7B block and on the 70B down_proj shape, each timed with its own peak memory."""
    import torch

    from prox24_lightning.ops import GramAccumulator
    from prox24_lightning.solvers import prune_weight

    methods = (
        ("sparsegpt+cg50", "sparsegpt", {"refine": "cg", "refine_steps": 50}),
        ("prox default", "prox", {}),
        ("alps", "alps", {}),
    )
    report("7B block", f"d {scale.d}, MLP {scale.mlp}, {scale.tokens:,} tokens, {device}")
    layers, grams, weights, spreads = block_problem(report, scale, device)
    losses: dict[str, float] = {}
    for label, method, config in methods:
        _reset_peak(device)
        t0, total, iterations = time.perf_counter(), 0.0, []
        for n, (_, _, inp) in layers.items():
            res = prune_weight(weights[n], grams[inp], method, config=config,
                               n_tokens=scale.tokens, spread=spreads[inp])  # fmt: skip
            total += res.stats.loss_final
            iterations.append(res.stats.iterations_to_2of4)
        _sync(device)
        losses[label] = total
        extra = f", prox iterations {min(iterations)}-{max(iterations)}" if method == "prox" else ""
        report(f"{label} (7B block)",
               f"{_fmt_s(time.perf_counter() - t0)}, peak {_peak(device)}{extra}")  # fmt: skip
    ref = losses["sparsegpt+cg50"]
    report("7B block: summed local loss / SparseGPT+CG50",
           ", ".join(f"{k} {v / ref:.3f}" for k, v in losses.items()))  # fmt: skip
    del grams, weights

    d_out, d_in = scale.wide
    acc = GramAccumulator(d_in, device, spread=True)
    for x in llm_like_chunks(d_in, scale.wide_tokens, scale.chunk, seed=7, device=device):
        acc.update(as_sequences(x, scale.seqlen))
    gram, spread = acc.gram, acc.spread
    del acc
    weight = 0.02 * torch.randn(d_out, d_in, generator=torch.Generator(device=device).manual_seed(2),
                                device=device)  # fmt: skip
    report("70B down_proj", f"{d_out} x {d_in}, {scale.wide_tokens:,} tokens")
    for label, method, config in methods:
        if time.perf_counter() > deadline - 20:
            report(f"{label} (70B down_proj)", "skipped: time budget", "partial")
            continue
        _reset_peak(device)
        t0 = time.perf_counter()
        res = prune_weight(weight, gram, method, config=config, n_tokens=scale.wide_tokens,
                           spread=spread)  # fmt: skip
        _sync(device)
        report(f"{label} (70B down_proj)",
               f"{_fmt_s(time.perf_counter() - t0)}, peak {_peak(device)}, "
               f"loss {res.stats.loss_final:.4g}")  # fmt: skip


def part_block(
    report: Reporter, scale: Scale, device: str, backend: str | None, deadline: float
) -> None:
    """The block (see the module docstring). ``backend=None``: the prox phase runs eagerly
    (the dry run: a CPU user's path) after one full-graph trace with the ``eager`` backend."""
    import torch

    from prox24_lightning.ops import matmul_precision
    from prox24_lightning.optim import Prox24
    from prox24_lightning.optim import functional as F
    from prox24_lightning.solvers import RECIPES, LayerSolve, make_config, prune_weight

    torch.manual_seed(0)
    d, mlp = scale.d, scale.mlp
    report("shapes", f"d {d}, MLP {mlp}, {scale.tokens:,} calibration tokens, {device}")
    layers, grams, weights, _ = block_problem(report, scale, device)

    def solves(config: Any) -> dict[str, LayerSolve]:
        return {
            n: LayerSolve(weights[n], grams[inp], "prox", config, n_tokens=scale.tokens)
            for n, (_, _, inp) in layers.items()
        }

    use_compile = backend is not None
    fast_cfg = make_config("prox", {"recipe": "fast", "compile": use_compile})
    if scale.fast_prox_cap is not None:
        fast_cfg = make_config("prox", fast_cfg, max_prox_steps=scale.fast_prox_cap)
    t0 = time.perf_counter()
    fast = solves(fast_cfg)
    _sync(device)
    report("setup (normalise, L by power iteration; 7 layers)", _fmt_s(time.perf_counter() - t0))

    # -- One prox iteration of the block, split, with the optimizer's compiled step on the
    # layers' own settings (the step is pure: the solve below starts from the same state).
    opt = Prox24()
    opt.compile_backend = backend or "eager"
    for n, s in fast.items():
        s.attach(opt, n)
    step = F.compiled_prox_phase_step(backend) if use_compile else F.prox_phase_step
    bench = []
    for group in opt.param_groups:
        if group["name"] in fast:
            prob = opt.problems[group["name"]]
            w = group["params"][0]
            const = F.ProxPhaseConstants.create(
                device, lipschitz=prob.lipschitz, **{k: group[k] for k in F.SETTINGS}
            )
            bench.append((w, prob, F.ProxPhaseState.create(device, step=100), const))

    def block_step(read: bool) -> None:
        for w, prob, state, const in bench:
            out = step(w, w, prob.target, prob.gram, state, const, momentum=True, tail=True)
            if read:
                out[2].values()  # what the optimizer reads back every check_every iterations

    def block_gemm() -> None:
        for w, prob, _, _ in bench:
            _ = (w - prob.target) @ prob.gram

    t0 = time.perf_counter()
    if use_compile:
        report("compiling the prox step", f"{backend}, dynamic shapes (the first call)", "started")
        block_step(False)  # compiles: one graph with dynamic shapes for every layer
        _sync(device)
        report(
            f"compile of the prox step ({backend}, first call)", _fmt_s(time.perf_counter() - t0)
        )
    else:
        w, prob, state, const = bench[-1]
        traced = torch.compile(F.prox_phase_step, fullgraph=True, backend="eager")
        traced(w, w, prob.target, prob.gram, state, const, momentum=True, tail=True)
        report(
            "prox step traced whole (fullgraph, eager backend)", _fmt_s(time.perf_counter() - t0)
        )
    with matmul_precision():
        t_gemm = _timed(block_gemm, device, scale.reps)
        t_free = _timed(lambda: block_step(False), device, scale.reps)
        t_read = _timed(lambda: block_step(True), device, scale.reps)
    t_sync = max(t_read - t_free, 0.0)
    report("prox iteration: GEMM (W - Ŵ)H, 7 layers", _fmt_s(t_gemm))
    report("prox iteration: prox + schedule + 2:4 count", _fmt_s(max(t_free - t_gemm, 0.0)))
    report("prox iteration: host sync (a read after every iteration)", _fmt_s(t_sync))
    report("prox iteration: total with check_every 10", _fmt_s(t_free + t_sync / 10))
    bench.clear()

    # -- Baselines on the same block.
    losses = {}
    baselines = (("wanda", {}), ("sparsegpt", {}), ("sparsegpt+cg50", {"refine": "cg",
                 "refine_steps": 50}))  # fmt: skip
    for label, kw in baselines:
        t0 = time.perf_counter()
        total = 0.0
        for n, (_, _, inp) in layers.items():
            res_b = prune_weight(weights[n], grams[inp], label.split("+")[0],
                                 n_tokens=scale.tokens, **kw)  # fmt: skip
            total += res_b.stats.loss_final
        _sync(device)
        losses[label] = total
        report(f"{label} (block)", _fmt_s(time.perf_counter() - t0))

    # -- The paper recipe with an iteration cap (its full run is extrapolated below).
    paper_cfg = make_config(
        "prox", RECIPES["paper"], compile=use_compile, max_prox_steps=scale.paper_prox_cap,
        refine_steps=scale.paper_gd_cap,
    )  # fmt: skip
    paper = solves(paper_cfg)
    popt = Prox24()
    popt.compile_backend = backend or "eager"
    for n, s in paper.items():
        s.attach(popt, n)
    popt.step()  # warm-up (the same compiled graph as the fast recipe's)
    _sync(device)
    t0, prox_calls = time.perf_counter(), 0
    while any(popt.phase(n) == "prox" for n in paper):
        popt.step()
        prox_calls += 1
    _sync(device)
    t_prox_it = (time.perf_counter() - t0) / max(prox_calls, 1)
    t0, gd_calls = time.perf_counter(), 0
    while not all(s.done() for s in paper.values()):
        popt.step()
        gd_calls += 1
    _sync(device)
    t_gd_it = (time.perf_counter() - t0) / max(gd_calls, 1)
    report(f"paper (capped {scale.paper_prox_cap} + {scale.paper_gd_cap}): per prox / GD "
           "iteration", f"{_fmt_s(t_prox_it)} / {_fmt_s(t_gd_it)}")  # fmt: skip
    for s in paper.values():
        s.detach()
    del paper, popt

    # -- The fast recipe to the end (or the time left), all layers in one optimizer (as the
    # pipeline does); the optimizer of the split above, untouched by it.
    calls, t0, t_switch, stopped = 0, time.perf_counter(), None, False
    while not all(s.done() for s in fast.values()):
        opt.step()
        calls += 1
        for s in fast.values():
            s.observe()
        if t_switch is None and all(opt.phase(n) != "prox" for n in fast):
            _sync(device)
            t_switch = time.perf_counter() - t0
        if time.perf_counter() > deadline - 15:
            stopped = True
            break
    _sync(device)
    t_fast = time.perf_counter() - t0
    if stopped:
        report("fast recipe", f"stopped after {calls} steps, {_fmt_s(t_fast)} (time budget)",
               "partial")  # fmt: skip
        report("peak memory", _peak(device))
        return
    res = {n: s.result() for n, s in fast.items()}
    iters = max(r.stats.iterations_to_2of4 for r in res.values())
    t_switch = t_switch if t_switch is not None else t_fast
    report("fast: prox iterations to 2:4 (max over layers)", f"{iters} ({calls} steps)")
    report("fast: prox phase / CG refinement x50", f"{_fmt_s(t_switch)} / "
           f"{_fmt_s(t_fast - t_switch)}")  # fmt: skip
    report("fast: block total", _fmt_s(t_fast))
    losses["prox fast"] = sum(r.stats.loss_final for r in res.values())
    ref = losses["sparsegpt+cg50"]
    report("summed local loss / SparseGPT+CG50",
           ", ".join(f"{k} {v / ref:.3f}" for k, v in losses.items()))  # fmt: skip
    # lambda_k = 0.01 * 1.01^k of the paper recipe reaches the fast run's final lambdas (same
    # units) after about k_est iterations: an estimate, low since the fast run ends at 99.9%.
    k_est = max(math.log(max(r.stats.final_lambda, 0.01) / 0.01) / math.log(1.01)
                for r in res.values())  # fmt: skip
    k_est = max(k_est, scale.paper_prox_cap)
    full = k_est * t_prox_it + 1000 * t_gd_it
    report("paper: extrapolated full block (est. prox iterations + 1000 GD)",
           f"{_fmt_s(full)} (~{k_est:.0f} + 1000 iterations)")  # fmt: skip
    report("peak memory", _peak(device))


# ------------------------------------------------------------------------------------ others
def part_fit(report: Reporter, device: str, workdir: Path) -> None:
    import random

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import PROX_SOLVER, block_checkpoints, fit_args, random_words

    from prox24_lightning.check import check_export
    from prox24_lightning.cli import cli_main
    from prox24_lightning.testing import save_tiny_model

    model = save_tiny_model(workdir / "tiny", "llama")
    text = workdir / "train.txt"
    text.write_text(random_words(random.Random(0), 4000))
    out = workdir / "run"
    accelerator = "cuda" if device == "cuda" else "cpu"
    args = fit_args(
        model, out, text, method="prox", callbacks=block_checkpoints(out),
        **{**PROX_SOLVER, "model.solver.refine_steps": "5", "trainer.accelerator": accelerator,
           "trainer.precision": "bf16-true"},
    )  # fmt: skip
    t0 = time.perf_counter()
    cli_main(args)
    report(f"prox24 fit, tiny Llama, bf16-true on {accelerator}", _fmt_s(time.perf_counter() - t0))
    result = check_export(out / "export")
    report("prox24 check of the export", result.verdict().splitlines()[0],
           "ok" if result.ok else "FAILED")  # fmt: skip
    if not result.ok:
        raise SystemExit(1)


def part_offload(report: Reporter, device: str) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "tests/test_offload.py"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-200:]
    ok = proc.returncode == 0 and (device != "cuda" or " passed" in summary)
    report("pytest -m gpu tests/test_offload.py", summary, "ok" if ok else "FAILED")
    if not ok:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        raise SystemExit(1)


def part_sparse(report: Reporter, scale: Scale, device: str) -> None:
    import torch

    from prox24_lightning.ops import GramAccumulator, is_2of4
    from prox24_lightning.solvers import prune_weight

    d_out, d_in = scale.d, scale.mlp
    acc = GramAccumulator(d_in, device)
    for x in llm_like_chunks(d_in, 4 * scale.chunk, scale.chunk, seed=7, device=device):
        acc.update(x)
    w = 0.02 * torch.randn(d_out, d_in, device=device, generator=torch.Generator(
        device=device).manual_seed(0))  # fmt: skip
    pruned = prune_weight(w, acc.gram, "wanda").weight.to(torch.bfloat16)
    assert is_2of4(pruned)
    x = torch.randn(scale.sparse_tokens, d_in, device=device, dtype=torch.bfloat16)
    reps = 50 if device == "cuda" else 3
    t_dense = _timed(lambda: torch.nn.functional.linear(x, pruned), device, reps)
    report(f"dense bf16 linear {d_out}x{d_in}, {scale.sparse_tokens} tokens", _fmt_s(t_dense))
    if device != "cuda":
        report("to_sparse_semi_structured", "skipped (needs CUDA)", "skipped")
        return
    if torch.cuda.get_device_capability() < (8, 0):
        report("to_sparse_semi_structured", "skipped (compute capability < 8.0)", "skipped")
        return
    from torch.sparse import to_sparse_semi_structured

    sparse = to_sparse_semi_structured(pruned)
    ref = torch.nn.functional.linear(x, pruned).float()
    err = float((torch.nn.functional.linear(x, sparse).float() - ref).abs().max())
    t_sparse = _timed(lambda: torch.nn.functional.linear(x, sparse), device, reps)
    report("2:4 semi-structured linear", f"{_fmt_s(t_sparse)} (speedup {t_dense / t_sparse:.2f}x)")
    rel = err / max(float(ref.abs().max()), 1e-30)
    report("max |sparse - dense| / max |dense|", f"{rel:.2e}", "ok" if rel < 2e-2 else "FAILED")
    if rel >= 2e-2:
        raise SystemExit(1)


def run_part(part: str, args: argparse.Namespace) -> None:
    """The child process: one part, records appended to ``args.report``."""
    import torch

    torch.manual_seed(0)
    report = Reporter(Path(args.report), part)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        report("device", "no CUDA device (use --dry-run on a CPU)", "FAILED")
        raise SystemExit(1)
    if device == "cpu":
        torch.set_num_threads(1)  # small shapes on a shared CPU: threads only add contention
    scale = DRY_SCALE if args.dry_run else GPU_SCALE
    backend = None if args.dry_run else (args.compile_backend or "inductor")
    deadline = time.perf_counter() + args.part_timeout
    if args.fail == part:
        report("injected failure", "--fail " + part, "FAILED")
        raise SystemExit(1)
    if part == "methods":
        part_methods(report, scale, device, deadline)
    elif part == "block":
        part_block(report, scale, device, backend, deadline)
    elif part == "fit":
        with tempfile.TemporaryDirectory() as tmp:
            part_fit(report, device, Path(tmp))
    elif part == "offload":
        part_offload(report, device)
    elif part == "sparse":
        part_sparse(report, scale, device)


# ------------------------------------------------------------------------------ orchestrator
def _run_child(part: str, args: argparse.Namespace, report: Path, timeout: float) -> str:
    """Run one part in a fresh process group; ``"ok"``, ``"FAILED (rc N)"`` or ``"TIMEOUT"``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--report", str(report),
           "--part-timeout", str(timeout)]  # fmt: skip
    if args.dry_run:
        cmd.append("--dry-run")
    if args.compile_backend:
        cmd += ["--compile-backend", args.compile_backend]
    if args.fail:
        cmd += ["--fail", args.fail]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started
        proc.wait()
        return "TIMEOUT"
    return "ok" if rc == 0 else f"FAILED (rc {rc})"


def _table(records: list[dict[str, str]], outcome: dict[str, tuple[str, float]]) -> str:
    rows = [("part", "measure", "value", "status")]
    for part, (status, seconds) in outcome.items():
        mine = [r for r in records if r["part"] == part]
        for r in mine:
            rows.append((part, r["item"], r["value"], r["status"]))
        rows.append((part, "part finished", f"{status} after {seconds:.0f} s",
                     "ok" if status == "ok" else status))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in rows]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, shapes / 32 (fast)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS",
                    help="override a part's timeout")  # fmt: skip
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of the prox phase on the GPU (default inductor; "
                    "the dry run traces once with eager and runs eagerly)")  # fmt: skip
    ap.add_argument("--fail", default=None, help=argparse.SUPPRESS)  # tests: a failing part
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--report", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part is not None:
        run_part(args.part, args)
        return 0
    timeouts = dict(DRY_TIMEOUTS if args.dry_run else TIMEOUTS)
    for item in args.timeout:
        name, _, value = item.partition("=")
        if name not in PARTS or not value:
            ap.error(f"--timeout wants PART=SECONDS with PART in {PARTS}, got {item!r}")
        timeouts[name] = float(value)
    import torch

    import prox24_lightning

    where = "dry run on CPU" if args.dry_run else (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")  # fmt: skip
    print(f"gpu_check: {where}, torch {torch.__version__}, parts {' '.join(args.parts)}, "
          f"package {Path(prox24_lightning.__file__).parent}", flush=True)  # fmt: skip
    outcome: dict[str, tuple[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "records.jsonl"
        report.touch()
        for part in args.parts:
            print(f"== {part} (timeout {timeouts[part]:.0f} s)", flush=True)
            t0 = time.perf_counter()
            status = _run_child(part, args, report, timeouts[part])
            outcome[part] = (status, time.perf_counter() - t0)
        records = [json.loads(ln) for ln in report.read_text().splitlines() if ln.strip()]
    print("\n" + _table(records, outcome), flush=True)
    failed = [p for p, (s, _) in outcome.items() if s != "ok"]
    failed += sorted({r["part"] for r in records if r["status"] == "FAILED"} - set(failed))
    total = sum(t for _, t in outcome.values())
    print(f"\ngpu_check: {len(outcome) - len(failed)}/{len(outcome)} parts ok in {total:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
