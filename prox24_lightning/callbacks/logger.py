"""The run's metrics logger: ``<run folder>/logs/metrics.csv``, one row per pruned layer."""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from ..reports import LAYER_COLUMNS, layer_csv_rows

__all__ = ["RunLogger"]

#: Column order of ``metrics.csv``: Lightning's position columns, then a layer's row
#: (:data:`~prox24_lightning.reports.LAYER_COLUMNS`); other metrics follow alphabetically.
_CSV_ORDER = ("step", "epoch", *LAYER_COLUMNS)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but a resumed run appends to ``metrics.csv`` (the stock writer
    deletes it when the folder exists) and keeps the earlier columns, in :data:`_CSV_ORDER`
    (the stock writer sorts them, which scatters a layer's row)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                # As written: appended rows must follow the file's own header.
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def _record_new_keys(self) -> set[str]:
        new = set().union(*self.metrics) - set(self.metrics_keys)
        if new:
            keys = set(self.metrics_keys) | new
            lead = [k for k in _CSV_ORDER if k in keys]
            self.metrics_keys[:] = lead + sorted(keys - set(lead))
        return new


class RunLogger(CSVLogger):
    """Metrics of a pruning run in ``<save_dir>/logs/metrics.csv``: no ``version_N`` folder, so a
    rerun of the same command (``--ckpt_path last``) continues in the same run folder.

    The file is in long format, one row per pruned layer, written when its block is done (every
    block, whatever ``log_every_n_steps``; a resumed run appends): ``step`` (the block index),
    ``block``, ``layer``, ``d_out``, ``d_in``, ``sparsity``, ``is_2of4`` and ``capped`` (0/1),
    ``iterations_to_2of4``, ``final_lambda``, ``loss_method`` (before refinement),
    ``loss_final``, ``dead_features``, ``gemms`` and ``own_seconds`` (the layer's share of its
    block's solver time, see :func:`~prox24_lightning.reports.own_seconds`). A spreadsheet
    filters or pivots it by block or layer, and a block's sums are its totals. Whatever else
    Lightning logs (``--evaluate`` perplexities, a finetuning loss) gets rows of its own,
    ``layer`` empty.

    Args:
        save_dir: the run folder (``null``: the CLI puts ``trainer.default_root_dir``).
        name: subfolder for the log files.
    """

    def __init__(self, save_dir: str | None = None, name: str = "logs", **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir or ".", name=name, version="", **kwargs)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_layers(self, block: int, layers: dict[str, dict[str, Any]]) -> None:
        """Write a finished block's layers (their report rows), one row each, at once: a crash
        later in the run keeps them."""
        for row in layer_csv_rows(layers):
            self.experiment.log_metrics(row, step=block)
        self.save()
