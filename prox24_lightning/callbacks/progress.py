"""The progress bar of a pruning run: one bar per block, described as ``block k/N``."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

from .protocol import BlockPruning

__all__ = ["BlockProgressBar"]


class BlockProgressBar(TQDMProgressBar):
    """The progress bar of a pruning run: ``block k/N`` instead of ``Epoch k``."""

    @property
    def train_description(self) -> str:
        return "pruning"  # until the first block's "block 1/N"; not Lightning's "Training"

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # As TQDMProgressBar's, with "block k/N" as the description from the start.
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        module = trainer.lightning_module
        total = module.num_blocks if isinstance(module, BlockPruning) else trainer.max_epochs
        bar = self.train_progress_bar
        bar.reset(total=convert_inf(self.total_train_batches))
        bar.initial = 0
        bar.set_description(f"block {trainer.current_epoch + 1}/{total}")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        # No "v_num" (there is no version folder) and no per-layer metrics in the bar.
        items = super().get_metrics(trainer, pl_module)
        return {k: v for k, v in items.items() if k != "v_num" and not k.startswith("layer/")}
