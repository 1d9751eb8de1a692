"""The ``prox24`` executable's user path: short errors (no traceback, at most 6 lines, naming the
key, path or value), no silent restart of a run folder, ``--ckpt_path last`` with nothing to
resume refused, fast help, and validate without evaluation sets."""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import WORDS, prox24_command, random_words

from prox24_lightning.cli import cli_main
from prox24_lightning.command import TOP_HELP
from prox24_lightning.runfolder import RunFolderError
from prox24_lightning.testing import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.update(PROX24_CACHE_DIR=str(tmp / "cache"), OMP_NUM_THREADS="1")
    env.pop("PROX24_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    import random

    d = tmp_path_factory.mktemp("user")
    rng = random.Random(3)
    train = d / "train.txt"
    train.write_text("\n".join(random_words(rng, 100, WORDS) for _ in range(60)))
    (d / "empty.txt").write_text("")
    (d / "broken.yaml").write_text("model:\n  init_args:\n    method: [wanda\n")
    model = save_tiny_model(d / "model", "llama", num_layers=2, max_positions=512)
    return {"dir": d, "train": train, "empty": d / "empty.txt", "model": Path(model)}


def _fit(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    calibration = json.dumps({"name": "text", "path": str(files["train"])})
    return [
        "fit",
        f"--model.model_name_or_path={files['model']}",
        f"--data.calibration={calibration}",
        "--data.nsamples=2",
        "--data.seqlen=16",
        "--model.method=wanda",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]


#: name -> (arguments after the common fit arguments, what the message must name)
CASES = {
    "missing model path": (["--model.model_name_or_path=/nowhere/model"], "/nowhere/model"),
    "beta 1": (["--model.method=prox", "--model.solver.beta=1"], "solver.beta must be > 1"),
    "unknown method": (["--model.method=obs"], "unknown method 'obs'"),
    "key typo": (["--model.metod=wanda"], "--model.metod"),
    "empty calibration": (["--data.calibration={name: text, path: EMPTY}"], "EMPTY"),
    "broken config": (["--config=BROKEN"], "BROKEN, line 4"),
}


#: Other commands of this module run through the executable: name -> arguments after
#: ``prox24`` (``OUT`` is the command's own run folder).
COMMANDS = {
    "debug": ["FIT", "--model.method=obs", "--debug"],
    "ckpt last": ["FIT", "--ckpt_path", "last"],
    "misspelt": ["FIT", "--model.init_args.solver.betta", "1.1"],
    "fit help": ["fit", "--help"],
}


@pytest.fixture(scope="module")
def outcomes(files) -> dict[str, subprocess.CompletedProcess]:
    """Every case and command run through the executable, two at a time (each is a fresh
    interpreter, most of whose time is imports)."""
    tmp = files["dir"]

    def run(name: str) -> subprocess.CompletedProcess:
        out = tmp / name.replace(" ", "_")
        if name in CASES:
            extra = [
                a.replace("EMPTY", str(files["empty"])).replace("BROKEN", str(tmp / "broken.yaml"))
                for a in CASES[name][0]
            ]
            args = [*_fit(files, out), *extra]
        else:
            args = [x for a in COMMANDS[name] for x in (_fit(files, out) if a == "FIT" else [a])]
        cmd = [*prox24_command(), *args]
        return subprocess.run(
            cmd, capture_output=True, text=True, env=_env(tmp), cwd=tmp, timeout=300
        )

    names = [*CASES, *COMMANDS]
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(names, pool.map(run, names), strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_a_short_error_naming_it(case, outcomes, files):
    p = outcomes[case]
    console = p.stdout + p.stderr
    named = (
        CASES[case][1]
        .replace("EMPTY", str(files["empty"]))
        .replace("BROKEN", str(files["dir"] / "broken.yaml"))
    )
    assert p.returncode == 2, console[-3000:]
    assert "Traceback" not in console, console[-3000:]
    assert len(console.strip().splitlines()) <= 6, console
    assert named in console, console
    assert "prox24 fit: error:" in console and "--debug" in console
    assert not (files["dir"] / case.replace(" ", "_") / "checkpoints").exists()


def test_key_typo_suggests_the_option(outcomes):
    assert "did you mean 'method'?" in outcomes["key typo"].stderr


def test_debug_shows_the_traceback(outcomes):
    p = outcomes["debug"]
    assert p.returncode != 0 and "Traceback" in p.stderr


# ---------------------------------------------------------------------------- run folders
def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_partial_run_is_never_silently_restarted(files, tmp_path, capsys):
    out = tmp_path / "run"
    cli_main(_fit(files, out, "--trainer.max_epochs=1"))  # block 0 of 2, then stop
    assert (out / "checkpoints" / "last.ckpt").is_file()
    before = _snapshot(out)
    time.sleep(0.01)
    # The same command without --ckpt_path: refused before any work, naming the resume command.
    cmd = [*prox24_command(), *_fit(files, out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "holds a partial run with 1 pruned block(s)" in p.stderr
    assert "--ckpt_path last" in p.stderr and "--overwrite true" in p.stderr
    assert "Traceback" not in p.stderr
    assert _snapshot(out) == before
    # The plan of the same command says so too (and changes nothing).
    from prox24_lightning.command import plan_main

    assert plan_main(_fit(files, out)[1:]) == 0
    assert "NOTE: fit with these arguments would refuse:" in capsys.readouterr().out
    assert _snapshot(out) == before
    # Resumed as told, it finishes; run again, the finished run is refused too.
    cli_main([*_fit(files, out), "--ckpt_path=last"])
    assert (out / "export" / "masks.safetensors").is_file()
    with pytest.raises(RunFolderError, match="holds a finished run"):
        cli_main(_fit(files, out))
    # --overwrite true starts over explicitly.
    cli_main([*_fit(files, out), "--overwrite=true"])
    assert (out / "export" / "masks.safetensors").is_file()


def test_ckpt_path_last_with_nothing_to_resume_is_an_error(outcomes, files):
    p = outcomes["ckpt last"]
    assert p.returncode == 2, p.stderr[-3000:]
    assert "nothing to resume" in p.stderr and "Traceback" not in p.stderr
    assert not (files["dir"] / "ckpt_last").exists()


def test_a_damaged_checkpoint_is_named(files, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"truncated")
    with pytest.raises(RunFolderError, match="last.ckpt is damaged"):
        cli_main([*_fit(files, out), "--ckpt_path=last"])


# --------------------------------------------------------------------- help and dead ends
def test_top_level_help_is_complete_and_fast(tmp_path):
    start = time.perf_counter()
    p = subprocess.run(
        [*prox24_command(), "--help"], capture_output=True, text=True, env=_env(tmp_path)
    )
    elapsed = time.perf_counter() - start
    assert p.returncode == 0 and p.stdout.strip() == TOP_HELP.strip()
    assert elapsed < 3.0, elapsed
    typo = subprocess.run([*prox24_command(), "fitt"], capture_output=True, text=True)
    assert typo.returncode == 2 and "did you mean 'fit'?" in typo.stderr


def test_fit_help_starts_with_the_pruner_options_and_types_every_solver_key(outcomes):
    p = outcomes["fit help"]
    assert p.returncode == 0, p.stderr[-2000:]
    text = p.stdout
    assert text.index("--model.model_name_or_path") < text.index("--trainer.accelerator")
    assert text.index("--model.solver") < text.index("--trainer.accelerator")
    # Every method's settings, typed, with the default each method uses when unset.
    entries = {
        "beta": ("Optional[float]", "null = 1.45 (prox)"),
        "lambda0": ("Optional[float]", "null = 0.03 (prox)"),
        "mask_search_rounds": ("Optional[int]", "null = 0 (prox)"),
        "alps_rho0": ("Optional[float]", "null = 0.1 (alps)"),
    }
    flat = " ".join(text.split())
    for key, (typ, default) in entries.items():
        start = flat.index(f"--model.solver.{key} ")
        entry = flat[start : flat.index("--model.solver.", start + 10)]
        assert f"(type: {typ}" in entry and default in entry, entry


def test_a_misspelt_solver_key_fails_at_parse_time(outcomes, files):
    """No model is loaded and no run folder is made: the parser refuses the key, naming it."""
    p = outcomes["misspelt"]
    assert p.returncode == 2
    assert "unknown option --model.solver.betta; did you mean 'beta'?" in p.stderr, p.stderr
    assert "Run plan" not in p.stdout and not (files["dir"] / "misspelt").exists()


def test_several_devices_pick_the_pruners_ddp_strategy(files, tmp_path):
    from prox24_lightning.strategies import BlockwiseDDPStrategy

    args = _fit(files, tmp_path / "o", "--trainer.accelerator=cpu", "--trainer.devices=2")
    cli = cli_main(args[1:], run=False)
    assert isinstance(cli.trainer.strategy, BlockwiseDDPStrategy)


@pytest.mark.parametrize(
    ("validation", "message"),
    [(None, "need the hub, which is offline"), ("{}", "--data.validation is empty")],
)
def test_validate_without_evaluation_sets_is_one_line(files, validation, message, monkeypatch):
    import prox24_lightning.cli as cli_module

    # The libraries read their offline flags once, at import: the test sets the parsed flag.
    monkeypatch.setattr(cli_module, "hub_offline", lambda **_: True)
    args = ["validate", f"--model.model_name_or_path={files['model']}"]
    if validation is not None:
        args.append(f"--data.validation={validation}")
    with pytest.raises(ValueError, match=message):
        cli_main(args)


# ------------------------------------------------------------------------------------ plan
def test_plan_and_fit_banner_report_the_seqlen_fit_runs_at(files, tmp_path, capsys, caplog):
    """A 512-position model with no seqlen: fit runs at 512, and so do the plan's figures."""
    from prox24_lightning.command import plan_main

    calibration = json.dumps({"name": "text", "path": str(files["train"])})
    args = [
        f"--model.model_name_or_path={files['model']}",
        f"--data.calibration={calibration}",
        "--data.nsamples=2",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]
    assert plan_main(args) == 0
    printed = capsys.readouterr().out
    assert "calibration 2 x 512 tokens" in printed and "fit refuses" not in printed
    with caplog.at_level("INFO"):
        cli = cli_main(["fit", *args, "--model.method=wanda", "--trainer.max_epochs=1"])
    banner = capsys.readouterr().out + caplog.text
    assert "calibration 2 x 512 tokens" in banner and "2048" not in banner
    assert cli.datamodule.seqlen == 512


def test_plan_warns_when_calibration_windows_overlap(files, tmp_path, capsys):
    from prox24_lightning.command import plan_main

    small = tmp_path / "small.txt"
    small.write_text(files["train"].read_text()[:600])
    calibration = json.dumps({"name": "text", "path": str(small)})
    args = [
        f"--model.model_name_or_path={files['model']}",
        f"--data.calibration={calibration}",
        "--data.nsamples=8",
        "--data.seqlen=128",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--data.cache_dir={tmp_path / 'cache'}",
    ]
    assert plan_main(args) == 0
    out = capsys.readouterr().out
    assert "WARNING: calibration: 8 windows x 128 tokens = 1,024 drawn from" in out
    assert f"distinct tokens in {small}: windows overlap" in out


def test_library_errors_become_one_line_naming_the_file_or_option():
    import errno
    import re

    from prox24_lightning.cli_errors import user_error

    def wrapped(err: Exception) -> Exception:
        try:
            try:
                raise err
            except Exception as inner:
                raise ValueError("Does not validate against any of the Union subtypes") from inner
        except ValueError as outer:
            return outer

    read_only = user_error(wrapped(OSError(errno.EROFS, "Read-only file system", "/ro/out")))
    assert read_only.startswith("cannot write /ro/out: Read-only file system")
    assert "--trainer.default_root_dir" in read_only
    full = user_error(OSError(errno.ENOSPC, "No space left on device", "/big/last.ckpt"))
    assert full.startswith("disk full while writing /big/last.ckpt")
    try:
        re.compile("(")
    except re.error as err:
        regex = user_error(wrapped(err))
    assert "invalid regular expression '('" in regex and "--model.targets" in regex
    assert user_error(RuntimeError("a bug")) is None  # not the user's: the traceback stays
