"""Paired perplexity comparison of exports on a config's evaluation windows.

``python tools/paired_ppl.py EXPORT_A EXPORT_B [EXPORT_C ...] [--config configs/demo.yaml]``
scores every export on the same windows (the config's first evaluation set, its ``eval_seqlen``,
``max_eval_windows`` and ``bos``; ``--eval-seqlen`` / ``--max-windows`` override them, as
``tools/compare.py --set`` does), each window with the project's
:class:`~prox24_lightning.metrics.Perplexity`, then bootstraps the ratio ``ppl(X) / ppl(A)`` of
every other export ``X`` against the first one over windows (paired: the same resampled windows
for both). This says whether a perplexity gap is larger than the evaluation set's own noise: an
interval that excludes 1 is a difference beyond it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from prox24_lightning.data import evaluation_windows, resolve_bos
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


def paired_bootstrap(
    nll_a: torch.Tensor, nll_b: torch.Tensor, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """``(ppl(B)/ppl(A), low, high)``: the ratio and its 95% paired bootstrap interval.

    ``nll_*`` are per-window mean NLLs of the same windows; each resample draws windows with
    replacement and takes both models' means over the same draw.
    """
    n = len(nll_a)
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    ratios = (nll_b[idx].mean(1) - nll_a[idx].mean(1)).exp()
    ratio = float((nll_b.mean() - nll_a.mean()).exp())
    return ratio, float(ratios.quantile(0.025)), float(ratios.quantile(0.975))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="+", help="export folders; the first is the reference A")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--eval-seqlen", type=int, default=None, help="default: the config's")
    ap.add_argument("--max-windows", type=int, default=None, help="default: the config's")
    ap.add_argument("--resamples", type=int, default=10_000)
    opts = ap.parse_args(argv)
    if len(opts.exports) < 2:
        ap.error("give at least two exports")
    data = yaml.safe_load(opts.config.read_text())["data"]
    name, source = next(iter(data["validation"].items()))
    tokenizer = AutoTokenizer.from_pretrained(opts.exports[0])
    windows = evaluation_windows(
        source,
        tokenizer,
        seqlen=opts.eval_seqlen or data["eval_seqlen"],
        max_windows=opts.max_windows or data.get("max_eval_windows"),
        bos_token_id=resolve_bos(tokenizer, data.get("bos", "auto")),
    )
    nll = {path: window_nll(path, windows) for path in opts.exports}
    ref = opts.exports[0]
    n = len(windows)
    print(
        f"{name}, {n} windows of {windows.shape[1]} tokens; A = {ref} (ppl {nll[ref].mean().exp():.3f})"
    )
    print("\n| export | ppl | ppl / ppl(A) | 95% paired bootstrap | lower than A on |")
    print("|---|---|---|---|---|")
    rows = []
    for path in opts.exports[1:]:
        ratio, lo, hi = paired_bootstrap(nll[ref], nll[path], opts.resamples)
        wins = int((nll[path] < nll[ref]).sum())
        verdict = "beyond noise" if hi < 1 or lo > 1 else "within noise"
        print(
            f"| {path} | {nll[path].mean().exp():.3f} | {ratio:.4f} | [{lo:.4f}, {hi:.4f}] "
            f"({verdict}) | {wins}/{n} windows |"
        )
        rows.append(dict(export=path, ratio=ratio, low=lo, high=hi, windows_lower=wins, n=n))
    return rows


if __name__ == "__main__":
    main()
