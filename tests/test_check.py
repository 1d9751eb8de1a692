"""``prox24 check EXPORT_DIR``: a one-line verdict, exit 0 for a good export and 1 for a bad one."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import callback, fit_args, random_words
from safetensors.torch import load_file, save_file

import prox24_lightning.callbacks as callbacks_mod
from prox24_lightning.artifacts import CheckResult, load_masks
from prox24_lightning.cli import _check_main, cli_main, main
from prox24_lightning.testing import save_tiny_model

LAYER = "model.layers.1.mlp.down_proj"


def _fit_args(tmp: Path, model: str, out: Path) -> list[str]:
    text = tmp / "train.txt"
    text.write_text(random_words(random.Random(0), 2000))
    overrides = {
        "trainer.devices": None,
        "trainer.check_val_every_n_epoch": None,
        "trainer.limit_val_batches": "0",
        "data.nsamples": "2",
    }
    export = callback("prox24_lightning.callbacks.ExportPruned", dirpath=out / "export")
    return fit_args(model, out, text, callbacks=export, **overrides)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str, Path]:
    tmp = tmp_path_factory.mktemp("check")
    model = save_tiny_model(
        tmp / "model", "llama", num_layers=2, hidden_size=32, intermediate_size=64
    )
    cli_main(_fit_args(tmp, model, tmp / "run"))
    return tmp, model, tmp / "run" / "export"


def _verdict(path: Path, capsys) -> tuple[int, str]:
    code = _check_main([str(path)])
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # exactly one line
    return code, out.strip()


def test_good_export_passes(run, capsys):
    code, verdict = _verdict(run[2], capsys)
    assert code == 0
    assert verdict == "OK: 14 layers exactly 2:4, match the masks, no -0.0/NaN/Inf"
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(run[2])])
    assert exit_info.value.code == 0


def _corrupt(export: Path, dst: Path, how: str) -> Path:
    bad = Path(shutil.copytree(export, dst))
    mask = load_masks(bad / "masks.safetensors")[LAYER]
    if how == "mask_bit":
        packed = load_file(str(bad / "masks.safetensors"))
        packed[LAYER].view(-1)[0] ^= 1  # one bit of one group
        save_file(packed, str(bad / "masks.safetensors"))
        return bad
    weights = load_file(str(bad / "model.safetensors"))
    w = weights[f"{LAYER}.weight"]
    pruned = tuple(int(i) for i in (~mask).nonzero()[0])
    kept = tuple(int(i) for i in mask.nonzero()[0])
    if how == "negative_zero":
        w[pruned] = -0.0
    elif how == "nan":
        w[kept] = float("nan")
    elif how == "not_2of4":
        w[pruned] = 1.0
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize(
    "how,problem",
    [
        ("mask_bit", r"mask does not keep exactly 2 of 4"),
        ("negative_zero", r"holds -0\.0"),
        ("nan", r"NaN or Inf"),
        ("not_2of4", r"not 2:4; .*non-zero weights outside the mask"),
    ],
)
def test_corrupted_export_fails_naming_layer_and_problem(run, tmp_path, capsys, how, problem):
    bad = _corrupt(run[2], tmp_path / "bad", how)
    code, verdict = _verdict(bad, capsys)
    assert code == 1
    assert verdict.startswith("FAIL: "), verdict
    assert re.search(rf"{LAYER}: {problem}", verdict), verdict


def test_missing_export_and_usage(tmp_path, capsys):
    code, verdict = _verdict(tmp_path / "nowhere", capsys)
    assert code == 1 and "masks.safetensors not found" in verdict
    assert _check_main([]) == 2
    assert "usage: prox24 check EXPORT_DIR" in capsys.readouterr().out


def test_console_command_exit_codes(run, tmp_path):
    bad = _corrupt(run[2], tmp_path / "bad", "negative_zero")
    cmd = [sys.executable, "-c", "from prox24_lightning.cli import main; main()", "check", str(bad)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    assert p.stdout.count("\n") == 1 and p.stdout.startswith("FAIL: ")
    assert f"{LAYER}: holds -0.0" in p.stdout


def test_export_callback_refuses_to_publish_a_failing_export(run, tmp_path, monkeypatch):
    """ExportPruned runs the same check before renaming its folder into place."""
    tmp, model, _ = run
    failing = CheckResult(ok=False, layers=1, problems=[f"{LAYER}: holds -0.0"])
    monkeypatch.setattr(callbacks_mod, "check_export", lambda path: failing)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=rf"export check failed: FAIL: 1 problem\(s\): {LAYER}"):
        cli_main(_fit_args(tmp_path, model, out))
    assert not (out / "export").exists() and not list(out.glob(".export.*"))
