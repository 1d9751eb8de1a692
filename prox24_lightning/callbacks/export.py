"""The export at the end of pruning: weights, tokenizer, masks and report, written and checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor

from ..artifacts import write_export, write_json
from ..faults import maybe_fail
from ..reports import (
    build_report,
    evaluated_sets,
    evaluation_data,
    format_summary,
    format_table,
)
from .protocol import BlockPruning

__all__ = ["ExportPruned"]


class ExportPruned(L.Callback):
    """At the end of pruning: ``save_pretrained`` + tokenizer + masks + report, then a check.

    The folder holds dense weights with exact ``+0.0`` zeros (loads anywhere as a normal model;
    nothing 2:4-specific is written into ``config.json``), ``masks.safetensors`` (bit-packed) and
    ``sparsity_report.json`` (per layer: sparsity, is-2:4, iterations, lambda, local losses,
    seconds and own seconds, for prox the prox phase's ``trace`` of ``[step, lambda, frac_2of4]``
    rows; plus the run's config and library versions; the evaluation sets and perplexities of
    the evaluations that ran, merged by :meth:`update_report`). It is written to a temporary
    folder and renamed, then verified with :func:`~prox24_lightning.artifacts.check_export`.
    The console gets the run's summary; the per-layer table is in the report (a model has
    hundreds of layers, and the blocks had their console line as they finished).

    Args:
        dirpath: export folder (default: ``<trainer.default_root_dir>/export``).
        overwrite: replace an existing export instead of refusing.
        print_table: also print the per-layer table at the end.
    """

    def __init__(
        self, dirpath: str | None = None, overwrite: bool = False, print_table: bool = False
    ) -> None:
        self._dirpath = Path(dirpath) if dirpath else None
        self.overwrite = overwrite
        self.print_table = print_table
        self.report: dict[str, Any] = {}
        #: the full run config (set by the ``prox24`` CLI), recorded in the report.
        self.run_config: dict[str, Any] | None = None
        self._root: Path | None = None
        #: the run's data module: :meth:`update_report` records the evaluation sets that ran.
        self._datamodule: Any = None

    def folder_in(self, root: str | Path) -> Path:
        """The export folder of a run under ``root`` (``trainer.default_root_dir``)."""
        return self._dirpath if self._dirpath is not None else Path(root) / "export"

    @property
    def dirpath(self) -> Path:
        if self._dirpath is None and self._root is None:
            raise RuntimeError("ExportPruned has no dirpath before Trainer.setup")
        return self.folder_in(self._root or ".")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._root = Path(trainer.default_root_dir)
        self._datamodule = trainer.datamodule
        # Refuse before hours of work, not after: an existing export is never silently replaced.
        if stage == "fit" and not self.overwrite and self.dirpath.exists():
            if trainer.ckpt_path is None and any(self.dirpath.iterdir()):
                raise FileExistsError(
                    f"{self.dirpath} already holds an export (or other files); start over with "
                    "--overwrite true (or overwrite: true on ExportPruned), or choose another "
                    "dirpath"
                )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, BlockPruning) or not pl_module.report:
            return
        if not pl_module.is_complete:
            rank_zero_info(
                f"pruned blocks {sorted(pl_module.pruned_blocks)} of {pl_module.num_blocks}: "
                "no export yet (resume with --ckpt_path last to finish)"
            )
            return
        self._export(trainer, pl_module)
        trainer.strategy.barrier()

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: BlockPruning) -> None:
        masks: dict[str, Tensor] = dict(pl_module.masks)
        missing = [n for n in pl_module.report if n not in masks]
        if missing:
            raise RuntimeError(f"no masks for pruned layers {missing[:3]}...; cannot export")
        self.report = build_report(trainer, pl_module, config=self.run_config)
        # An offloaded model holds meta placeholders; ``full_model`` puts its real weights back.
        with pl_module.full_model() as lm:
            verdict = write_export(
                self.dirpath,
                lm,
                pl_module.tokenizer,
                masks,
                self.report,
                transposed=pl_module.transposed,
                method=str(pl_module.method),
                before_commit=lambda: maybe_fail("export"),
            )
        rank_zero_info(f"export written to {self.dirpath}: {verdict}")
        if self.print_table:
            print(format_table(self.report))
        else:
            print(
                f"{format_summary(self.report)}\nper-layer table: 'layers' in "
                f"{self.dirpath / 'sparsity_report.json'} (or ExportPruned print_table: true)"
            )

    def update_report(self, **fields: Any) -> None:
        """Merge ``fields`` (e.g. perplexities measured after fit) into the written report.

        A ``perplexity`` field (``{label: {"val/<set>_ppl": value}}``) also records, under
        ``data``, the evaluation sets it scored, their settings and files: only evaluations that
        ran are listed.
        """
        path = self.dirpath / "sparsity_report.json"
        if not path.exists():
            return
        report = json.loads(path.read_text())
        report.update(fields)
        perplexity = fields.get("perplexity")
        if perplexity and self._datamodule is not None:
            ran = evaluation_data(self._datamodule, evaluated_sets(perplexity))
            data = report.setdefault("data", {})
            files = {**data.get("files", {}), **ran.pop("files", {})}
            data.update(ran)
            data["files"] = files
        write_json(path, report)
        self.report = report
