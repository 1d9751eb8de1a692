"""``last.ckpt`` after every pruned block, and a warning for the stock callback that loses them."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["BlockCheckpoint", "warn_about_checkpoint_callbacks"]


class BlockCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes ``last.ckpt`` after every pruned block (training epoch).

    In Lightning 2.6 a plain ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes
    ``last.ckpt`` only when training ends (``last`` follows top-k saves, and none happen), and it
    skips epochs without optimizer steps (Wanda, SparseGPT, magnitude): a crash would lose every
    block. This subclass saves ``last`` at the end of each epoch, so ``--ckpt_path last``
    resumes at the first unfinished block. Defaults: ``save_last=True, save_top_k=0,
    save_on_train_epoch_end=True``; other arguments are ``ModelCheckpoint``'s.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        save_last: bool | None = True,
        save_top_k: int = 0,
        save_on_train_epoch_end: bool | None = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            save_last=save_last,
            save_top_k=save_top_k,
            save_on_train_epoch_end=save_on_train_epoch_end,
            **kwargs,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_save_on_train_epoch_end(trainer):
            super().on_train_epoch_end(trainer, pl_module)
            return
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        candidates = self._monitor_candidates(trainer)
        every = self._every_n_epochs
        if self.save_top_k != 0 and every >= 1 and (trainer.current_epoch + 1) % every == 0:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)  # no-op unless save_last


def warn_about_checkpoint_callbacks(trainer: L.Trainer) -> None:
    """A plain ``ModelCheckpoint(save_last=True, save_top_k=0)`` loses every block on a crash."""
    for cb in trainer.checkpoint_callbacks:
        if type(cb) is ModelCheckpoint and cb.save_last and cb.save_top_k == 0:
            rank_zero_warn(
                "ModelCheckpoint(save_last=True, save_top_k=0) writes last.ckpt only when "
                "pruning ends, so a crash loses every block; use "
                "prox24_lightning.callbacks.BlockCheckpoint to checkpoint after each block"
            )
