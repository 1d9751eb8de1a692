"""Callbacks of the pruning run: mask checkpoints, export with report, sparsity table, and the
atomic checkpoint writer."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor

from .artifacts import atomic_write, load_masks, save_masks, write_export, write_json
from .faults import maybe_fail
from .reports import (
    LAYER_COLUMNS,
    build_report,
    evaluated_sets,
    evaluation_data,
    format_summary,
    format_table,
    layer_csv_rows,
    library_versions,
)

__all__ = [
    "AtomicCheckpointIO",
    "BlockProgressBar",
    "RunLogger",
    "install_pruning_callbacks",
    "BlockCheckpoint",
    "MaskCheckpoint",
    "ExportPruned",
    "install_atomic_checkpoint_io",
    "library_versions",
]


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


@runtime_checkable
class BlockPruning(Protocol):
    """What the pruning callbacks use of a module (:class:`~.pruner.BlockwisePruner` has it)."""

    method: str
    tokenizer: Any
    #: called with ``(block index, {layer: PruneResult})`` when a block is done.
    block_pruned_listeners: list[Callable[[int, dict[str, Any]], None]]

    @property
    def report(self) -> dict[str, dict[str, Any]]: ...
    @property
    def masks(self) -> dict[str, Tensor]: ...
    @property
    def transposed(self) -> set[str]: ...
    @property
    def pruned_blocks(self) -> set[int]: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def is_complete(self) -> bool: ...
    def check_masks(self, masks: dict[str, Tensor], source: str) -> None: ...
    def full_model(self) -> AbstractContextManager[Any]: ...


def warn_about_checkpoint_callbacks(trainer: L.Trainer) -> None:
    """A plain ``ModelCheckpoint(save_last=True, save_top_k=0)`` loses every block on a crash."""
    for cb in trainer.checkpoint_callbacks:
        if type(cb) is ModelCheckpoint and cb.save_last and cb.save_top_k == 0:
            rank_zero_warn(
                "ModelCheckpoint(save_last=True, save_top_k=0) writes last.ckpt only when "
                "pruning ends, so a crash loses every block; use "
                "prox24_lightning.callbacks.BlockCheckpoint to checkpoint after each block"
            )


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


#: Column order of ``metrics.csv``: Lightning's position columns, then a layer's row
#: (:data:`~.reports.LAYER_COLUMNS`); other metrics follow alphabetically.
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
    block's solver time, see :func:`~.reports.own_seconds`). A spreadsheet filters or pivots it
    by block or layer, and a block's sums are its totals. Whatever else Lightning logs
    (``--evaluate`` perplexities, a finetuning loss) gets rows of its own, ``layer`` empty.

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


def install_atomic_checkpoint_io(strategy: Any) -> None:
    """Replace a strategy's default ``TorchCheckpointIO`` by :class:`AtomicCheckpointIO`
    (custom checkpoint IO plugins are left alone)."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


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

    @property
    def dirpath(self) -> Path:
        if self._dirpath is not None:
            return self._dirpath
        if self._root is None:
            raise RuntimeError("ExportPruned has no dirpath before Trainer.setup")
        return self._root / "export"

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


__all__ += ["load_masks", "_sha256"]
