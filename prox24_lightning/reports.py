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
    "build_finetune_report",
    "build_report",
    "format_table",
    "library_versions",
    "machine_info",
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
    "validation",
    "eval_seqlen",
    "max_eval_windows",
    "eval_batch_size",
    "bos",  # the setting (auto / always / never)
    "bos_prepended",  # what it resolved to for this tokenizer: BOS first in every window
)


def _data_report(dm: Any) -> dict[str, Any]:
    """The data settings, and what each source read: local files with their SHA-256, or the hub
    dataset; plus a hash of the calibration tokens actually used."""
    from .data import source_provenance

    data: dict[str, Any] = {}
    for key in _DATA_KEYS:
        if hasattr(dm, key):
            value = getattr(dm, key)
            if is_dataclass(value) and not isinstance(value, type):
                value = asdict(value)
            elif isinstance(value, dict):
                value = {k: asdict(v) if is_dataclass(v) else v for k, v in value.items()}
            data[key] = value
    sources: dict[str, Any] = {}
    if getattr(dm, "calibration", None) is not None:
        sources["calibration"] = dm.calibration
    for name, src in (getattr(dm, "validation", None) or {}).items():
        sources[f"validation/{name}"] = src
    files: dict[str, Any] = {}
    for name, src in sources.items():
        try:
            files[name] = source_provenance(src)
        except (OSError, ValueError) as err:  # a source that vanished after the run read it
            files[name] = {"error": str(err)}
    data["files"] = files
    tokens = getattr(dm, "calibration_data", None)
    if isinstance(tokens, Tensor):
        data["calibration_tokens"] = list(tokens.shape)
        data["calibration_tokens_sha256"] = hashlib.sha256(
            tokens.contiguous().cpu().numpy().tobytes()
        ).hexdigest()
    return data


def build_report(
    trainer: Any, pl_module: Any, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``sparsity_report.json`` contents: per-layer stats, a summary, and everything needed to
    reproduce the run (config, seed, data files and hashes, library versions, machine)."""
    layers = pl_module.report
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
            # The layers of a block are solved in lockstep (one optimizer step advances all), so a
            # layer's seconds span its whole block: the solver time is the sum of block maxima.
            "solver_seconds": sum(
                max(v["seconds"] for v in layers.values() if v["block"] == b)
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
    """The console table of a pruning report: one row per layer, then the summary.

    The 2:4 column says ``cap`` for a layer whose prox phase hit ``max_prox_steps`` (its last
    groups were forced to 2:4 by magnitude); the summary counts such layers and the targeted
    layers left dense.
    """
    rows = [
        "| layer | shape | sparsity | 2:4 | iters | lambda | loss before GD | loss after | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in report["layers"].items():
        flag = ("yes (cap)" if v.get("capped") else "yes") if v["is_2of4"] else "NO"
        rows.append(
            f"| {name} | {v['shape'][0]}x{v['shape'][1]} | {v['sparsity']:.3f} | "
            f"{flag} | {v['iterations_to_2of4']} | "
            f"{v['final_lambda']:.3g} | {v['loss_method']:.4g} | {v['loss_final']:.4g} | "
            f"{v['seconds']:.2f} |"
        )
    s = report["summary"]
    skipped = s.get("skipped_layers") or {}
    rows.append(
        f"\n{s['layers']} layers pruned, sparsity {s['sparsity']:.4f}, all 2:4: {s['all_2of4']}, "
        f"{len(skipped)} targeted layers left dense, summed local loss "
        f"{s['loss_final_sum']:.4g}, solver time {s['solver_seconds']:.1f} s"
    )
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
    data = {
        k: getattr(dm, k)
        for k in ("calibration", "calibration_mode", "nsamples", "seqlen", "seed", "validation")
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
