"""Paired perplexity comparison of two exports on a config's evaluation windows.

``python tools/paired_ppl.py EXPORT_A EXPORT_B [--config configs/demo.yaml]`` scores both exports
on the same windows (the config's first evaluation set, ``eval_seqlen``, ``max_eval_windows``),
each window with the project's :class:`~prox24_lightning.metrics.Perplexity`, then bootstraps the
ratio ``ppl(B) / ppl(A)`` over windows (paired: the same resampled windows for both). This says
whether a perplexity gap is larger than the evaluation set's own noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from prox24_lightning.data import evaluation_windows
from prox24_lightning.metrics import Perplexity

ROOT = Path(__file__).resolve().parent.parent


def window_nll(path: str, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window under the model at ``path``."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in windows.split(batch_size):
            logits = model(input_ids=ids, use_cache=False).logits
            for row in range(len(ids)):
                metric = Perplexity()
                metric.update(logits[row : row + 1], ids[row : row + 1])
                out.append(metric.compute().log())
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export_a")
    ap.add_argument("export_b")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--resamples", type=int, default=10_000)
    opts = ap.parse_args()
    data = yaml.safe_load(opts.config.read_text())["data"]
    name, source = next(iter(data["validation"].items()))
    windows = evaluation_windows(
        source,
        AutoTokenizer.from_pretrained(opts.export_a),
        seqlen=data["eval_seqlen"],
        max_windows=data.get("max_eval_windows"),
    )
    nll_a, nll_b = window_nll(opts.export_a, windows), window_nll(opts.export_b, windows)
    n = len(windows)
    idx = torch.randint(0, n, (opts.resamples, n), generator=torch.Generator().manual_seed(0))
    ratios = (nll_b[idx].mean(1) - nll_a[idx].mean(1)).exp()
    lo, hi = ratios.quantile(0.025).item(), ratios.quantile(0.975).item()
    print(f"{name}, {n} windows: ppl A {nll_a.mean().exp():.3f}, ppl B {nll_b.mean().exp():.3f}")
    print(
        f"ppl(B)/ppl(A) = {(nll_b.mean() - nll_a.mean()).exp():.4f}, 95% bootstrap interval "
        f"[{lo:.4f}, {hi:.4f}]; B lower on {int((nll_b < nll_a).sum())}/{n} windows"
    )


if __name__ == "__main__":
    main()
