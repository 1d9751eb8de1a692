"""Per-block mask files, written as each block is pruned and checked on a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ..artifacts import load_masks, save_masks
from .protocol import BlockPruning

__all__ = ["MaskCheckpoint"]


class MaskCheckpoint(L.Callback):
    """Write each block's masks as ``<dirpath>/block_<k>.safetensors`` as soon as it is pruned.

    The files are for people and tools (bit-packed, atomic); the run itself resumes from the
    pruner's block shards (:mod:`~prox24_lightning.pipeline.shards`). On a resume each finished
    block's file is checked against the restored masks (a file from another run or model is
    refused) and written again if missing.

    Args:
        dirpath: folder for the per-block mask files (default: ``<default_root_dir>/masks``).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def _dir(self, trainer: L.Trainer) -> Path:
        # The run folder, never a logger's version_N folder: a rerun must find the same files.
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "masks"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(pl_module, BlockPruning):
            pl_module.block_pruned_listeners.append(self._make_listener(trainer))

    def _make_listener(self, trainer: L.Trainer):
        def on_block_pruned(block: int, results: dict[str, Any]) -> None:
            if trainer.is_global_zero:
                masks = {name: r.mask.cpu() for name, r in results.items()}
                save_masks(self._dir(trainer) / f"block_{block:03d}.safetensors", masks)

        return on_block_pruned

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(pl_module, BlockPruning) and pl_module.masks and trainer.is_global_zero:
            self._verify_files(trainer, pl_module)

    def _verify_files(self, trainer: L.Trainer, pl_module: BlockPruning) -> None:
        by_block: dict[int, dict[str, Tensor]] = {}
        for name, m in pl_module.masks.items():
            by_block.setdefault(int(pl_module.report[name]["block"]), {})[name] = m
        for block, masks in sorted(by_block.items()):
            path = self._dir(trainer) / f"block_{block:03d}.safetensors"
            if not path.exists():
                save_masks(path, masks)
                continue
            on_disk = load_masks(path)
            pl_module.check_masks(on_disk, f"mask file {path}")
            for name, m in masks.items():
                other = on_disk.get(name)
                if other is None:
                    detail = "missing from the file"
                elif other.shape != m.shape:
                    detail = f"shape {tuple(other.shape)} in the file, {tuple(m.shape)} resumed"
                elif not torch.equal(other, m):
                    detail = "different mask bits"
                else:
                    continue
                raise ValueError(
                    f"mask file {path} does not match the checkpoint being resumed at layer "
                    f"{name}: {detail}; it comes from another run or model: move it away or "
                    "use another dirpath"
                )
