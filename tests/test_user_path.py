"""The user's path: shipped configs resume as the README says, one command prunes your own model
into an export the checker accepts, the console stays quiet, bad settings fail before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prox24_lightning.artifacts import load_masks
from prox24_lightning.check import check_export
from prox24_lightning.cli import cli_main, resume_command
from prox24_lightning.testing import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _swapped(config: str, model: str, out: Path, corpus: tuple[Path, Path]) -> list[str]:
    """A shipped config (``a.yaml+methods/b.yaml``: a model config and a method override) with
    only the model, the data (and the CPU) swapped in."""
    train, held_out = corpus
    return [
        "fit",
        *(arg for name in config.split("+") for arg in ("--config", str(CONFIGS / name))),
        f"--model.init_args.model_name_or_path={model}",
        "--data.calibration=" + json.dumps({"name": "text", "path": str(train)}),
        "--data.validation=" + json.dumps({"held_out": {"name": "text", "path": str(held_out)}}),
        "--data.calibration_mode=packed",
        "--data.nsamples=4",
        "--data.seqlen=32",
        "--data.batch_size=2",
        "--data.eval_seqlen=32",
        "--data.max_eval_windows=2",
        f"--data.cache_dir={out / 'cache'}",
        f"--trainer.default_root_dir={out}",
        "--trainer.accelerator=cpu",
        "--evaluate=none",
    ]


def _weights(export: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export / "model.safetensors"))


@pytest.mark.parametrize("config", ["demo.yaml", "llama2-7b.yaml+methods/sparsegpt.yaml"])
def test_shipped_config_stops_after_block_1_and_resumes_with_ckpt_path_last(
    tmp_path, corpus, config
):
    """The README's resume command works with the shipped config as it is: the run folder is
    stable (no version_N), ``--ckpt_path last`` continues at block 2 (no restart), and masks and
    weights equal an uninterrupted run's."""
    model = save_tiny_model(tmp_path / "model", "llama", num_layers=2, max_positions=64)
    ref, run = tmp_path / "ref", tmp_path / "run"
    cli_main(_swapped(config, model, ref, corpus))
    first = _swapped(config, model, run, corpus)
    cli_main([*first, "--trainer.max_epochs=1"])
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "export").exists()
    assert sorted(p.name for p in (run / "masks").iterdir()) == ["block_000.safetensors"]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["prox24"]["pruned_blocks"] == [0]
    resumed = cli_main([*first, "--ckpt_path=last"])
    # Resumed, not restarted: block 0 was not solved again.
    assert resumed.trainer.global_step == 0 or resumed.model.pruned_blocks == {0, 1}
    assert {v["block"] for v in resumed.model.report.values()} == {0, 1}
    assert check_export(run / "export").ok
    a, b = (
        load_masks(ref / "export" / "masks.safetensors"),
        load_masks(run / "export" / "masks.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    wa, wb = _weights(ref / "export"), _weights(run / "export")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    assert not list(run.rglob("version_*")), "pruning runs have no version_N folders"
    assert (run / "logs" / "metrics.csv").is_file()


def test_a_shipped_config_with_its_progress_bar_turned_off_runs(tmp_path, corpus):
    """demo.yaml lists the block progress bar; ``--trainer.enable_progress_bar false`` drops it
    (Lightning refuses a bar callback with the bar disabled) and keeps the other callbacks."""
    model = save_tiny_model(tmp_path / "model", "llama", num_layers=1, max_positions=64)
    args = _swapped("demo.yaml", model, tmp_path / "run", corpus)
    cli = cli_main([*args, "--trainer.enable_progress_bar=false"])
    assert cli.trainer.progress_bar_callback is None
    assert check_export(tmp_path / "run" / "export").ok


def test_resume_command_drops_the_stop_and_adds_ckpt_path():
    argv = ["fit", "--config", "c.yaml", "--trainer.max_epochs", "1", "--model.method=wanda"]
    assert (
        resume_command(argv) == "prox24 fit --config c.yaml --model.method=wanda --ckpt_path last"
    )
    assert resume_command(["fit", "--trainer.max_epochs=1", "--ckpt_path=x"]).endswith(
        "fit --ckpt_path last"
    )


#: Lines a pruning run must not print (Lightning's, torch's and ours that said nothing useful).
NOISE = (
    "litlogger",
    "tensorboardX",
    "LeafSpec",
    "in eval mode",
    "Trainable params",
    "Total FLOPs",
    "Epoch ",
    "v_num",
    "predict",
    "Traceback",
)


def test_one_command_prunes_your_own_model_quietly_into_a_checked_export(tmp_path, corpus):
    """``prox24 fit --model.model_name_or_path DIR --data.calibration '{name: text, path:
    FILE}' --trainer.default_root_dir OUT``, nothing else: default pruner, default callbacks,
    one epoch per block, no evaluation sets loaded (none configured), offline; the export passes
    ``prox24 check`` and the console holds none of the noise lines."""
    model = save_tiny_model(tmp_path / "model", "llama", num_layers=1, max_positions=64)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env["PROX24_CACHE_DIR"] = str(tmp_path / "cache")
    calibration = json.dumps({"name": "text", "path": str(corpus[0])})
    cmd = [sys.executable, "-m", "prox24_lightning", "fit"]
    cmd += [f"--model.model_name_or_path={model}", f"--data.calibration={calibration}"]
    cmd += [f"--trainer.default_root_dir={out}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    console = p.stdout + p.stderr
    assert p.returncode == 0, console[-3000:]
    for noise in NOISE:
        assert noise not in console, (noise, console[-3000:])
    assert "block 1/1" in console and "export written to" in console
    assert sorted(x.name for x in out.iterdir()) == [
        "blocks",
        "checkpoints",
        "export",
        "logs",
        "masks",
    ]
    check = [sys.executable, "-m", "prox24_lightning", "check"]
    c = subprocess.run([*check, str(out / "export")], capture_output=True, text=True, env=env)
    assert c.returncode == 0 and c.stdout.startswith("OK: 7 layers exactly 2:4"), c.stdout
    help_text = subprocess.run(
        [sys.executable, "-m", "prox24_lightning", "--help"],
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    assert "{fit,validate,test,plan,check}" in help_text and "predict" not in help_text
    for subcommand in ("fit", "validate", "test", "plan", "check"):
        assert f"\n  {subcommand} " in help_text, subcommand


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("--model.solver.beta=1.0", r"solver\.beta must be > 1 \(lambda must grow\), got 1\.0"),
        ("--model.solver.refine_steps=-1", r"solver\.refine_steps must be >= 0, got -1"),
        ("--model.solver.switch_at=0", r"solver\.switch_at must be in \(0, 1\], got 0"),
        ("--model.solver.tail_from=1.5", r"solver\.tail_from must be in \(0, 1\], got 1\.5"),
        ("--model.solver.lambda0=0", r"solver\.lambda0 must be > 0, got 0"),
        ("--model.solver.momentum=1", r"solver\.momentum must be in \[0, 1\), got 1"),
        ("--model.solver.max_prox_steps=0", r"solver\.max_prox_steps must be >= 1, got 0"),
        ("--model.solver.betta=1.1", r"(does not accept option 'betta'|--solver\.betta)"),
        ("--model.solver.recipe=quick", r"unknown solver\.recipe 'quick'"),
        ("--model.method=obs", r"unknown method 'obs'; choose one of magnitude, wanda"),
        ("--model.progress_every=0", r"progress_every must be >= 1, got 0"),
    ],
)
def test_invalid_settings_fail_before_any_work(tmp_path, corpus, monkeypatch, setting, message):
    import prox24_lightning.pruner as pruner_mod

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although a setting is invalid")

    monkeypatch.setattr(pruner_mod, "load_causal_lm", never)
    args = ["fit", "--model.model_name_or_path=/nowhere/model", "--trainer.accelerator=cpu"]
    args += ["--data.calibration=" + json.dumps({"name": "text", "path": str(corpus[0])})]
    args += [f"--trainer.default_root_dir={tmp_path / 'out'}", setting]
    with pytest.raises((ValueError, SystemExit)) as info:
        cli_main(args)
    import re

    text = str(info.value)
    if isinstance(info.value, SystemExit):  # jsonargparse reports init errors as usage errors
        text = str(info.value.__context__ or "")
    assert re.search(message, text), text
    assert not (tmp_path / "out").exists()


def test_partial_run_is_labelled_and_prints_the_resume_command(tmp_path, corpus, capsys):
    model = save_tiny_model(tmp_path / "model", "llama", num_layers=2, max_positions=64)
    out = tmp_path / "run"
    args = [*_swapped("demo.yaml", model, out, corpus), "--trainer.max_epochs=1"]
    args[args.index("--evaluate=none")] = "--evaluate=after"
    cli = cli_main(args)
    printed = capsys.readouterr().out
    assert "partial run: 1 of 2 blocks pruned, no export yet. Resume with:" in printed
    assert "--ckpt_path last" in printed and "max_epochs" not in printed.split("Resume with:")[1]
    assert list(cli._metrics) == ["partial (1/2 blocks pruned)"]
