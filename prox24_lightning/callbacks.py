"""Callbacks of the pruning run: mask checkpoints, export with report, sparsity table."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor

from .artifacts import atomic_dir, check_export, load_masks, save_masks, write_json
from .ops.masks import pack_mask, unpack_mask

__all__ = ["MaskCheckpoint", "ExportPruned", "library_versions"]


def library_versions() -> dict[str, str]:
    import datasets
    import lightning
    import torchmetrics
    import transformers

    from . import __version__

    return {
        "prox24_lightning": __version__,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "torchmetrics": torchmetrics.__version__,
        "python": platform.python_version(),
    }


class MaskCheckpoint(L.Callback):
    """Save each block's masks as soon as it is pruned, and keep them in the callback state.

    Writes ``<dirpath>/block_<k>.safetensors`` (bit-packed, atomically) when block ``k`` is done;
    the packed masks are also the callback's ``state_dict`` so a Lightning checkpoint carries
    them and ``--ckpt_path last`` restores them into the pruner.

    Args:
        dirpath: folder for the per-block mask files (default: ``<log dir>/masks``).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._packed: dict[str, dict[str, Any]] = {}

    def _dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "masks"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if hasattr(pl_module, "block_pruned_listeners"):
            listener = self._make_listener(trainer)
            pl_module.block_pruned_listeners.append(listener)

    def _make_listener(self, trainer: L.Trainer):
        def on_block_pruned(block: int, results: dict[str, Any]) -> None:
            masks = {name: r.mask.cpu() for name, r in results.items()}
            for name, m in masks.items():
                self._packed[name] = {"bits": pack_mask(m), "shape": list(m.shape), "block": block}
            if trainer.is_global_zero:
                save_masks(self._dir(trainer) / f"block_{block:03d}.safetensors", masks)

        return on_block_pruned

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a resume the masks come from the checkpoint's callback state.
        if hasattr(pl_module, "masks"):
            for name, m in self.masks().items():
                pl_module.masks.setdefault(name, m)

    def masks(self) -> dict[str, Tensor]:
        return {n: unpack_mask(p["bits"], tuple(p["shape"])) for n, p in self._packed.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self._packed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._packed = dict(state_dict.get("masks", {}))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ExportPruned(L.Callback):
    """At the end of pruning: ``save_pretrained`` + tokenizer + masks + report, then a check.

    The folder holds dense weights with exact ``+0.0`` zeros (loads anywhere as a normal model;
    nothing 2:4-specific is written into ``config.json``), ``masks.safetensors`` (bit-packed) and
    ``sparsity_report.json`` (per layer: sparsity, is-2:4, iterations, lambda, local losses,
    seconds; plus the run's config and library versions). It is written to a temporary folder
    and renamed, then verified with :func:`~prox24_lightning.artifacts.check_export`.

    Args:
        dirpath: export folder (default: ``<trainer.default_root_dir>/export``).
        overwrite: replace an existing export instead of refusing.
        print_table: print the per-layer sparsity table at the end.
    """

    def __init__(
        self, dirpath: str | None = None, overwrite: bool = False, print_table: bool = True
    ) -> None:
        self._dirpath = Path(dirpath) if dirpath else None
        self.overwrite = overwrite
        self.print_table = print_table
        self.report: dict[str, Any] = {}
        self._root: Path | None = None

    @property
    def dirpath(self) -> Path:
        if self._dirpath is not None:
            return self._dirpath
        if self._root is None:
            raise RuntimeError("ExportPruned has no dirpath before Trainer.setup")
        return self._root / "export"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._root = Path(trainer.default_root_dir)
        # Refuse before hours of work, not after: an existing export is never silently replaced.
        if stage == "fit" and not self.overwrite and (self.dirpath / "config.json").exists():
            if trainer.ckpt_path is None:
                raise FileExistsError(
                    f"{self.dirpath} already holds an export; set overwrite: true on ExportPruned "
                    "or choose another dirpath"
                )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "lm", None) is None or not getattr(pl_module, "report", None):
            return
        if not getattr(pl_module, "is_complete", True):
            rank_zero_info(
                f"pruned blocks {sorted(pl_module.pruned_blocks)} of {pl_module.num_blocks}: "
                "no export yet (resume with --ckpt_path last to finish)"
            )
            return
        self._export(trainer, pl_module)
        trainer.strategy.barrier()

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: Any) -> None:
        lm = pl_module.lm
        masks: dict[str, Tensor] = dict(pl_module.masks)
        missing = [n for n in pl_module.report if n not in masks]
        if missing:
            raise RuntimeError(f"no masks for pruned layers {missing[:3]}...; cannot export")
        self.report = build_report(trainer, pl_module)
        with atomic_dir(self.dirpath, overwrite=True) as tmp:
            lm.save_pretrained(tmp, safe_serialization=True)
            if pl_module.tokenizer is not None:
                pl_module.tokenizer.save_pretrained(tmp)
            save_masks(
                tmp / "masks.safetensors",
                masks,
                transposed=set(getattr(pl_module, "transposed", set())),
                method=str(pl_module.method),
            )
            write_json(tmp / "sparsity_report.json", self.report)
            result = check_export(tmp)
            if not result.ok:
                raise RuntimeError(f"export check failed: {result.verdict()}")
        rank_zero_info(f"export written to {self.dirpath}: {result.verdict()}")
        if self.print_table:
            print(format_table(self.report))

    def update_report(self, **fields: Any) -> None:
        """Merge ``fields`` (e.g. perplexities measured after fit) into the written report."""
        path = self.dirpath / "sparsity_report.json"
        if not path.exists():
            return
        report = json.loads(path.read_text())
        report.update(fields)
        write_json(path, report)
        self.report = report


def build_report(trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
    layers = pl_module.report
    total = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    zeros = sum(v["sparsity"] * v["shape"][0] * v["shape"][1] for v in layers.values())
    dm = getattr(trainer, "datamodule", None)
    data: dict[str, Any] = {}
    if dm is not None:
        for key in ("calibration", "calibration_mode", "nsamples", "seqlen", "seed", "validation"):
            if hasattr(dm, key):
                data[key] = getattr(dm, key)
    return {
        "model": pl_module.model_name_or_path,
        "method": pl_module.method,
        "hparams": dict(pl_module.hparams),
        "data": data,
        "versions": library_versions(),
        "summary": {
            "layers": len(layers),
            "all_2of4": all(v["is_2of4"] for v in layers.values()),
            "sparsity": zeros / total if total else 0.0,
            "loss_final_sum": sum(v["loss_final"] for v in layers.values()),
            "seconds_sum": sum(v["seconds"] for v in layers.values()),
        },
        "layers": layers,
    }


def format_table(report: dict[str, Any]) -> str:
    rows = [
        "| layer | shape | sparsity | 2:4 | iters | lambda | loss before GD | loss after | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in report["layers"].items():
        rows.append(
            f"| {name} | {v['shape'][0]}x{v['shape'][1]} | {v['sparsity']:.3f} | "
            f"{'yes' if v['is_2of4'] else 'NO'} | {v['iterations_to_2of4']} | "
            f"{v['final_lambda']:.3g} | {v['loss_method']:.4g} | {v['loss_final']:.4g} | "
            f"{v['seconds']:.2f} |"
        )
    s = report["summary"]
    rows.append(
        f"\n{s['layers']} layers, sparsity {s['sparsity']:.4f}, all 2:4: {s['all_2of4']}, "
        f"summed local loss {s['loss_final_sum']:.4g}, solver time {s['seconds_sum']:.1f} s"
    )
    return "\n".join(rows)


__all__ += ["build_report", "format_table", "load_masks", "_sha256"]
