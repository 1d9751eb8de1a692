"""What a pruning run leaves to read: ``logs/metrics.csv`` keeps every block, the report lists
only the evaluations that ran, and the console of a one-command prune holds one line per block
and none of the libraries' noise."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import fit_args, prox24_command

from prox24_lightning.callbacks import RunLogger
from prox24_lightning.cli import cli_main
from prox24_lightning.console import quiet
from prox24_lightning.reports import (
    evaluated_sets,
    format_block_line,
    format_table,
    layer_csv_rows,
    own_seconds,
)
from prox24_lightning.testing import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent

#: Lines the one-command prune used to print that say nothing a user acts on.
NOISE = (
    "No seed found",
    "Seed set to",
    "GPU available",
    "TPU available",
    "Loading weights",
    "Writing model shards",
    "torch_dtype",
    "`Trainer.fit` stopped",
    "LightningCLI's args parameter",
    "| model.layers.",  # the per-layer table (it is in the report)
)

BLOCK_LINE = re.compile(r"^block (\d+)/3 \((model\.layers\.\d+)\): 7 layers, all 2:4, solver ")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A tiny 3-block Llama (``from_config``) with its offline tokenizer."""
    return save_tiny_model(
        tmp_path_factory.mktemp("model") / "m", "llama", num_layers=3, max_positions=64
    )


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def one_command(tmp_path_factory, model, corpus) -> tuple[Path, str]:
    """``prox24 fit --model.model_name_or_path M --data.calibration '{...}' --trainer.
    default_root_dir OUT``, nothing else, offline: the run folder and the console (stdout and
    stderr together, carriage returns as line breaks)."""
    tmp = tmp_path_factory.mktemp("one_command")
    out = tmp / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env["PROX24_CACHE_DIR"] = str(tmp / "cache")
    env["OMP_NUM_THREADS"] = "1"
    calibration = json.dumps({"name": "text", "path": str(corpus[0])})
    cmd = [*prox24_command(), "fit", f"--model.model_name_or_path={model}"]
    cmd += [f"--data.calibration={calibration}", f"--trainer.default_root_dir={out}"]
    p = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp
    )
    console = p.stdout.replace("\r", "\n")
    assert p.returncode == 0, console[-3000:]
    return out, console


def test_one_command_console_has_one_line_per_block_and_no_noise(one_command):
    _, console = one_command
    for noise in NOISE:
        assert noise not in console, (noise, console[-3000:])
    found = [m.groups() for m in map(BLOCK_LINE.match, console.splitlines()) if m]
    assert found == [("1", "model.layers.0"), ("2", "model.layers.1"), ("3", "model.layers.2")], (
        console[-3000:]
    )
    assert "21 layers in 3 blocks pruned" in console and "export written to" in console


def test_metrics_csv_of_a_3_block_run_holds_every_block(one_command):
    """One row per layer, with its block: every block, not only the last one."""
    out, _ = one_command
    rows = _metrics(out)
    assert sorted({r["block"] for r in rows}) == ["0", "1", "2"]
    assert len(rows) == 21 and all(r["layer"].startswith("model.layers.") for r in rows)
    assert {r["layer"].split(".")[2] for r in rows if r["block"] == "1"} == {"1"}
    with open(out / "logs" / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:3] == ["step", "block", "layer"]
    assert all(r["is_2of4"] == "1" and float(r["own_seconds"]) >= 0 for r in rows)
    report = json.loads((out / "export" / "sparsity_report.json").read_text())
    for block in ("0", "1", "2"):
        # A block's own seconds add up to its solver time (its layers are solved together).
        own = sum(float(r["own_seconds"]) for r in rows if r["block"] == block)
        span = max(v["seconds"] for v in report["layers"].values() if str(v["block"]) == block)
        assert own == pytest.approx(span, rel=1e-6)


def test_report_of_a_run_without_evaluation_lists_no_evaluation_sets(one_command):
    """Nothing was evaluated (WikiText2 and C4 are only the configured defaults): the report
    names neither, nor their files."""
    out, _ = one_command
    report = json.loads((out / "export" / "sparsity_report.json").read_text())
    data = report["data"]
    assert "validation" not in data and "eval_seqlen" not in data
    assert list(data["files"]) == ["calibration"]
    assert "wikitext" not in json.dumps(data) and "c4" not in json.dumps(data)
    assert not report.get("perplexity")


def test_report_lists_only_the_evaluations_that_ran(tmp_path, model, corpus):
    """The sets scored after fit are listed with their settings and files, next to their
    perplexities; a perplexity of one set of two configured lists that one only."""
    train, held_out = corpus
    validation = {
        "held_out": {"name": "text", "path": str(held_out)},
        "train_text": {"name": "text", "path": str(train)},
    }
    out = tmp_path / "run"
    args = fit_args(
        model,
        out,
        train,
        callbacks=["--trainer.callbacks+=prox24_lightning.callbacks.ExportPruned"],
        **{
            "data.validation": json.dumps(validation),
            "data.eval_seqlen": "32",
            "data.max_eval_windows": "2",
            "evaluate": "after",
            "trainer.logger": None,  # the default RunLogger
        },
    )
    cli = cli_main(args)
    report = json.loads((out / "export" / "sparsity_report.json").read_text())
    scored = evaluated_sets(report["perplexity"])
    assert scored == ["held_out", "train_text"]  # both ran here: evaluate after scores every set
    assert sorted(report["data"]["validation"]) == scored
    assert report["data"]["eval_seqlen"] == 32
    assert {"validation/held_out", "validation/train_text"} <= set(report["data"]["files"])

    # Now a perplexity of one set only (as an evaluation of one set reports it).
    export = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ExportPruned")
    (out / "export" / "sparsity_report.json").write_text(
        json.dumps({**report, "data": {"files": {"calibration": {}}}})
    )
    export.update_report(perplexity={"pruned": {"val/held_out_ppl": 12.5}})
    again = json.loads((out / "export" / "sparsity_report.json").read_text())
    assert list(again["data"]["validation"]) == ["held_out"]
    assert sorted(again["data"]["files"]) == ["calibration", "validation/held_out"]
    # The evaluation rows join the layer rows in metrics.csv, with an empty layer column.
    rows = _metrics(out)
    assert sorted({r["block"] for r in rows if r["layer"]}) == ["0", "1", "2"]
    assert any(r["val/held_out_ppl"] and not r["layer"] for r in rows)


def test_metrics_csv_of_a_resumed_run_appends_the_missing_blocks(tmp_path, model, corpus):
    """Stopped after block 1 and resumed with ``--ckpt_path last``: every block once, in the
    same file, under the first run's header."""
    out = tmp_path / "run"
    args = fit_args(model, out, corpus[0], **{"trainer.logger": None})
    cli_main([*args, "--trainer.max_epochs=1"])
    assert {r["block"] for r in _metrics(out)} == {"0"}
    cli_main([*args, "--ckpt_path=last"])
    rows = _metrics(out)
    assert [r["block"] for r in rows] == ["0"] * 7 + ["1"] * 7 + ["2"] * 7
    assert len({r["layer"] for r in rows}) == 21


def _layer(block: int, shape: tuple[int, int], seconds: float, gemms: int, **kw) -> dict:
    return {
        "block": block,
        "shape": list(shape),
        "seconds": seconds,
        "gemms": gemms,
        "sparsity": 0.5,
        "is_2of4": True,
        "capped": False,
        "iterations_to_2of4": 30,
        "final_lambda": 1.0,
        "loss_method": 2.0,
        "loss_final": 1.0,
        "dead_features": 0,
        **kw,
    }


def test_own_seconds_split_the_block_solver_time_by_work():
    """Two layers solved together for 3 s: the one with 4x the GEMM work gets 4/5 of it."""
    layers = {
        "b0.big": _layer(0, (128, 64), 3.0, gemms=19),  # (19 + 1) x 128 x 64^2
        "b0.small": _layer(0, (32, 64), 2.9, gemms=19),  # (19 + 1) x 32 x 64^2
        "b1.only": _layer(1, (64, 64), 1.5, gemms=0),
    }
    own = own_seconds(layers)
    assert own["b0.big"] == pytest.approx(2.4) and own["b0.small"] == pytest.approx(0.6)
    assert own["b1.only"] == pytest.approx(1.5)
    # Under DDP each rank's layers share that rank's solver time.
    ddp = {
        "a": _layer(0, (64, 64), 2.0, gemms=9, solved_by_rank=0),
        "b": _layer(0, (64, 64), 1.0, gemms=9, solved_by_rank=1),
    }
    assert own_seconds(ddp) == pytest.approx({"a": 2.0, "b": 1.0})
    rows = layer_csv_rows(layers)
    assert [r["own_seconds"] for r in rows] == pytest.approx([2.4, 0.6, 1.5])
    assert rows[0]["is_2of4"] == 1 and rows[0]["d_out"] == 128 and rows[0]["layer"] == "b0.big"


def test_block_line_and_table():
    layers = {
        "m.0.q": _layer(0, (64, 64), 3.0, gemms=9),
        "m.0.k": _layer(0, (64, 64), 3.0, gemms=9, is_2of4=False, capped=True),
    }
    line = format_block_line(0, 2, "m.0", layers)
    assert line == (
        "block 1/2 (m.0): 2 layers, 1 NOT 2:4 (m.0.k), solver 3.00 s, summed local loss 2 "
        "(4 before refinement), 1 forced to 2:4 at max_prox_steps"
    )
    report = {
        "layers": layers,
        "summary": {
            "layers": 2,
            "blocks": 1,
            "sparsity": 0.5,
            "all_2of4": False,
            "loss_final_sum": 2.0,
            "solver_seconds": 3.0,
        },
    }
    table = format_table(report)
    # The s column holds each layer's own share: 1.50 each, not the block's 3.00 twice.
    assert table.count("| 1.50 |") == 2 and "| 3.00 |" not in table
    assert "2 layers in 1 blocks pruned" in table


def test_run_logger_orders_columns_for_a_spreadsheet(tmp_path):
    logger = RunLogger(save_dir=str(tmp_path))
    logger.log_layers(0, {"m.0.q": _layer(0, (64, 64), 1.0, gemms=3)})
    logger.log_metrics({"val/x_ppl": 9.0}, step=3)
    logger.save()
    with open(tmp_path / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["step", "block", "layer", "d_out"] and rows[0][-1] == "val/x_ppl"
    assert rows[1][:3] == ["0", "0", "m.0.q"] and rows[2][0] == "3" and rows[2][2] == ""
    # A second logger on the same folder (a resumed run) appends under the same header.
    again = RunLogger(save_dir=str(tmp_path))
    again.log_layers(1, {"m.1.q": _layer(1, (64, 64), 1.0, gemms=3)})
    with open(tmp_path / "logs" / "metrics.csv", newline="") as f:
        rows2 = list(csv.reader(f))
    assert rows2[:3] == rows and rows2[3][:3] == ["1", "1", "m.1.q"]


def test_quiet_drops_the_library_lines(caplog):
    import logging

    quiet()
    quiet()  # idempotent: one filter per logger
    for name, message in [
        ("lightning.fabric.utilities.seed", "Seed set to 0"),
        ("lightning.pytorch.utilities.rank_zero", "GPU available: False, used: False"),
        ("lightning.pytorch.utilities.rank_zero", "TPU available: False, using: 0 TPU cores"),
        ("lightning.pytorch.utilities.rank_zero", "`Trainer.fit` stopped: `max_epochs=3` reached."),
    ]:
        log = logging.getLogger(name)
        assert len(log.filters) == 1
        with caplog.at_level(logging.INFO, logger=name):
            caplog.clear()
            log.info(message)
        assert not caplog.records, message
    kept = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=kept.name):
        caplog.clear()
        kept.info("`Trainer.fit` stopped: No training batches.")
    assert caplog.records
    from transformers.utils import logging as hf_logging

    assert not hf_logging.is_progress_bar_enabled()
