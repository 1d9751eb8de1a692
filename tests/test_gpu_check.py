"""``tools/gpu_check.sh`` cannot rot: its dry run (the same script on the CPU, shapes / 32) runs
here, from a copy of the checkout that is not installed, and failures and timeouts of a part
fail the run instead of being printed and forgotten."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _run(*args: str, root: Path = ROOT, timeout: float = 180) -> tuple[int, str, float]:
    """``(exit status, stdout, seconds)``; stderr (Lightning's and tqdm's chatter) is dropped
    unless the run fails."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PY=sys.executable, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(root / "tools" / "gpu_check.sh"), *args],
        cwd="/",  # the script finds the repository itself
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout if proc.returncode == 0 else proc.stdout + proc.stderr
    return proc.returncode, out, time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_dry_run_passes_every_part_in_under_three_minutes():
    rc, out, seconds = _run("--dry-run")
    assert rc == 0, out[-6000:]
    assert seconds < 180, f"dry run took {seconds:.0f} s"
    header = re.search(r"^\| part +\| measure +\| value +\| status +\|$", out, re.MULTILINE)
    assert header is not None, out[-3000:]
    table = out[header.start() :]
    for part in ("methods", "block", "fit", "offload", "sparse"):
        assert f"| {part}" in table
    for item in (
        "prox default (7B block)",
        "alps (7B block)",
        "sparsegpt+cg50 (7B block)",
        "7B block: summed local loss / SparseGPT+CG50",
        "prox default (70B down_proj)",
        "alps (70B down_proj)",
        "Gram accumulation",
        "prox iteration: GEMM",
        "prox iteration: prox",
        "prox iteration: host sync",
        "fast: prox iterations",
        "paper: extrapolated",
        "wanda (block)",
        "sparsegpt (block)",
        "peak memory",
        "prox24 fit, tiny Llama, bf16-true",
        "prox24 check of the export",
        "pytest -m gpu tests/test_offload.py",
        "to_sparse_semi_structured",
    ):
        assert item in table, item
    assert "5/5 parts ok" in out and "FAILED" not in table and "TIMEOUT" not in table


def test_runs_from_a_copy_of_the_checkout_that_is_not_installed(tmp_path):
    copy = tmp_path / "checkout"
    for sub in ("prox24_lightning", "tools", "tests"):
        shutil.copytree(ROOT / sub, copy / sub, ignore=shutil.ignore_patterns("__pycache__"))
    rc, out, _ = _run("--dry-run", "--parts", "sparse", root=copy, timeout=120)
    assert rc == 0, out[-4000:]
    assert f"package {copy / 'prox24_lightning'}" in out, out[:500]


def test_a_failing_part_fails_the_run():
    rc, out, _ = _run("--dry-run", "--parts", "sparse", "--fail", "sparse", timeout=120)
    assert rc == 1
    assert "FAILED: sparse" in out and "injected failure" in out


def test_a_part_past_its_timeout_is_killed_and_fails_the_run():
    rc, out, _ = _run("--dry-run", "--parts", "sparse", "--timeout", "sparse=0.5", timeout=120)
    assert rc == 1
    assert "TIMEOUT after" in out and "FAILED: sparse" in out
