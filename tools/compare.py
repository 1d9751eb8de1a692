"""Compare every method on one model and one calibration/evaluation set: one table, three plots.

Runs the real pipeline (``prox24 fit --config CONFIG ...``) once per variant, with the config's
calibration and evaluation data, and scores the dense model once with ``prox24 validate``:

========================  ================================================================
``dense``                 the unpruned model (``validate``): perplexity only
``magnitude``, ``wanda``  the baseline alone (``solver.refine_steps 0``)
``sparsegpt``, ``admm``
``alps``
``<baseline>+GD``         the baseline, then masked refinement on its mask (``--refine``,
                          ``--refine-steps``; default: the config's ``solver.refine`` and
                          ``solver.refine_steps``)
``prox``                  the config's prox schedule, prox phase only (``refine_steps 0``)
``prox+GD``               the config's prox schedule (the demo/"fast" recipe), then the same
                          refinement as the baselines' +GD
``prox+GD-paper``         ``RECIPES["paper"]``: lambda0 0.01, beta 1.01, plain proximal
                          gradient until every group is 2:4, then 1000 masked-gradient steps
========================  ================================================================

Every run tokenises the same calibration windows (the data module's token cache); the SHA-256 of
the calibration tokens each run used is read back from its ``sparsity_report.json`` and checked to
be identical across runs.

**One subprocess per variant** (``python tools/compare.py --child RESULT.json fit ...`` calls
``cli_main`` in a fresh interpreter): nothing leaks from one run into the next (global seeds,
torch thread settings, the model cache, Lightning's logging and signal handlers, memory), each
wall time is a clean run's, and a crash in one variant is recorded and the others still run.
The cost is the interpreter and library start-up (a few seconds), negligible next to a real run.

A full run on the demo config takes about an hour on 2 CPU cores, so each variant's result is
written to ``OUT/runs/<variant>.json`` as soon as it finishes and the tables are rewritten;
``--resume`` skips variants whose result exists *for the same settings* (config file content,
``--set`` overrides and the variant's own arguments). A variant interrupted mid-run starts again
from scratch, so that its wall time stays the time of one uninterrupted run.

Outputs in ``OUT`` (default ``docs/compare``): ``results.md`` (reproduction command, table, plots,
the exact ``prox24`` command of every run), ``results.csv``, ``ppl.png``,
``local_loss_per_layer.png``, ``frac_2of4_vs_lambda.png`` and ``runs/*.json``. Pipeline outputs
(checkpoints, masks, exports with ``sparsity_report.json``, logs) go to ``WORK/<variant>``
(default ``outputs/compare``).

Usage::

    python tools/compare.py                                   # all variants, configs/demo.yaml
    python tools/compare.py --resume                          # continue after an interruption
    python tools/compare.py --variants dense wanda wanda+GD --refine cg --refine-steps 30
    python tools/compare.py --dry-run                         # print the plan and the commands
    python tools/compare.py --render-only                     # redraw tables and plots
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prox24_lightning.artifacts import atomic_write, file_sha256

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["VARIANTS", "Variant", "main", "plan_variants", "render"]

#: Every variant, in the order they run and appear in the table.
VARIANTS: tuple[str, ...] = (
    "dense",
    "magnitude",
    "magnitude+GD",
    "wanda",
    "wanda+GD",
    "sparsegpt",
    "sparsegpt+GD",
    "admm",
    "admm+GD",
    "alps",
    "alps+GD",
    "prox",
    "prox+GD",
    "prox+GD-paper",
)
#: Layers whose prox trace is kept in ``runs/*.json``: the first and last layer (in pruning order)
#: of the first, middle and last block.
TRACE_LAYERS_PER_BLOCK = 2

_COLORS = {
    "dense": "black",
    "magnitude": "tab:gray",
    "wanda": "tab:blue",
    "sparsegpt": "tab:orange",
    "admm": "tab:brown",
    "alps": "tab:cyan",
    "prox": "tab:green",
    "prox-paper": "tab:purple",
}


def slug(variant: str) -> str:
    """File-system name of a variant: ``wanda+GD`` -> ``wanda_gd``."""
    return variant.lower().replace("+", "_").replace("-", "_")


def family(variant: str) -> str:
    """Colour family: the method, with the paper recipe separate."""
    return "prox-paper" if variant.endswith("-paper") else variant.split("+")[0]


def refined(variant: str) -> bool:
    return "+GD" in variant


# --------------------------------------------------------------------------------- planning
@dataclass
class Variant:
    """One planned run: its name, its ``prox24`` arguments and where its outputs go."""

    name: str
    args: list[str]  # the prox24 command line (subcommand first), paths absolute
    run_dir: Path
    key: dict[str, Any] = field(default_factory=dict)  # what must match for --resume

    @property
    def slug(self) -> str:
        return slug(self.name)


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return data


def _model_init_args(cfg: dict[str, Any]) -> dict[str, Any]:
    model = cfg.get("model") or {}
    if isinstance(model, dict) and isinstance(model.get("init_args"), dict):
        return model["init_args"]
    return model if isinstance(model, dict) else {}


def config_refinement(cfg: dict[str, Any]) -> tuple[str, int]:
    """The config's refinement mode and steps (``null`` steps: the prox default, 1000)."""
    from prox24_lightning.solvers import make_config

    solver = make_config("prox", _model_init_args(cfg).get("solver") or {})
    steps = solver.refine_steps
    return solver.refine, 1000 if steps is None else int(steps)


def _check_config(cfg: dict[str, Any], path: Path) -> None:
    """Runs must not share output folders: refuse callbacks with a fixed ``dirpath``."""
    for cb in (cfg.get("trainer") or {}).get("callbacks") or []:
        init = cb.get("init_args") if isinstance(cb, dict) else None
        if isinstance(init, dict) and init.get("dirpath"):
            raise ValueError(
                f"{path}: callback {cb.get('class_path')} has a fixed dirpath "
                f"({init['dirpath']}); every variant would write there. Remove it (the default "
                "is below trainer.default_root_dir, which compare.py sets per variant)"
            )


def _path_overrides(cfg: dict[str, Any], run_dir: Path) -> list[str]:
    out = ["--trainer.default_root_dir", str(run_dir)]
    logger = (cfg.get("trainer") or {}).get("logger")
    if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
        out += ["--trainer.logger.init_args.save_dir", str(run_dir)]
    return out


def paper_solver() -> dict[str, Any]:
    """The paper's recipe by name (``RECIPES["paper"]``), replacing the config's solver."""
    return {"recipe": "paper"}


_RESERVED_SETS = ("method", "solver.refine", "solver.refine_steps", "default_root_dir")


def plan_variants(
    config: Path,
    work_dir: Path,
    variants: list[str],
    refine: str,
    refine_steps: int,
    sets: list[str],
) -> list[Variant]:
    """The runs for ``variants`` (in canonical order), each with its ``prox24`` arguments."""
    cfg = _load_yaml(config)
    _check_config(cfg, config)
    extra: list[str] = []
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key = key.removeprefix("--")
        if any(key.endswith(r) for r in _RESERVED_SETS):
            raise ValueError(
                f"--set {key}: compare.py sets the method, refinement and output folder itself "
                "(use --refine / --refine-steps / --work-dir)"
            )
        extra.append(f"--{key}={value}")
    common_key = {  # no absolute paths: results stay valid in another checkout
        "config": _rel(config),
        "config_sha256": file_sha256(config),
        "sets": extra,
    }
    solver = "--model.init_args.solver."
    plans: list[Variant] = []
    for name in [v for v in VARIANTS if v in variants]:
        run_dir = (work_dir / slug(name)).resolve()
        if name == "dense":
            own: list[str] = []
            sub = "validate"
        else:
            sub = "fit"
            method = name.split("+")[0]
            own = ["--model.init_args.method", method]
            if name == "prox+GD-paper":
                # The whole solver as one JSON value, so no key of the config's solver remains.
                own += [f"--model.init_args.solver={json.dumps(paper_solver())}"]
            elif refined(name):
                own += [f"{solver}refine={refine}", f"{solver}refine_steps={refine_steps}"]
            else:
                own += [f"{solver}refine_steps=0"]
            own += ["--evaluate", "after"]
        args = [sub, "--config", str(config.resolve()), *extra, *own]
        args += _path_overrides(cfg, run_dir)
        plans.append(Variant(name, args, run_dir, key={**common_key, "own": own, "sub": sub}))
    return plans


# ------------------------------------------------------------------------------ running
def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def _run_child(variant: Variant, quiet: bool, timeout: float | None = None) -> tuple[int, float]:
    """Run one variant in a fresh interpreter; its output goes to ``run_dir/output.log`` (and to
    this process's stdout unless ``quiet``); killed after ``timeout`` seconds. Returns the exit
    status and the wall time."""
    if variant.run_dir.exists():
        shutil.rmtree(variant.run_dir)
    variant.run_dir.mkdir(parents=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child"]
    cmd += [str(variant.run_dir / "child.json"), *variant.args]
    start = time.perf_counter()
    with open(variant.run_dir / "output.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        watchdog = threading.Timer(timeout, proc.kill) if timeout else None
        if watchdog is not None:
            watchdog.start()
        try:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
                log.write(chunk)
                if not quiet:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            rc = proc.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
    return rc, time.perf_counter() - start


def _child(result_path: str, args: list[str]) -> None:
    """In the subprocess: run the CLI, then record its perplexities and export folder."""
    from prox24_lightning.callbacks import ExportPruned
    from prox24_lightning.cli import cli_main

    start = time.perf_counter()
    cli = cli_main(args)
    seconds = time.perf_counter() - start
    metrics: dict[str, dict[str, float]] = dict(getattr(cli, "_metrics", {}) or {})
    if args[0] == "validate":
        metrics = {
            "dense": {
                k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")
            }
        }
    exports = [str(cb.dirpath) for cb in cli.trainer.callbacks if isinstance(cb, ExportPruned)]
    _write_json(
        Path(result_path),
        {"metrics": metrics, "export_dir": exports[0] if exports else None, "seconds": seconds},
    )


def _selected_trace_layers(layers: dict[str, dict[str, Any]]) -> list[str]:
    blocks = sorted({int(v["block"]) for v in layers.values()})
    if not blocks:
        return []
    picked: list[str] = []
    for b in dict.fromkeys([blocks[0], blocks[len(blocks) // 2], blocks[-1]]):
        names = [n for n, v in layers.items() if int(v["block"]) == b and v.get("trace")]
        for n in dict.fromkeys([names[0], names[-1]] if names else []):
            picked.append(n)
    return picked[: 3 * TRACE_LAYERS_PER_BLOCK]


def collect(variant: Variant, rc: int, wall: float) -> dict[str, Any]:
    """The result record of one finished run (what ``runs/<variant>.json`` holds)."""
    rec: dict[str, Any] = {
        "variant": variant.name,
        "key": variant.key,
        "args": variant.args,
        "returncode": rc,
        "wall_s": wall,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    child_path = variant.run_dir / "child.json"
    child = json.loads(child_path.read_text()) if child_path.exists() else {}
    if rc != 0 or not child:
        rec["error"] = f"exit status {rc}; see {variant.run_dir / 'output.log'}"
        return rec
    rec["run_s"] = child.get("seconds")
    if variant.name == "dense":
        rec["ppl"] = _ppl(child["metrics"].get("dense", {}))
        return rec
    export = Path(child["export_dir"]) if child.get("export_dir") else None
    report_path = export / "sparsity_report.json" if export else None
    if report_path is None or not report_path.exists():
        rec["error"] = f"no sparsity_report.json (export {export})"
        return rec
    report = json.loads(report_path.read_text())
    rec["report"] = str(report_path)
    ppl = (report.get("perplexity") or {}).get("pruned") or child["metrics"].get("pruned", {})
    rec["ppl"] = _ppl(ppl)
    layers: dict[str, dict[str, Any]] = report["layers"]
    summary = report["summary"]
    blocks: dict[int, list[dict[str, Any]]] = {}
    for v in layers.values():
        blocks.setdefault(int(v["block"]), []).append(v)
    data = report.get("data") or {}
    fp = report.get("fingerprint") or {}
    solver = fp.get("solver") or ((report.get("config") or {}).get("model") or {}).get(
        "init_args", {}
    ).get("solver")
    rec.update(
        method=report.get("method"),
        solver=solver,
        calibration_tokens=data.get("calibration_tokens"),
        calibration_sha256=data.get("calibration_tokens_sha256"),
        model=report.get("model"),
        machine=report.get("machine"),
        layers=len(layers),
        all_2of4=bool(summary.get("all_2of4")),
        forced_2of4=len(summary.get("forced_2of4") or []),
        loss_final_sum=float(summary["loss_final_sum"]),
        loss_method_sum=float(sum(v["loss_method"] for v in layers.values())),
        solver_s=float(summary["solver_seconds"]),
        gemms=int(sum(int(v.get("gemms", 0)) for v in layers.values())),
        steps=int(sum(max(int(v.get("gemms", 0)) for v in vs) for vs in blocks.values())),
        iterations_to_2of4=int(sum(int(v.get("iterations_to_2of4", 0)) for v in layers.values())),
        per_layer={
            "name": list(layers),
            "block": [int(v["block"]) for v in layers.values()],
            "loss_method": [float(v["loss_method"]) for v in layers.values()],
            "loss_final": [float(v["loss_final"]) for v in layers.values()],
            "gemms": [int(v.get("gemms", 0)) for v in layers.values()],
        },
        traces={n: layers[n]["trace"] for n in _selected_trace_layers(layers)},
    )
    return rec


def _ppl(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"val/<set>_ppl": x}`` -> ``{"<set>": x}``."""
    out = {}
    for k, v in metrics.items():
        name = k.removeprefix("val/").removesuffix("_ppl")
        out[name] = float(v)
    return out


# ------------------------------------------------------------------------------ rendering
def _load_results(out: Path, plans: list[Variant]) -> tuple[list[dict[str, Any]], list[str]]:
    """Results matching the current settings, in canonical order; and the stale ones' names."""
    rows, stale = [], []
    for p in plans:
        path = out / "runs" / f"{p.slug}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        if rec.get("key") != p.key:
            stale.append(p.name)
            continue
        rows.append(rec)
    return rows, stale


def _rel(path: str | Path) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def _display_args(args: list[str]) -> list[str]:
    out = []
    for a in args:
        if a.startswith("/") and Path(a).is_absolute():
            out.append(_rel(a))
        else:
            out.append(a)
    return out


def _solver_text(name: str, rec: dict[str, Any]) -> str:
    """Short description of the variant's solver settings."""
    s = rec.get("solver") or {}
    if not isinstance(s, dict) or not s:
        return ""
    ref = f"{str(s.get('refine', '')).upper()} {s.get('refine_steps')}"
    if not name.startswith("prox"):
        return ref if refined(name) else "none"
    scale = " / RMS(W̃)" if s.get("lambda_scale") == "rms" else ""
    warm = s.get("warm_start") or "none"
    if warm != "none":  # no prox phase: its schedule does not apply
        parts = [f"{warm} warm start"]
    elif s.get("prox_solver") == "admm":
        parts = [f"ADMM prox phase, λ0 {s.get('lambda0'):g}{scale}, β {s.get('beta'):g}"]
    else:
        parts = [f"λ0 {s.get('lambda0'):g}{scale}, β {s.get('beta'):g}"]
        if s.get("momentum"):
            parts.append(f"momentum {s['momentum']:g}")
        if s.get("beta_tail"):
            parts.append(f"β_tail {s['beta_tail']:g} from {s.get('tail_from'):g}")
        if s.get("switch_at", 1.0) < 1.0:
            parts.append(f"switch at {s['switch_at']:g}")
    if s.get("mask_search_rounds"):
        parts.append(
            f"mask search {s['mask_search_rounds']} rounds x {s.get('mask_search_swaps')} moves"
            + (f", ridge {s['mask_search_ridge']:g}" if s.get("mask_search_ridge") else "")
        )
    if s.get("ridge"):
        parts.append(f"ridge {s['ridge']:g}")
    parts.append(ref if s.get("refine_steps") else "no refinement")
    return "; ".join(parts)


def _num(x: Any, fmt: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "" if x is None else str(x)
    return format(x, fmt)


def _eval_sets(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rows for k in (r.get("ppl") or {})})


CSV_FIELDS = (
    "variant",
    "method",
    "solver",
    "loss_final_sum",
    "loss_method_sum",
    "wall_s",
    "solver_s",
    "steps",
    "gemms",
    "iterations_to_2of4",
    "layers",
    "all_2of4",
    "forced_2of4",
    "calibration_sha256",
    "error",
)


def _write_csv(out: Path, rows: list[dict[str, Any]], sets: list[str]) -> None:
    buf = io.StringIO()
    fields = ["variant", *[f"ppl_{s}" for s in sets], *CSV_FIELDS[1:]]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        row = {k: r.get(k, "") for k in CSV_FIELDS}
        row["solver"] = _solver_text(r["variant"], r) if r["variant"] != "dense" else ""
        for s in sets:
            row[f"ppl_{s}"] = (r.get("ppl") or {}).get(s, "")
        w.writerow(row)
    _write_text(out / "results.csv", buf.getvalue())


def reproduction_command(opts: argparse.Namespace, variants: list[str]) -> str:
    cmd = ["python", "tools/compare.py", "--config", _rel(opts.config)]
    cmd += ["--out", _rel(opts.out), "--work-dir", _rel(opts.work_dir)]
    cmd += ["--refine", opts.refine, "--refine-steps", str(opts.refine_steps)]
    if list(variants) != list(VARIANTS):
        cmd += ["--variants", *variants]
    for s in opts.set or []:
        cmd += ["--set", s]
    return shlex.join(cmd)


def _write_markdown(
    out: Path,
    opts: argparse.Namespace,
    rows: list[dict[str, Any]],
    sets: list[str],
    stale: list[str],
    plots: list[str],
) -> None:
    names = [r["variant"] for r in rows]
    lines = ["# Method comparison", ""]
    lines += [
        "Reproduce (add `--resume` to continue an interrupted run):",
        "",
        "```bash",
        reproduction_command(opts, names),
        "```",
        "",
    ]
    fits = [r for r in rows if r["variant"] != "dense" and "error" not in r]
    if fits:
        model = fits[0].get("model")
        hashes = {r.get("calibration_sha256") for r in fits}
        shape = fits[0].get("calibration_tokens")
        lines.append(f"Model `{model}`; config `{_rel(opts.config)}`.")
        machine = fits[0].get("machine") or {}
        if machine:
            gpus = ", ".join(machine.get("cuda_devices") or []) or "no GPU"
            lines.append(
                f"Machine: {machine.get('platform')}, {machine.get('torch_threads')} torch "
                f"threads, {gpus}; runs finished {min(r['finished'] for r in rows)} to "
                f"{max(r['finished'] for r in rows)}."
            )
        if len(hashes) == 1:
            lines.append(
                f"Calibration tokens {shape}, SHA-256 `{next(iter(hashes))}`: identical in all "
                f"{len(fits)} pruning runs (read back from each run's `sparsity_report.json`)."
            )
        else:
            lines.append(
                "**WARNING: the calibration tokens differ between runs** (see the "
                "`calibration_sha256` column of results.csv); the runs are not comparable."
            )
    if sets:
        lines.append(f"Perplexity on every evaluation set of the config: {', '.join(sets)}.")
    lines.append(
        f"+GD for the baselines and prox+GD: {opts.refine.upper()} {opts.refine_steps} steps of "
        "masked refinement on the method's fixed mask (`--refine`, `--refine-steps`); "
        'prox+GD-paper: `RECIPES["paper"]`.'
    )
    lines.append("")
    head = ["variant", *[f"ppl {s}" for s in sets], "solver settings", "Σ local loss"]
    head += ["Σ loss before refinement", "wall s", "solver s", "solver steps", "GEMMs"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        ppl = r.get("ppl") or {}
        if "error" in r:
            cells = [r["variant"], *["" for _ in sets], f"FAILED: {r['error']}"]
            cells += [""] * (len(head) - len(cells))
        else:
            dense = r["variant"] == "dense"
            cells = [
                r["variant"],
                *[_num(ppl.get(s), ".3f") for s in sets],
                "" if dense else _solver_text(r["variant"], r),
                _num(r.get("loss_final_sum"), ".4g"),
                _num(r.get("loss_method_sum"), ".4g"),
                _num(r.get("wall_s"), ".0f"),
                _num(r.get("solver_s"), ".1f"),
                _num(r.get("steps"), "d"),
                _num(r.get("gemms"), "d"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Columns: *Σ local loss* is `tr((W-Ŵ)H(W-Ŵ)ᵀ)` summed over all pruned layers, after "
        "refinement; *before refinement* is the same right after the method (its mask and "
        "weights). With `propagation: pruned` each method's Grams `H` beyond the first block come "
        "from its own pruned blocks, so local losses of different methods are measured on "
        "slightly different `H`. *wall s*: the whole `prox24` run (start-up, calibration, "
        "solving, export, evaluation); *solver s*: the summed per-block solve time of the report; "
        "*solver steps*: optimizer steps (the layers of a block step in lockstep: sum over blocks "
        "of the block's largest per-layer count); *GEMMs*: per-layer `W H̃` products summed over "
        "layers (prox iterations + refinement steps; the baselines' own work, e.g. SparseGPT's "
        "OBS updates, is not counted).",
        "",
    ]
    if stale:
        lines.append(
            f"Results ignored because their settings differ from this command: {', '.join(stale)}."
        )
        lines.append("")
    captions = {
        "ppl.png": "Perplexity per variant (dashed: the dense model)",
        "local_loss_per_layer.png": "Local loss per block (summed over its layers)",
        "frac_2of4_vs_lambda.png": "Fraction of 2:4 groups against lambda during the prox phase",
    }
    for p in plots:
        lines += [f"![{captions.get(p, p)}]({p})", ""]
    lines += ["## Commands of the runs", ""]
    for r in rows:
        lines.append(f"* {r['variant']}: `prox24 {shlex.join(_display_args(r['args']))}`")
    _write_text(out / "results.md", "\n".join(lines) + "\n")


def _style(variant: str) -> dict[str, Any]:
    return {
        "color": _COLORS.get(family(variant), "tab:red"),
        "linestyle": "-" if refined(variant) else "--",
    }


#: Plots are committed with the tables: keep each PNG below this many bytes (lower dpi if not).
MAX_PNG_BYTES = 100_000


def _save(fig: Any, path: Path) -> None:
    for dpi in (90, 75, 60, 50):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, pil_kwargs={"optimize": True})
        if buf.tell() < MAX_PNG_BYTES:
            break
    with atomic_write(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _plot_ppl(out: Path, rows: list[dict[str, Any]], sets: list[str], plt: Any) -> bool:
    pruned = [r for r in rows if r["variant"] != "dense" and r.get("ppl")]
    dense = next((r for r in rows if r["variant"] == "dense" and r.get("ppl")), None)
    if not pruned or not sets:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(pruned) + 2.5), 4.2))
    width = 0.8 / len(sets)
    values = []
    for j, s in enumerate(sets):
        xs = [i + (j - (len(sets) - 1) / 2) * width for i in range(len(pruned))]
        ys = [(r["ppl"] or {}).get(s, float("nan")) for r in pruned]
        values += [y for y in ys if math.isfinite(y)]
        colors = [_COLORS.get(family(r["variant"]), "tab:red") for r in pruned]
        bars = ax.bar(xs, ys, width=width * 0.95, color=colors, alpha=1.0 - 0.35 * j)
        for b, r in zip(bars, pruned, strict=True):
            if not refined(r["variant"]):
                b.set_hatch("//")
        for x, y in zip(xs, ys, strict=True):
            if math.isfinite(y):
                ax.annotate(f"{y:.1f}", (x, y), ha="center", va="bottom", fontsize=7)
        if dense is not None and s in dense["ppl"]:
            d = dense["ppl"][s]
            values.append(d)
            ax.axhline(d, color="black", linestyle=("--", ":", "-.")[j % 3], linewidth=1)
            ax.annotate(
                f"dense {s}: {d:.2f}",
                (-0.5, d),
                xytext=(2, 2 + 10 * j),
                textcoords="offset points",
                ha="left",
                va="bottom",
                fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
            )
    if values and max(values) / max(min(values), 1e-12) > 20:
        ax.set_yscale("log")
    ax.margins(y=0.12)
    ax.set_xticks(range(len(pruned)))
    ax.set_xticklabels([r["variant"] for r in pruned], rotation=30, ha="right", fontsize=8)
    label = "perplexity" + (
        f" ({', '.join(sets)}; lighter bars: later sets)" if len(sets) > 1 else f" ({sets[0]})"
    )
    ax.set_ylabel(label, fontsize=8)
    ax.set_title("Perplexity after 2:4 pruning (hatched: no refinement)", fontsize=10)
    fig.tight_layout()
    _save(fig, out / "ppl.png")
    plt.close(fig)
    return True


def _plot_local_loss(out: Path, rows: list[dict[str, Any]], plt: Any) -> bool:
    from matplotlib.ticker import MaxNLocator

    pruned = [r for r in rows if r.get("per_layer")]
    if not pruned:
        return False
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for r in pruned:
        pl = r["per_layer"]
        per_block: dict[int, float] = {}
        for b, loss in zip(pl["block"], pl["loss_final"], strict=True):
            per_block[b] = per_block.get(b, 0.0) + loss
        xs = sorted(per_block)
        ax.plot(
            xs,
            [max(per_block[x], 1e-30) for x in xs],
            marker="o",
            markersize=3,
            label=r["variant"],
            **_style(r["variant"]),
        )
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("local loss tr((W-Ŵ)H(W-Ŵ)ᵀ), summed over the block's layers", fontsize=8)
    ax.set_title("Local loss per block (dashed: no refinement)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    _save(fig, out / "local_loss_per_layer.png")
    plt.close(fig)
    return True


def _plot_traces(out: Path, rows: list[dict[str, Any]], plt: Any) -> bool:
    runs = [r for r in rows if r.get("traces") and r["variant"] in ("prox+GD", "prox+GD-paper")]
    if not runs:  # the prox-only run has the same prox phase as prox+GD
        runs = [r for r in rows if r.get("traces")]
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    names = list(dict.fromkeys(n for r in runs for n in r["traces"]))
    cmap = plt.get_cmap("tab10")
    styles = ("-", "--", ":", "-.")
    for i, r in enumerate(runs):
        for j, n in enumerate(names):
            rows_ = r["traces"].get(n)
            if not rows_:
                continue
            lam = [row[1] for row in rows_]
            frac = [row[2] for row in rows_]
            ax.plot(
                lam,
                frac,
                color=cmap(j % 10),
                linestyle=styles[i % len(styles)],
                marker=".",
                markersize=3,
                label=f"{n} ({r['variant']})",
            )
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("lambda (λ_k of the prox schedule)")
    ax.set_ylabel("fraction of groups with ≤ 2 non-zeros")
    style_names = ("solid", "dashed", "dotted", "dash-dot")
    styles_text = ", ".join(f"{style_names[i % 4]}: {r['variant']}" for i, r in enumerate(runs))
    ax.set_title(f"Prox phase: 2:4 groups vs lambda ({styles_text})", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    _save(fig, out / "frac_2of4_vs_lambda.png")
    plt.close(fig)
    return True


def render(out: Path, opts: argparse.Namespace, plans: list[Variant], plots: bool = True) -> None:
    """Rewrite results.md and results.csv (and the plots) from ``OUT/runs/*.json``."""
    rows, stale = _load_results(out, plans)
    sets = _eval_sets(rows)
    _write_csv(out, rows, sets)
    drawn: list[str] = []
    if plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if _plot_ppl(out, rows, sets, plt):
            drawn.append("ppl.png")
        if _plot_local_loss(out, rows, plt):
            drawn.append("local_loss_per_layer.png")
        if _plot_traces(out, rows, plt):
            drawn.append("frac_2of4_vs_lambda.png")
    else:
        drawn = [
            p
            for p in ("ppl.png", "local_loss_per_layer.png", "frac_2of4_vs_lambda.png")
            if (out / p).exists()
        ]
    _write_markdown(out, opts, rows, sets, stale, drawn)


# ----------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "compare", help="tables, plots")
    ap.add_argument(
        "--work-dir", type=Path, default=ROOT / "outputs" / "compare", help="pipeline outputs"
    )
    ap.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
        help=f"subset to run: {' '.join(VARIANTS)}",
    )  # fmt: skip
    ap.add_argument("--refine", choices=("cg", "gd"), help="+GD mode (default: the config's)")
    ap.add_argument("--refine-steps", type=int, help="+GD steps (default: the config's)")
    ap.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="extra prox24 override for every run, e.g. data.nsamples=16 (repeatable)",
    )  # fmt: skip
    ap.add_argument("--resume", action="store_true", help="skip variants already done")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--render-only", action="store_true", help="redraw from OUT/runs/*.json")
    ap.add_argument("--quiet", action="store_true", help="runs' output only to their log files")
    ap.add_argument("--timeout", type=float, help="kill a run after this many seconds")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[2:])
        return 0
    opts = _parser().parse_args(argv)
    cfg = _load_yaml(opts.config)
    mode, steps = config_refinement(cfg)
    opts.refine = opts.refine or mode
    opts.refine_steps = steps if opts.refine_steps is None else opts.refine_steps
    if opts.refine_steps <= 0:
        raise SystemExit("--refine-steps must be > 0 (the variants without +GD have no refinement)")
    all_plans = plan_variants(
        opts.config, opts.work_dir, list(VARIANTS), opts.refine, opts.refine_steps, opts.set or []
    )
    out: Path = opts.out
    if opts.render_only:
        render(out, opts, all_plans)
        print(f"rendered {out / 'results.md'}")
        return 0
    todo = [p for p in all_plans if p.name in opts.variants]
    done, _ = _load_results(out, todo)
    finished = {r["variant"] for r in done if "error" not in r}
    failed: list[str] = []
    print(f"+GD: {opts.refine.upper()} {opts.refine_steps} steps; outputs in {out}")
    for p in todo:
        if opts.resume and p.name in finished:
            print(f"[compare] {p.name}: done already, skipped (--resume)")
            continue
        shown = shlex.join(["prox24", *_display_args(p.args)])
        if opts.dry_run:
            print(f"[compare] {p.name}: would run {shown}")
            continue
        print(f"[compare] {p.name}: {shown}", flush=True)
        rc, wall = _run_child(p, opts.quiet, opts.timeout)
        rec = collect(p, rc, wall)
        _write_json(out / "runs" / f"{p.slug}.json", rec)
        if "error" in rec:
            failed.append(p.name)
            print(f"[compare] {p.name}: FAILED ({rec['error']})", flush=True)
        else:
            print(f"[compare] {p.name}: {wall:.0f} s, perplexity {rec.get('ppl')}", flush=True)
        render(out, opts, all_plans, plots=False)
    if opts.dry_run:
        return 0
    render(out, opts, all_plans)
    print(f"[compare] wrote {out / 'results.md'}")
    if failed:
        print(f"[compare] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
