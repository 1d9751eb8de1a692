"""``prox24 check EXPORT_DIR``: a one-line verdict, exit 0 for a good export and 1 for a bad one.

Good exports come from the real CLI (a pruned tiny llama, a pruned tiny GPT-2 with ``Conv1D``
layers, a finetuned export of the llama, and the llama's export re-saved as shards); each
tampered export is a copy of a good one with one file edited, and must fail naming the problem.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import callback, fit_args, random_words
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import prox24_lightning.check as check_mod
from prox24_lightning.artifacts import load_masks
from prox24_lightning.check import CheckResult, check_export, check_main
from prox24_lightning.cli import cli_main
from prox24_lightning.command import main
from prox24_lightning.testing import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "model.layers.1.mlp.down_proj"
EMBED = "model.embed_tokens.weight"
NORM = "model.layers.0.input_layernorm.weight"
OK_VERDICT = re.compile(
    r"OK: 14 layers exactly 2:4, match the masks; \d+ tensors, no -0\.0/NaN/Inf"
)


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
    """``(tmp, dense model folder, pruned export)``: a tiny llama pruned with Wanda."""
    tmp = tmp_path_factory.mktemp("check")
    model = save_tiny_model(
        tmp / "model", "llama", num_layers=2, hidden_size=32, intermediate_size=64
    )
    cli_main(_fit_args(tmp, model, tmp / "run"))
    return tmp, model, tmp / "run" / "export"


@pytest.fixture(scope="module")
def finetuned(run) -> Path:
    """The pruned export finetuned for two steps with fixed masks (``ExportFinetuned``)."""
    tmp, _, export = run
    out = tmp / "ft"
    callbacks = [
        *callback("prox24_lightning.finetune.EnforceMask"),
        *callback("prox24_lightning.finetune.ExportFinetuned", dirpath=out / "export"),
    ]
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}}
    overrides = {
        "trainer.enable_checkpointing": "false",
        "trainer.max_steps": "2",
        "model": "prox24_lightning.finetune.MaskedFinetuner",
        "model.optimizer": json.dumps(optimizer),
    }
    cli_main(
        fit_args(export, out, tmp / "train.txt", method=None, callbacks=callbacks, **overrides)
    )
    return out / "export"


@pytest.fixture(scope="module")
def sharded(run) -> Path:
    """The pruned export re-saved by ``save_pretrained`` as several shards with an index."""
    tmp, _, export = run
    out = tmp / "sharded"
    AutoModelForCausalLM.from_pretrained(export).save_pretrained(out, max_shard_size="40KB")
    for name in ("masks.safetensors", "sparsity_report.json"):
        shutil.copy(export / name, out / name)
    assert (out / "model.safetensors.index.json").is_file()
    return out


def _verdict(path: Path, capsys) -> tuple[int, str]:
    code = check_main([str(path)])
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # exactly one line
    return code, out.strip()


def _fails(path: Path, capsys, *patterns: str) -> str:
    """Assert the CLI rejects ``path`` with a verdict matching every regex in ``patterns``."""
    code, verdict = _verdict(path, capsys)
    assert code == 1, verdict
    assert verdict.startswith("FAIL: "), verdict
    for pattern in patterns:
        assert re.search(pattern, verdict), (pattern, verdict)
    return verdict


# ---------------------------------------------------------------------------------- good exports


def test_good_export_passes(run, capsys):
    code, verdict = _verdict(run[2], capsys)
    assert code == 0
    assert OK_VERDICT.fullmatch(verdict), verdict
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(run[2])])
    assert exit_info.value.code == 0
    # every tensor of the weight file was scanned, not only the 14 pruned layers
    with safe_open(str(run[2] / "model.safetensors"), framework="pt") as h:
        assert check_export(run[2]).tensors == len(list(h.keys())) > 14


def test_good_finetuned_export_passes(finetuned, capsys):
    code, verdict = _verdict(finetuned, capsys)
    assert code == 0 and OK_VERDICT.fullmatch(verdict), verdict
    report = json.loads((finetuned / "sparsity_report.json").read_text())
    assert report["method"].endswith("+finetune") and len(report["layers"]) == 14


def test_good_sharded_export_passes(sharded, capsys):
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    code, verdict = _verdict(sharded, capsys)
    assert code == 0 and OK_VERDICT.fullmatch(verdict), verdict


def test_good_conv1d_export_passes(tmp_path, capsys):
    """GPT-2 stores ``Conv1D`` weights ``[in, out]``; the masks file records the layout."""
    model = save_tiny_model(tmp_path / "model", "gpt2", num_layers=1)
    cli_main(_fit_args(tmp_path, model, tmp_path / "run"))
    export = tmp_path / "run" / "export"
    capsys.readouterr()  # the fit's table
    with safe_open(str(export / "masks.safetensors"), framework="pt") as h:
        assert int(h.get_tensor("transformer.h.0.mlp.c_fc.transposed")[0]) == 1
    code, verdict = _verdict(export, capsys)
    assert code == 0 and verdict.startswith("OK: "), verdict
    # Without its mask the layout comes from the report's [out, in] shape: still 2:4, no mismatch
    bad = _copy(export, tmp_path / "bad")
    _drop_mask(bad, "transformer.h.0.mlp.c_fc")
    _fails(
        bad,
        capsys,
        r"^FAIL: 1 problem\(s\): transformer\.h\.0\.mlp\.c_fc: listed as pruned in "
        r"sparsity_report\.json but has no mask in masks\.safetensors \(its weight is 2:4\)$",
    )


# ------------------------------------------------------------------------------ tampered exports


def _copy(export: Path, dst: Path) -> Path:
    return Path(shutil.copytree(export, dst))


def _edit_weights(folder: Path, edit) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    edit(weights)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _dense_weight(model: str, layer: str):
    return load_file(str(Path(model) / "model.safetensors"))[f"{layer}.weight"]


def _drop_mask(folder: Path, layer: str) -> None:
    packed = load_file(str(folder / "masks.safetensors"))
    for key in (layer, f"{layer}.shape", f"{layer}.transposed"):
        del packed[key]
    save_file(packed, str(folder / "masks.safetensors"))


def _edit_report(folder: Path, edit) -> None:
    path = folder / "sparsity_report.json"
    report = json.loads(path.read_text())
    edit(report)
    path.write_text(json.dumps(report))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _corrupt(export: Path, dst: Path, how: str) -> Path:
    bad = _copy(export, dst)
    mask = load_masks(bad / "masks.safetensors")[LAYER]
    if how == "mask_bit":
        packed = load_file(str(bad / "masks.safetensors"))
        packed[LAYER].view(-1)[0] ^= 1  # one bit of one group
        save_file(packed, str(bad / "masks.safetensors"))
        return bad
    pruned = tuple(int(i) for i in (~mask).nonzero()[0])
    kept = tuple(int(i) for i in mask.nonzero()[0])

    def edit(weights):
        w = weights[f"{LAYER}.weight"]
        if how == "negative_zero":
            w[pruned] = -0.0
        elif how == "nan":
            w[kept] = float("nan")
        elif how == "not_2of4":
            w[pruned] = 1.0

    _edit_weights(bad, edit)
    return bad


@pytest.mark.parametrize(
    "how,problem",
    [
        ("mask_bit", rf"{LAYER}: mask does not keep exactly 2 of 4"),
        ("negative_zero", rf"{LAYER}: holds -0\.0"),
        ("nan", rf"{LAYER}\.weight: 1 NaN and 0 Inf values \(in model\.safetensors\)"),
        ("not_2of4", rf"{LAYER}: not 2:4 \(1 of \d+ groups.*{LAYER}: non-zero weights outside"),
    ],
)
def test_corrupted_export_fails_naming_layer_and_problem(run, tmp_path, capsys, how, problem):
    _fails(_corrupt(run[2], tmp_path / "bad", how), capsys, problem)


@pytest.mark.parametrize(
    "tensor,value,problem",
    [
        (EMBED, float("nan"), "1 NaN and 0 Inf"),
        (NORM, float("nan"), "1 NaN and 0 Inf"),
        ("model.norm.weight", float("inf"), "0 NaN and 1 Inf"),
    ],
)
def test_nan_or_inf_anywhere_fails_naming_the_tensor(run, tmp_path, capsys, tensor, value, problem):
    bad = _copy(run[2], tmp_path / "bad")
    _edit_weights(bad, lambda w: w[tensor].view(-1).__setitem__(0, value))
    _fails(bad, capsys, rf"^FAIL: 1 problem\(s\): {re.escape(tensor)}: {problem} values")


def test_dense_layer_with_its_mask_removed_fails(run, tmp_path, capsys):
    """A pruned layer restored to dense and its mask entries deleted: the report still lists it."""
    bad = _copy(run[2], tmp_path / "bad")
    dense = _dense_weight(run[1], LAYER)
    _edit_weights(bad, lambda w: w.__setitem__(f"{LAYER}.weight", dense))
    _drop_mask(bad, LAYER)
    _fails(
        bad,
        capsys,
        rf"{LAYER}: listed as pruned in sparsity_report\.json but has no mask in "
        rf"masks\.safetensors \(not 2:4 .*0\.0% zeros\)",
    )


def test_report_says_pruned_but_weight_is_dense(run, tmp_path, capsys):
    bad = _copy(run[2], tmp_path / "bad")
    dense = _dense_weight(run[1], LAYER)
    _edit_weights(bad, lambda w: w.__setitem__(f"{LAYER}.weight", dense))
    _fails(
        bad,
        capsys,
        rf"{LAYER}: not 2:4 \((\d+) of \1 groups of 4 keep more than 2 non-zeros; 0\.0% zeros\)",
        rf"{LAYER}: non-zero weights outside the mask",
    )


@pytest.mark.parametrize("with_report", [False, True])
def test_empty_mask_file_beside_the_dense_model_fails(run, tmp_path, capsys, with_report):
    bad = _copy(Path(run[1]), tmp_path / "bad")
    save_file({}, str(bad / "masks.safetensors"))
    if with_report:
        shutil.copy(run[2] / "sparsity_report.json", bad)
        _fails(bad, capsys, r"^FAIL: 15 problem\(s\): masks\.safetensors: holds no masks")
        unmasked = [p for p in check_export(bad).problems if "but has no mask" in p]
        assert len(unmasked) == 14 and any(
            p.startswith(f"{LAYER}: listed as pruned") for p in unmasked
        )
    else:
        _fails(
            bad, capsys, r"masks\.safetensors: holds no masks", r"sparsity_report\.json not found"
        )


def test_mask_without_weight_fails(run, tmp_path, capsys):
    bad = _copy(run[2], tmp_path / "bad")
    _edit_weights(bad, lambda w: w.pop(f"{LAYER}.weight"))
    _fails(bad, capsys, rf"{LAYER}: in masks\.safetensors but no weight {LAYER}\.weight")


def test_mask_of_a_layer_the_report_does_not_list_fails(run, tmp_path, capsys):
    bad = _copy(run[2], tmp_path / "bad")
    _edit_report(bad, lambda r: r["layers"].pop(LAYER))
    _fails(bad, capsys, rf"{LAYER}: has a mask but is not listed as pruned in sparsity_report")


def test_report_says_not_2of4_or_other_shape_fails(run, tmp_path, capsys):
    bad = _copy(run[2], tmp_path / "bad")

    def edit(report):
        report["layers"][LAYER]["is_2of4"] = False
        report["layers"][LAYER]["shape"] = [64, 32]

    _edit_report(bad, edit)
    _fails(bad, capsys, rf"{LAYER}: shape \(32, 64\) != sparsity_report\.json \(64, 32\)")
    _fails(bad, capsys, rf"{LAYER}: sparsity_report\.json says it is not 2:4")


@pytest.mark.parametrize("how", ["missing", "truncated", "no_layers"])
def test_missing_or_unreadable_report_fails(run, tmp_path, capsys, how):
    bad = _copy(run[2], tmp_path / "bad")
    report = bad / "sparsity_report.json"
    if how == "missing":
        report.unlink()
        _fails(bad, capsys, r"^FAIL: 1 problem\(s\): sparsity_report\.json not found: every export")
    elif how == "truncated":
        _truncate(report)
        _fails(bad, capsys, r"^FAIL: 1 problem\(s\): sparsity_report\.json: unreadable \(")
    else:
        report.write_text('{"summary": {}}')
        _fails(bad, capsys, r"sparsity_report\.json: no 'layers' table of pruned layers")


def test_truncated_weight_file_is_named(run, tmp_path, capsys):
    bad = _copy(run[2], tmp_path / "bad")
    _truncate(bad / "model.safetensors", keep=0.9)
    _fails(bad, capsys, r"^FAIL: 1 problem\(s\): model\.safetensors: unreadable \(.*truncated")


def test_truncated_shard_is_named(sharded, tmp_path, capsys):
    bad = _copy(sharded, tmp_path / "bad")
    shard = sorted(bad.glob("model-*-of-*.safetensors"))[1]
    _truncate(shard)
    _fails(bad, capsys, rf"^FAIL: 1 problem\(s\): {re.escape(shard.name)}: unreadable \(")


def test_missing_shard_and_stray_weight_file_fail(sharded, tmp_path, capsys):
    bad = _copy(sharded, tmp_path / "bad")
    shard = sorted(bad.glob("model-*-of-*.safetensors"))[0]
    shard.rename(bad / "stray.safetensors")
    _fails(
        bad,
        capsys,
        rf"{re.escape(shard.name)}: listed in model\.safetensors\.index\.json but not found",
        r"stray\.safetensors: not among the weights that load",
    )


def test_truncated_masks_file_is_named(run, tmp_path, capsys):
    bad = _copy(run[2], tmp_path / "bad")
    _truncate(bad / "masks.safetensors")
    _fails(bad, capsys, r"masks\.safetensors: unreadable \(.*truncated or corrupt")


def test_missing_export_and_usage(tmp_path, capsys):
    code, verdict = _verdict(tmp_path / "nowhere", capsys)
    assert code == 1 and "masks.safetensors not found" in verdict
    assert check_main([]) == 2
    assert "usage: prox24 check EXPORT_DIR" in capsys.readouterr().out


def test_console_command_exit_codes(run, tmp_path):
    bad = _corrupt(run[2], tmp_path / "bad", "negative_zero")
    _truncate(bad / "sparsity_report.json")
    cmd = [sys.executable, "-m", "prox24_lightning", "check", str(bad)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    assert p.stdout.count("\n") == 1 and p.stdout.startswith("FAIL: ")
    assert f"{LAYER}: holds -0.0" in p.stdout and "sparsity_report.json: unreadable" in p.stdout
    assert "Traceback" not in p.stderr


def test_export_callback_refuses_to_publish_a_failing_export(run, tmp_path, monkeypatch):
    """ExportPruned runs the same check before renaming its folder into place."""
    tmp, model, _ = run
    failing = CheckResult(ok=False, layers=1, problems=[f"{LAYER}: holds -0.0"])
    monkeypatch.setattr(check_mod, "check_export", lambda path: failing)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=rf"export check failed: FAIL: 1 problem\(s\): {LAYER}"):
        cli_main(_fit_args(tmp_path, model, out))
    assert not (out / "export").exists() and not list(out.glob(".export.*"))
