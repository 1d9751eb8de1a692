"""The reports of a run: ``sparsity_report.json`` of a pruning or finetuning run, the console
table, and the provenance they record (library versions, machine, data files and hashes).

Plain Python on top of the trainer's and module's public attributes; no Lightning import.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .ops.masks import is_2of4

__all__ = [
    "LAYER_COLUMNS",
    "block_metrics",
    "block_seconds",
    "build_finetune_report",
    "build_report",
    "evaluated_sets",
    "evaluation_data",
    "format_block_line",
    "format_summary",
    "format_table",
    "layer_csv_rows",
    "library_versions",
    "machine_info",
    "own_seconds",
]


def library_versions() -> dict[str, str]:
    import datasets
    import lightning
    import numpy
    import safetensors
    import tokenizers
    import torchmetrics
    import transformers

    from . import __version__

    return {
        "prox24_lightning": __version__,
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "datasets": datasets.__version__,
        "torchmetrics": torchmetrics.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def machine_info() -> dict[str, Any]:
    """Where the run happened: bit-identical results are promised on the same machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_devices"] = [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ]
    return info


_DATA_KEYS = (
    "tokenizer_name",
    "calibration",
    "calibration_mode",
    "nsamples",
    "seqlen",
    "seed",
    "batch_size",
    "bos",  # the setting (auto / always / never)
    "bos_prepended",  # what it resolved to for this tokenizer: BOS first in every window
)
#: The evaluation settings: recorded only with the evaluations that ran (:func:`evaluation_data`),
#: so a report never names a WikiText2 or C4 set that was configured by default but not scored.
_EVAL_KEYS = ("eval_seqlen", "max_eval_windows", "eval_batch_size")


def _plain(value: Any) -> Any:
    """A data setting as JSON-ready values (dataclasses, and mappings of them, as dicts)."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, dict):
        return {k: asdict(v) if is_dataclass(v) else v for k, v in value.items()}
    return value


def _provenance(sources: dict[str, Any]) -> dict[str, Any]:
    """What each source read: local files with their SHA-256, or the hub dataset."""
    from .data import source_provenance

    files: dict[str, Any] = {}
    for name, src in sources.items():
        try:
            files[name] = source_provenance(src)
        except (OSError, ValueError) as err:  # a source that vanished after the run read it
            files[name] = {"error": str(err)}
    return files


def _data_report(dm: Any) -> dict[str, Any]:
    """The data settings, and what the calibration source read; plus a hash of the calibration
    tokens actually used. Evaluation sets are added once they have run (:func:`evaluation_data`)."""
    data: dict[str, Any] = {key: _plain(getattr(dm, key)) for key in _DATA_KEYS if hasattr(dm, key)}
    calibration = getattr(dm, "calibration", None)
    data["files"] = _provenance({"calibration": calibration} if calibration is not None else {})
    tokens = getattr(dm, "calibration_data", None)
    if isinstance(tokens, Tensor):
        data["calibration_tokens"] = list(tokens.shape)
        data["calibration_tokens_sha256"] = hashlib.sha256(
            tokens.contiguous().cpu().numpy().tobytes()
        ).hexdigest()
    return data


def evaluated_sets(perplexity: dict[str, dict[str, float]]) -> list[str]:
    """The evaluation sets that were scored, from the metrics of the ``--evaluate`` passes
    (``{label: {"val/<set>_ppl": value}}``), in first-seen order."""
    names: dict[str, None] = {}
    for metrics in perplexity.values():
        for key in metrics:
            if key.startswith("val/") and key.endswith("_ppl"):
                names[key[len("val/") : -len("_ppl")]] = None
    return list(names)


def evaluation_data(dm: Any, names: list[str]) -> dict[str, Any]:
    """The report's ``data`` entries of the evaluations that ran: the sets ``names`` (those of
    the data module's ``validation`` that were scored), the evaluation settings and what each
    set read. Empty when nothing ran."""
    configured = getattr(dm, "validation", None) or {}
    ran = {name: configured[name] for name in names if name in configured}
    if not ran:
        return {}
    data: dict[str, Any] = {"validation": _plain(ran)}
    data.update({key: _plain(getattr(dm, key)) for key in _EVAL_KEYS if hasattr(dm, key)})
    data["files"] = _provenance({f"validation/{name}": src for name, src in ran.items()})
    return data


def own_seconds(layers: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each layer's own share of its block's solver time.

    The layers of a block are solved in lockstep (one optimizer step advances all of them), so
    the wall time the solver records per layer (``seconds``) runs from the start of the block's
    solves to the layer's result: it overlaps its neighbours' and says little about the layer.
    Here each rank's solver time for the block (its largest ``seconds``) is split among the
    layers it solved in proportion to their work: one ``d_out x d_in`` by ``d_in x d_in`` GEMM
    per counted ``gemms``, plus one for the layer's own set-up (normalisation, losses, a
    one-shot method). The shares of a block sum to its solver time (per rank under DDP).
    """
    groups: dict[tuple[int, Any], list[str]] = {}
    for name, v in layers.items():
        groups.setdefault((int(v["block"]), v.get("solved_by_rank")), []).append(name)
    shares: dict[str, float] = {}
    for names in groups.values():
        span = max(float(layers[n]["seconds"]) for n in names)
        work = {n: _gemm_work(layers[n]) for n in names}
        total = sum(work.values())
        for n in names:
            shares[n] = span * work[n] / total if total > 0 else span / len(names)
    return shares


def _gemm_work(v: dict[str, Any]) -> float:
    d_out, d_in = v["shape"]
    return (int(v.get("gemms", 0) or 0) + 1) * float(d_out) * float(d_in) ** 2


def block_seconds(layers: dict[str, dict[str, Any]]) -> float:
    """A block's solver time: the largest per-layer wall time (the solves run together)."""
    return max((float(v["seconds"]) for v in layers.values()), default=0.0)


def format_block_line(
    index: int, num_blocks: int, name: str, layers: dict[str, dict[str, Any]]
) -> str:
    """The console line of a finished block (its layers' report rows): layers, 2:4 status,
    solver time and the summed local loss (with the method's, before refinement, if it
    differs)."""
    bad = [n for n, v in layers.items() if not v["is_2of4"]]
    status = "all 2:4" if not bad else f"{len(bad)} NOT 2:4 ({', '.join(bad)})"
    capped = sum(bool(v.get("capped")) for v in layers.values())
    final = sum(float(v["loss_final"]) for v in layers.values())
    method = sum(float(v["loss_method"]) for v in layers.values())
    loss = f"summed local loss {final:.4g}"
    if f"{method:.4g}" != f"{final:.4g}":
        loss += f" ({method:.4g} before refinement)"
    line = (
        f"block {index + 1}/{num_blocks} ({name}): {len(layers)} layers, {status}, "
        f"solver {block_seconds(layers):.2f} s, {loss}"
    )
    if capped:
        line += f", {capped} forced to 2:4 at max_prox_steps"
    return line


#: The columns of a layer's row in ``metrics.csv`` (see :class:`~.callbacks.RunLogger`).
LAYER_COLUMNS = (
    "block",
    "layer",
    "d_out",
    "d_in",
    "sparsity",
    "is_2of4",
    "capped",
    "iterations_to_2of4",
    "final_lambda",
    "loss_method",
    "loss_final",
    "dead_features",
    "gemms",
    "own_seconds",
)


def layer_csv_rows(layers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per layer (its report row) for a spreadsheet: :data:`LAYER_COLUMNS`, with
    booleans as 0/1 so that they sum."""
    own = own_seconds(layers)
    rows = []
    for name, v in layers.items():
        d_out, d_in = v["shape"]
        rows.append(
            {
                "block": int(v["block"]),
                "layer": name,
                "d_out": int(d_out),
                "d_in": int(d_in),
                "sparsity": float(v["sparsity"]),
                "is_2of4": int(bool(v["is_2of4"])),
                "capped": int(bool(v.get("capped"))),
                "iterations_to_2of4": int(v["iterations_to_2of4"]),
                "final_lambda": float(v["final_lambda"]),
                "loss_method": float(v["loss_method"]),
                "loss_final": float(v["loss_final"]),
                "dead_features": int(v.get("dead_features", 0) or 0),
                "gemms": int(v.get("gemms", 0) or 0),
                "own_seconds": own[name],
            }
        )
    return rows


def block_metrics(layers: dict[str, dict[str, Any]], wall_seconds: float) -> dict[str, float]:
    """A finished block as scalars, for loggers that take numbers only (TensorBoard and the
    like): layer count, 2:4 status, solver and wall time, summed local losses."""
    return {
        "prune/layers": float(len(layers)),
        "prune/all_2of4": float(all(v["is_2of4"] for v in layers.values())),
        "prune/solver_seconds": block_seconds(layers),
        "prune/block_seconds": float(wall_seconds),
        "prune/loss_method_sum": sum(float(v["loss_method"]) for v in layers.values()),
        "prune/loss_final_sum": sum(float(v["loss_final"]) for v in layers.values()),
    }


def build_report(
    trainer: Any, pl_module: Any, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``sparsity_report.json`` contents: per-layer stats, a summary, and everything needed to
    reproduce the run (config, seed, data files and hashes, library versions, machine).

    Per layer, ``seconds`` is the solver's wall time (from the start of the block's solves to
    the layer's result, so it spans the block) and ``own_seconds`` the layer's share of its
    block's solver time (:func:`own_seconds`). Evaluation sets are not listed here: none has run
    when the export is written; :meth:`~.callbacks.ExportPruned.update_report` adds the ones
    that ran.
    """
    own = own_seconds(pl_module.report)
    layers = {n: {**v, "own_seconds": own[n]} for n, v in pl_module.report.items()}
    total = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    zeros = sum(v["sparsity"] * v["shape"][0] * v["shape"][1] for v in layers.values())
    dm = getattr(trainer, "datamodule", None)
    dead = {n: int(v.get("dead_features", 0)) for n, v in layers.items()}
    skipped = dict(getattr(pl_module, "skipped", {}) or {})
    seed = os.environ.get("PL_GLOBAL_SEED")
    return {
        "model": pl_module.model_name_or_path,
        "method": pl_module.method,
        "seed": int(seed) if seed is not None and seed.lstrip("-").isdigit() else seed,
        "hparams": dict(pl_module.hparams),
        "fingerprint": pl_module.fingerprint() if hasattr(pl_module, "fingerprint") else None,
        "config": config,
        "trainer": {
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "accelerator": type(trainer.accelerator).__name__,
        },
        "data": _data_report(dm) if dm is not None else {},
        "versions": library_versions(),
        "machine": machine_info(),
        "summary": {
            "layers": len(layers),
            "all_2of4": all(v["is_2of4"] for v in layers.values()),
            "sparsity": zeros / total if total else 0.0,
            "loss_final_sum": sum(v["loss_final"] for v in layers.values()),
            "blocks": len({v["block"] for v in layers.values()}),
            # The layers of a block are solved in lockstep (one optimizer step advances all), so a
            # layer's seconds span its whole block: the solver time is the sum of block maxima.
            "solver_seconds": sum(
                block_seconds({n: v for n, v in layers.items() if v["block"] == b})
                for b in {v["block"] for v in layers.values()}
            ),
            "dead_features": sum(dead.values()),
            "layers_with_dead_features": sorted(n for n, d in dead.items() if d),
            "forced_2of4": sorted(n for n, v in layers.items() if v.get("forced_2of4")),
            "capped": sorted(n for n, v in layers.items() if v.get("capped")),
            "skipped_layers": skipped,
            "solves_per_rank": list(getattr(pl_module, "solves_per_rank", []) or []),
        },
        "layers": layers,
    }


def format_table(report: dict[str, Any]) -> str:
    """The per-layer table of a pruning report (one row per layer), then :func:`format_summary`.

    The 2:4 column says ``cap`` for a layer whose prox phase hit ``max_prox_steps`` (its last
    groups were forced to 2:4 by magnitude). The ``s`` column is the layer's own share of its
    block's solver time (``own_seconds``), not the wall time spanning the block.
    """
    rows = [
        "| block | layer | shape | sparsity | 2:4 | iters | lambda | loss before GD | loss after "
        "| s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    own = own_seconds(report["layers"])
    for name, v in report["layers"].items():
        flag = ("yes (cap)" if v.get("capped") else "yes") if v["is_2of4"] else "NO"
        rows.append(
            f"| {v['block']} | {name} | {v['shape'][0]}x{v['shape'][1]} | {v['sparsity']:.3f} | "
            f"{flag} | {v['iterations_to_2of4']} | "
            f"{v['final_lambda']:.3g} | {v['loss_method']:.4g} | {v['loss_final']:.4g} | "
            f"{v.get('own_seconds', own[name]):.2f} |"
        )
    return "\n".join(rows) + "\n\n" + format_summary(report)


def format_summary(report: dict[str, Any]) -> str:
    """The end-of-run lines of a pruning report: totals, then the layers that need a look
    (capped, dead input features, left dense)."""
    s = report["summary"]
    skipped = s.get("skipped_layers") or {}
    blocks = s.get("blocks", len({v["block"] for v in report["layers"].values()}))
    rows = [
        f"{s['layers']} layers in {blocks} blocks pruned, sparsity {s['sparsity']:.4f}, all 2:4: "
        f"{s['all_2of4']}, {len(skipped)} targeted layers left dense, summed local loss "
        f"{s['loss_final_sum']:.4g}, solver time {s['solver_seconds']:.1f} s"
    ]
    capped = [n for n, v in report["layers"].items() if v.get("capped")]
    if capped:
        rows.append(
            f"{len(capped)} layers hit the iteration cap (max_prox_steps) and were forced to 2:4 "
            f"by magnitude: {', '.join(capped)}; raise max_prox_steps or beta"
        )
    if s.get("dead_features"):
        rows.append(
            f"{s['dead_features']} dead input features (never active on the calibration data) "
            f"in {len(s['layers_with_dead_features'])} layers; pruned first"
        )
    if skipped:
        rows.append("left dense: " + ", ".join(f"{n} ({why})" for n, why in skipped.items()))
    return "\n".join(rows)


@torch.no_grad()
def build_finetune_report(
    trainer: Any, pl_module: Any, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Per masked layer: shape, sparsity, 2:4, relative change vs the source export.

    Args:
        trainer: The finished Trainer (step count, last training loss, data settings).
        pl_module: The finetuner, after :meth:`MaskedFinetuner.export_model`.
        config: The run's full config (the CLI sets it on the callback), recorded as is.
    """
    source = _SourceWeights(pl_module.model_name_or_path)
    layers: dict[str, Any] = {}
    for name, (weight, _) in pl_module.masked_weights().items():
        w = weight.detach().float().cpu()
        w = w.t() if name in pl_module.transposed else w
        entry: dict[str, Any] = {
            "shape": list(w.shape),
            "sparsity": float((w == 0).float().mean()),
            "is_2of4": is_2of4(w),
        }
        w0 = source.get(name)
        if w0 is not None:
            w0 = (w0.t() if name in pl_module.transposed else w0).float()
            entry["relative_change"] = float(
                torch.linalg.vector_norm(w - w0) / torch.linalg.vector_norm(w0).clamp_min(1e-30)
            )
        if name in pl_module.remask_dropped:
            entry["lora_update_dropped_by_remask"] = pl_module.remask_dropped[name]
        layers[name] = entry
    numel = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    zeros = sum(v["sparsity"] * v["shape"][0] * v["shape"][1] for v in layers.values())
    loss = trainer.callback_metrics.get("train/loss")
    dm = getattr(trainer, "datamodule", None)
    # Evaluation sets are added by ExportPruned.update_report once they have run.
    data = {
        k: _plain(getattr(dm, k))
        for k in ("calibration", "calibration_mode", "nsamples", "seqlen", "seed")
        if dm is not None and hasattr(dm, k)
    }
    hparams = dict(pl_module.hparams)
    if is_dataclass(hparams.get("lora")):
        hparams["lora"] = asdict(hparams["lora"])
    return {
        "model": pl_module.model_name_or_path,
        "masks": pl_module.masks_path,
        "method": pl_module.method,
        "hparams": hparams,
        "config": config,
        "data": data,
        "versions": library_versions(),
        "training": {
            "global_step": trainer.global_step,
            "final_train_loss": float(loss) if loss is not None else None,
            "lora_remasked": bool(pl_module.remask_dropped),
        },
        "summary": {
            "layers": len(layers),
            "all_2of4": all(v["is_2of4"] for v in layers.values()),
            "sparsity": zeros / numel if numel else 0.0,
        },
        "layers": layers,
    }


class _SourceWeights:
    """Lazy reader of the source export's ``<layer>.weight`` tensors (safetensors only)."""

    def __init__(self, folder: str) -> None:
        from safetensors import safe_open

        self._open = safe_open
        self._index: dict[str, Path] = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            if f.name == "masks.safetensors":
                continue
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    self._index[key] = f

    def get(self, layer: str) -> Tensor | None:
        path = self._index.get(f"{layer}.weight")
        if path is None:
            return None
        with self._open(str(path), framework="pt") as h:
            return h.get_tensor(f"{layer}.weight")
