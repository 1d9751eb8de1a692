"""The atomic checkpoint writer: a killed save never leaves a truncated ``last.ckpt``."""

from __future__ import annotations

from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from ..artifacts import atomic_write

__all__ = ["AtomicCheckpointIO", "install_atomic_checkpoint_io"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic.

    Lightning's ``_atomic_save`` (2.6) streams through an fsspec transaction that writes to the
    system temp folder and *moves* the file into place: across file systems that is a copy, so a
    kill can leave a truncated ``last.ckpt`` under its final name. Here the checkpoint is written
    next to its target, fsynced and renamed with ``os.replace``. Remote paths use the parent
    class. The pruner installs it on its own (see :func:`install_atomic_checkpoint_io`); in YAML
    it can also be given explicitly as ``trainer.plugins``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)


def install_atomic_checkpoint_io(strategy: Any) -> None:
    """Replace a strategy's default ``TorchCheckpointIO`` by :class:`AtomicCheckpointIO`
    (custom checkpoint IO plugins are left alone)."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
