"""Paired perplexity comparison of two exports on the demo's held-out windows.

``python tools/paired_ppl.py EXPORT_A EXPORT_B`` scores both exports on the same 24 x 256-token
windows of the odd-indexed Wikipedia summaries (``configs/demo.yaml``'s evaluation set), then
bootstraps the ratio ``ppl(B) / ppl(A)`` over windows (10,000 resamples, paired: the same
windows for both), which says whether a perplexity gap is larger than this set's noise.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prox24_lightning.data.sources import evaluation_windows


def window_nll(path: str, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window under the model at ``path``."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in windows.split(batch_size):
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), ids[:, 1:], reduction="none"
            )
            out.append(loss.mean(1))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export_a")
    ap.add_argument("export_b")
    ap.add_argument("--resamples", type=int, default=10_000)
    opts = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(opts.export_a)
    windows = evaluation_windows(
        {"name": "wiki_offline", "part": "odd"}, tokenizer, seqlen=256, max_windows=24
    )
    nll_a, nll_b = window_nll(opts.export_a, windows), window_nll(opts.export_b, windows)
    n = len(windows)
    idx = torch.randint(0, n, (opts.resamples, n), generator=torch.Generator().manual_seed(0))
    ratios = (nll_b[idx].mean(1) - nll_a[idx].mean(1)).exp()
    lo, hi = ratios.quantile(0.025).item(), ratios.quantile(0.975).item()
    print(f"{n} windows: ppl A {nll_a.mean().exp():.3f}, ppl B {nll_b.mean().exp():.3f}")
    print(
        f"ppl(B)/ppl(A) = {(nll_b.mean() - nll_a.mean()).exp():.4f}, 95% bootstrap interval "
        f"[{lo:.4f}, {hi:.4f}]; B lower on {int((nll_b < nll_a).sum())}/{n} windows"
    )


if __name__ == "__main__":
    main()
