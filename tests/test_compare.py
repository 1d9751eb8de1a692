"""``tools/compare.py`` end to end on a tiny llama (real ``prox24`` runs in subprocesses), its
rendering on synthetic results, and the prox-phase trace it plots."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import compare  # noqa: E402
from helpers import random_words  # noqa: E402

from prox24_lightning.solvers import RECIPES, make_config, prune_weight  # noqa: E402
from prox24_lightning.solvers.layer import TRACE_MAX_ROWS  # noqa: E402
from prox24_lightning.testing import save_tiny_model  # noqa: E402

#: Three runs (each a subprocess paying ~6 s of imports); the dense ``validate`` path is tested
#: in-process below.
VARIANTS = ["wanda", "wanda+GD", "prox+GD"]


def _config(root: Path) -> Path:
    """A demo.yaml look-alike: tiny llama, local text files, a quick prox schedule, CG 10."""
    rng = random.Random(0)
    train, held_out = root / "train.txt", root / "eval.txt"
    train.write_text(random_words(rng, 4000))
    held_out.write_text(random_words(rng, 2000))
    model = save_tiny_model(root / "model", "llama", num_layers=2)
    cfg = root / "config.yaml"
    cfg.write_text(
        f"""seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_epochs: -1
  num_sanity_val_steps: 0
  check_val_every_n_epoch: 1000000
  default_root_dir: {root}/not_used
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}/not_used}}
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: prox24_lightning.callbacks.MaskCheckpoint
    - class_path: prox24_lightning.callbacks.BlockCheckpoint
      init_args: {{save_last: true, save_top_k: 0, save_on_train_epoch_end: true}}
    - class_path: prox24_lightning.callbacks.ExportPruned
      init_args: {{overwrite: true, print_table: false}}
model:
  class_path: prox24_lightning.pruner.BlockwisePruner
  init_args:
    model_name_or_path: {model}
    method: prox
    dtype: float32
    solver: {{recipe: paper, lambda0: 0.05, beta: 1.3, momentum: 0.9, refine: cg, refine_steps: 10}}
data:
  calibration: {{name: text, path: {train}}}
  calibration_mode: packed
  nsamples: 4
  seqlen: 32
  batch_size: 2
  validation:  # two sets: a metric created after the first log must still be found
    held_out: {{name: text, path: {held_out}}}
    second: {{name: text, path: {train}}}
  eval_seqlen: 32
  max_eval_windows: 2
  eval_batch_size: 2
  cache_dir: {root}/cache
"""
    )
    return cfg


def _argv(cfg: Path, out: Path, work: Path, *extra: str) -> list[str]:
    return [
        "--config", str(cfg), "--out", str(out), "--work-dir", str(work),
        "--variants", *VARIANTS, "--quiet", "--timeout", "300", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    cfg = _config(root)
    out, work = root / "out", root / "work"
    assert compare.main(_argv(cfg, out, work)) == 0
    return cfg, out, work


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return {r["variant"]: r for r in csv.DictReader(f)}


def test_compare_writes_table_and_plots(compared):
    cfg, out, work = compared
    rows = _rows(out)
    assert list(rows) == VARIANTS
    for name, r in rows.items():
        assert not r["error"], (name, r["error"])
        for col in ("ppl_held_out", "ppl_second"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 1, (name, col)
    for name in ("wanda", "wanda+GD", "prox+GD"):
        assert rows[name]["all_2of4"] == "True" and int(rows[name]["layers"]) == 14
    # +GD never loses to its method: across the runs, and within the run before/after refinement.
    assert float(rows["wanda+GD"]["loss_final_sum"]) <= float(rows["wanda"]["loss_final_sum"])
    for name in ("wanda+GD", "prox+GD"):
        assert float(rows[name]["loss_final_sum"]) <= float(rows[name]["loss_method_sum"])
    assert int(rows["wanda"]["gemms"]) == 0
    assert int(rows["wanda+GD"]["steps"]) == 2 * 10  # CG 10 per block, 2 blocks
    assert int(rows["prox+GD"]["gemms"]) > int(rows["wanda+GD"]["gemms"])
    # The same calibration tokens in every pruning run, as each report recorded them.
    hashes = {rows[n]["calibration_sha256"] for n in ("wanda", "wanda+GD", "prox+GD")}
    assert len(hashes) == 1 and len(next(iter(hashes))) == 64
    report = json.loads((work / "prox_gd" / "export" / "sparsity_report.json").read_text())
    assert report["data"]["calibration_tokens_sha256"] in hashes
    # The report carries the prox-phase trace of every layer.
    for layer in report["layers"].values():
        trace = layer["trace"]
        assert trace[0][0] == 1 and trace[-1][0] == layer["iterations_to_2of4"]
        assert trace[-1][2] == 1.0 and all(
            a[1] <= b[1] for a, b in zip(trace, trace[1:], strict=False)
        )
    wanda = json.loads((work / "wanda" / "export" / "sparsity_report.json").read_text())
    assert all("trace" not in v for v in wanda["layers"].values())
    for png in ("ppl.png", "local_loss_per_layer.png", "frac_2of4_vs_lambda.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1000 < len(data) < 100_000, png
    md = (out / "results.md").read_text()
    head = md.split("```bash\n", 1)[1].split("\n", 1)[0]
    assert head.startswith("python tools/compare.py --config ") and "--refine cg" in head
    assert "--refine-steps 10" in head and "--variants wanda wanda+GD prox+GD" in head
    assert "identical in all 3 pruning runs" in md
    assert "| wanda+GD |" in md and "CG 10" in md
    assert "prox24 fit --config" in md and "--model.init_args.method wanda" in md


def test_resume_skips_finished_variants(compared, monkeypatch, capsys):
    cfg, out, work = compared
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}

    def no_run(*args, **kwargs):
        raise AssertionError("--resume ran a finished variant again")

    monkeypatch.setattr(compare, "_run_child", no_run)
    assert compare.main(_argv(cfg, out, work, "--resume")) == 0
    text = capsys.readouterr().out
    assert text.count("skipped (--resume)") == len(VARIANTS)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == before
    assert list(_rows(out)) == VARIANTS
    # Other refinement settings make the +GD results stale: they would run again, the rest not.
    assert compare.main(_argv(cfg, out, work, "--resume", "--dry-run", "--refine-steps", "5")) == 0
    text = capsys.readouterr().out
    assert "wanda+GD: would run" in text and "prox+GD: would run" in text
    assert "wanda: done already" in text


def test_dense_run_records_perplexity_of_every_eval_set(compared, tmp_path):
    """The ``dense`` variant's child (``prox24 validate``), in-process: perplexities recorded."""
    cfg, _, _ = compared
    plan = compare.plan_variants(cfg, tmp_path / "work", ["dense"], "cg", 10, [])[0]
    assert plan.args[0] == "validate"
    plan.run_dir.mkdir(parents=True)
    compare._child(str(plan.run_dir / "child.json"), plan.args)
    rec = compare.collect(plan, 0, 1.0)
    assert "error" not in rec and set(rec["ppl"]) == {"held_out", "second"}
    assert math.isfinite(rec["ppl"]["held_out"]) and rec["ppl"]["held_out"] > 1


def test_plan_of_every_variant(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "trainer:\n  logger: false\nmodel:\n  init_args:\n    model_name_or_path: m\n"
        "    solver: {refine: cg, refine_steps: 30}\n"
    )
    assert compare.config_refinement(compare._load_yaml(cfg)) == ("cg", 30)
    plans = {
        p.name: p
        for p in compare.plan_variants(cfg, tmp_path / "w", list(compare.VARIANTS), "gd", 7, [])
    }
    assert list(plans) == list(compare.VARIANTS)
    assert plans["dense"].args[0] == "validate"
    assert "--model.init_args.solver.refine_steps=0" in plans["sparsegpt"].args
    assert "--model.init_args.solver.refine_steps=7" in plans["magnitude+GD"].args
    assert "--model.init_args.solver.refine=gd" in plans["prox+GD"].args
    for name in ("alps", "admm"):  # the stronger one-shot methods, alone and +GD
        assert plans[name].args[plans[name].args.index("--model.init_args.method") + 1] == name
        assert "--model.init_args.solver.refine_steps=0" in plans[name].args
        assert "--model.init_args.solver.refine_steps=7" in plans[f"{name}+GD"].args
    paper = [a for a in plans["prox+GD-paper"].args if a.startswith("--model.init_args.solver=")]
    solver = make_config("prox", json.loads(paper[0].split("=", 1)[1]))
    assert solver.beta == 1.01 and solver.refine_steps == 1000 and solver.refine == "gd"
    assert solver == RECIPES["paper"]
    assert len({p.run_dir for p in plans.values()}) == len(plans)
    with pytest.raises(ValueError, match="--refine"):
        compare.plan_variants(cfg, tmp_path, ["wanda"], "cg", 5, ["model.init_args.method=prox"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n    - class_path: x.ExportPruned\n      init_args: {dirpath: /e}\n"
    )
    with pytest.raises(ValueError, match="fixed dirpath"):
        compare.plan_variants(bad, tmp_path, ["wanda"], "cg", 5, [])


def _record(variant: str, ppl: dict[str, float], loss: float, **extra) -> dict:
    blocks = [0, 0, 1, 1]
    return {
        "variant": variant,
        "finished": "2025-01-01 00:00:00",
        "args": ["fit", "--config", "/x/c.yaml"],
        "wall_s": 10.0,
        "ppl": ppl,
        "solver": {"refine": "cg", "refine_steps": 30, "lambda0": 0.01, "beta": 1.1},
        "loss_final_sum": loss,
        "loss_method_sum": 2 * loss,
        "solver_s": 1.0,
        "steps": 60,
        "gemms": 240,
        "calibration_sha256": "ab" * 32,
        "calibration_tokens": [32, 256],
        "per_layer": {
            "name": [f"l{i}" for i in range(4)],
            "block": blocks,
            "loss_method": [2 * loss / 4] * 4,
            "loss_final": [loss / 4] * 4,
            "gemms": [60] * 4,
        },
        **extra,
    }


def test_render_two_eval_sets_failed_run_and_stale_result(tmp_path):
    """Rendering alone, on synthetic results: a column per evaluation set, a failed run in the
    table, a result of other settings ignored, plots small and non-empty."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  init_args:\n    solver: {refine: cg, refine_steps: 30}\n")
    opts = compare._parser().parse_args(["--config", str(cfg), "--out", str(tmp_path / "o")])
    opts.refine, opts.refine_steps = "cg", 30
    plans = compare.plan_variants(cfg, tmp_path / "w", list(compare.VARIANTS), "cg", 30, [])
    by = {p.name: p for p in plans}
    trace = [[1, 0.01, 0.1], [20, 0.1, 0.6], [40, 1.0, 1.0]]
    records = {
        "dense": {"variant": "dense", "finished": "2025-01-01", "args": ["validate"], "wall_s": 5,
                  "ppl": {"c4": 8.0, "wikitext2": 6.0}},
        "wanda": _record("wanda", {"c4": 30.0, "wikitext2": 20.0}, 100.0),
        "wanda+GD": _record("wanda+GD", {"c4": 20.0, "wikitext2": 15.0}, 50.0),
        "prox+GD": _record("prox+GD", {"c4": 15.0, "wikitext2": 12.0}, 40.0,
                           traces={"l0": trace, "l3": trace}),
        "sparsegpt": {"variant": "sparsegpt", "finished": "2025-01-01", "args": ["fit"],
                      "error": "exit status 1"},
    }  # fmt: skip
    for name, rec in records.items():
        rec["key"] = by[name].key
        compare._write_json(tmp_path / "o" / "runs" / f"{by[name].slug}.json", rec)
    stale = dict(records["wanda"], variant="magnitude", key={"other": 1})
    compare._write_json(tmp_path / "o" / "runs" / "magnitude.json", stale)
    compare.render(tmp_path / "o", opts, plans)
    out = tmp_path / "o"
    rows = _rows(out)
    assert list(rows) == ["dense", "wanda", "wanda+GD", "sparsegpt", "prox+GD"]
    assert rows["prox+GD"]["ppl_c4"] == "15.0" and rows["prox+GD"]["ppl_wikitext2"] == "12.0"
    assert rows["sparsegpt"]["error"] == "exit status 1"
    md = (out / "results.md").read_text()
    assert "| variant | ppl c4 | ppl wikitext2 |" in md and "FAILED: exit status 1" in md
    assert "settings differ from this command: magnitude" in md
    for png in ("ppl.png", "local_loss_per_layer.png", "frac_2of4_vs_lambda.png"):
        assert 1000 < (out / png).stat().st_size < 100_000, png
        assert f"]({png})" in md


def test_prox_trace_in_stats():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    w = torch.randn(16, 32, generator=g)
    res = prune_weight(w, x.T @ x, "prox", config=RECIPES["paper"], refine_steps=5)
    trace = res.stats.extra["trace"]
    assert 3 <= len(trace) <= TRACE_MAX_ROWS + 1
    assert trace[0][0] == 1 and trace[-1][0] == res.stats.iterations_to_2of4
    assert trace[-1][1] == pytest.approx(res.stats.final_lambda) and trace[-1][2] == 1.0
    steps = [r[0] for r in trace]
    assert steps == sorted(set(steps))
    # Rows are kept where frac_2of4 or lambda moved enough: far fewer than the prox steps.
    assert len(trace) < res.stats.iterations_to_2of4 / 4
    assert "trace" not in prune_weight(w, x.T @ x, "wanda").stats.extra


def test_solver_column_names_the_warm_start_the_search_and_its_ridge():
    search = dataclasses.asdict(RECIPES["search"])
    text = compare._solver_text("prox+GD", {"solver": search})
    assert "β 1.1" in text and "mask search 6 rounds x 16 moves;" in text
    ridged = compare._solver_text("prox+GD", {"solver": {**search, "mask_search_ridge": 0.01}})
    assert "mask search 6 rounds x 16 moves, ridge 0.01;" in ridged
    best = compare._solver_text("prox+GD", {"solver": dataclasses.asdict(RECIPES["best"])})
    assert best.startswith("alps warm start;") and "β" not in best
    assert compare._solver_text("wanda+GD", {"solver": search}) == "CG 20"
    default = compare._solver_text("prox+GD", {"solver": dataclasses.asdict(RECIPES["default"])})
    assert default.startswith("ADMM prox phase, λ0 0.03 / RMS(W̃), β 1.45")
    assert default.endswith("ridge 0.005; CG 10")
