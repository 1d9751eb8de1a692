"""What a pruning run adds to the trainer by itself: the callbacks it needs to resume and export."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar

from .block_checkpoint import BlockCheckpoint
from .export import ExportPruned
from .masks import MaskCheckpoint
from .progress import BlockProgressBar

__all__ = ["install_pruning_callbacks"]


def install_pruning_callbacks(trainer: L.Trainer) -> list[L.Callback]:
    """Give a pruning run what it needs to resume and export, without duplicates.

    Adds :class:`MaskCheckpoint`, :class:`BlockCheckpoint` and :class:`ExportPruned` unless the
    trainer already has one of each kind, puts every per-run file under
    ``trainer.default_root_dir`` (``masks/``, ``checkpoints/``, ``export/``; a
    ``BlockCheckpoint`` without ``dirpath`` gets ``checkpoints/`` here, before Lightning
    resolves ``--ckpt_path last``), and swaps Lightning's default progress bar for
    :class:`BlockProgressBar`. Returns the callbacks added.
    """
    root = Path(trainer.default_root_dir)
    added: list[L.Callback] = []
    have = trainer.callbacks
    if not any(isinstance(cb, MaskCheckpoint) for cb in have):
        added.append(MaskCheckpoint())
    if not any(isinstance(cb, ExportPruned) for cb in have):
        added.append(ExportPruned())
    if not any(isinstance(cb, BlockCheckpoint) for cb in have):
        added.append(BlockCheckpoint())
    # Checkpoint callbacks last (as Lightning orders them): the masks are in their state first.
    first_ckpt = next(
        (i for i, cb in enumerate(have) if isinstance(cb, ModelCheckpoint)), len(have)
    )
    have[first_ckpt:first_ckpt] = [cb for cb in added if not isinstance(cb, ModelCheckpoint)]
    have.extend(cb for cb in added if isinstance(cb, ModelCheckpoint))
    for cb in have:
        if isinstance(cb, BlockCheckpoint) and cb.dirpath is None:
            cb.dirpath = str(root / "checkpoints")
    for i, cb in enumerate(have):
        if type(cb) in (TQDMProgressBar, RichProgressBar):  # Lightning's defaults
            have[i] = BlockProgressBar(refresh_rate=cb.refresh_rate)
    return added
