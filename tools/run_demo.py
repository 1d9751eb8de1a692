"""`make demo`: prune SmolLM2-135M with prox and with Wanda, then print both perplexities.

Runs the real CLI twice with configs/demo.yaml (prox, then ``--model.init_args.method wanda``),
each scoring the dense model before and the pruned one after on the held-out Wikipedia half,
and prints a summary table with wall times. prox is the project's default solver
(``RECIPES["default"]``: the lambda path with the exact 2:4 prox inside ALPS's ADMM splitting, on
ALPS's ridged objective, then conjugate-gradient refinement); Wanda takes the same refinement from
the config ("Wanda+GD", the fair comparison). Both get 30 CG steps (``DEMO_SCHEDULE``). Exports land in outputs/demo/{prox,wanda}/export. ``tools/compare.py`` runs
every variant.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Overrides of configs/demo.yaml for ``make demo`` (see the module docstring).
DEMO_SCHEDULE = ("--model.init_args.solver.refine_steps=30",)


def run(method: str) -> tuple[dict, float]:
    out = ROOT / "outputs" / "demo" / method
    cmd = [
        sys.executable, "-m", "prox24_lightning", "fit",
        "--config", str(ROOT / "configs" / "demo.yaml"),
        "--model.init_args.method", method,
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        "--evaluate", "both" if method == "prox" else "after",
        *DEMO_SCHEDULE,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    report = json.loads((out / "export" / "sparsity_report.json").read_text())
    return report, seconds


def main() -> None:
    rows = []
    for method in ("prox", "wanda"):
        report, seconds = run(method)
        rows.append((method, report, seconds))
    print("\n| model | held-out perplexity | wall time |\n|---|---|---|")
    dense = rows[0][1].get("perplexity", {}).get("dense", {})
    for k, v in dense.items():
        print(f"| dense | {v:.3f} ({k}) | |")
    for method, report, seconds in rows:
        solver = (report.get("fingerprint") or {}).get("solver", {})  # the resolved config
        label = f"{method}+GD ({solver.get('refine')} x{solver.get('refine_steps')})"
        for k, v in report.get("perplexity", {}).get("pruned", {}).items():
            print(f"| {label} | {v:.3f} ({k}) | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
