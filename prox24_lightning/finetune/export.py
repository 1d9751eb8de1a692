"""The export at the end of finetuning: model, tokenizer, the same masks and a report, checked."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ..artifacts import write_export
from ..callbacks import ExportPruned
from ..reports import build_finetune_report
from .lora import is_peft_model
from .module import MaskedFinetuner

__all__ = ["ExportFinetuned"]


class ExportFinetuned(ExportPruned):
    """At the end of finetuning: save model + tokenizer + the same masks + a report, checked.

    Like :class:`~prox24_lightning.callbacks.ExportPruned` (and a subclass of it, so the CLI
    merges ``--evaluate`` perplexities into ``sparsity_report.json``): written to a temporary
    folder, verified with :func:`~prox24_lightning.artifacts.check_export` (exactly 2:4, agrees
    with the masks, no ``-0.0``/NaN/Inf), then renamed into place. With LoRA the adapters are
    merged and the masks re-applied first (see :meth:`MaskedFinetuner.export_model`).

    Args:
        dirpath: export folder (default: ``<trainer.default_root_dir>/export``).
        overwrite: replace an existing export instead of refusing.
        save_adapter: with LoRA, also save the unmerged adapter to ``<dirpath>/adapter``.
    """

    def __init__(
        self, dirpath: str | None = None, overwrite: bool = False, save_adapter: bool = False
    ) -> None:
        super().__init__(dirpath=dirpath, overwrite=overwrite, print_table=False)
        self.save_adapter = save_adapter

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, MaskedFinetuner):
            raise TypeError(f"ExportFinetuned needs a MaskedFinetuner, got {type(pl_module)}")
        if pl_module.lm is None:
            return
        adapter = self._save_adapter(pl_module)
        # Every rank merges and re-masks, so an evaluation after fit scores the exported model
        # on all of them; only rank 0 writes.
        pl_module.export_model()
        self._export(trainer, pl_module, adapter)
        trainer.strategy.barrier()

    @rank_zero_only
    def _save_adapter(self, pl_module: MaskedFinetuner) -> Path | None:
        if not (self.save_adapter and is_peft_model(pl_module.lm)):
            return None
        # Saved before merging (merging unloads the adapter); moved into the export below.
        self.dirpath.parent.mkdir(parents=True, exist_ok=True)
        adapter = Path(
            tempfile.mkdtemp(prefix=f".{self.dirpath.name}.adapter.", dir=self.dirpath.parent)
        )
        pl_module.lm.save_pretrained(adapter)
        return adapter

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: Any, adapter: Path | None = None) -> None:
        try:
            self._write(trainer, pl_module, adapter)
        finally:
            if adapter is not None:
                shutil.rmtree(adapter, ignore_errors=True)

    def _write(self, trainer: L.Trainer, pl_module: Any, adapter: Path | None) -> None:
        self.report = build_finetune_report(trainer, pl_module, config=self.run_config)
        verdict = write_export(
            self.dirpath,
            pl_module.lm,
            pl_module.tokenizer,
            pl_module.masks,
            self.report,
            transposed=pl_module.transposed,
            method=pl_module.method,
            adapter=adapter,
        )
        rank_zero_info(f"finetuned export written to {self.dirpath}: {verdict}")
