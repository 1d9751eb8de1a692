"""``prox24``: the command line, a LightningCLI with ``fit``, ``validate``, ``test`` and ``check``.

    prox24 fit --config configs/demo.yaml
    prox24 fit --model.model_name_or_path DIR --data.calibration '{name: text, path: FILE}' \
        --trainer.default_root_dir OUT               # prune your own model, nothing else needed
    prox24 validate --config configs/demo.yaml        # the same model, unpruned
    prox24 check outputs/demo/export                  # verify an export is exactly 2:4
    prox24 plan --config configs/llama2-70b.yaml      # accelerator memory, host RAM, disk

A pruning run keeps everything under ``trainer.default_root_dir``: ``masks/``, ``checkpoints/``
(``last.ckpt`` after every block), ``export/`` and ``logs/``; the mask, block-checkpoint and
export callbacks are installed unless the config lists its own (``--prune_callbacks false``
turns that off).

The method is chosen with ``model.init_args.method`` (``prox``, ``wanda``, ``sparsegpt``,
``magnitude``); everything else is in the YAML files of ``configs/``.

Resume an interrupted run with the same arguments plus ``--ckpt_path last``. A run folder is never
silently restarted (:mod:`~prox24_lightning.runfolder`): a folder holding a run, given without
``--ckpt_path``, is refused with the resume command; ``--overwrite true`` starts over; ``--ckpt_path
last`` with nothing to resume is an error. The config given is the config used: a checkpoint of
another configuration is refused, naming the differences.

The ``prox24`` executable (dispatch, help, short errors) is :mod:`prox24_lightning.command`.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from .callbacks import (
    BlockCheckpoint,
    BlockPruning,
    ExportPruned,
    MaskCheckpoint,
    install_pruning_callbacks,
)
from .console import quiet
from .data import PruningDataModule
from .models.loading import hub_offline
from .plan import plan_before_fit
from .plan.runconfig import device_count
from .runfolder import RunFolder, guard_fit

__all__ = ["Prox24CLI", "cli_main", "resume_command"]


def max_positions(model_name_or_path: str | None) -> int | None:
    """The model's maximum sequence length from its local config (``None`` if not local or not
    stated): the data windows are checked against it before anything is tokenised."""
    path = os.path.expanduser(str(model_name_or_path or ""))
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    from transformers import AutoConfig

    from .models import max_positions_from_config

    try:
        return max_positions_from_config(AutoConfig.from_pretrained(path))
    except (OSError, ValueError):
        return None


def _check_evaluation_sets(validation: Any, subcommand: str) -> None:
    """``validate``/``test`` need evaluation sets: an empty mapping is an error, and none at all
    needs the hub (refused at once when it is offline)."""
    example = "--data.validation '{wiki: {name: text, path: FILE}}'"
    if validation is not None and len(validation) == 0:
        raise ValueError(f"--data.validation is empty: nothing to evaluate; give {example}")
    if validation is None:
        if hub_offline(datasets=True):
            raise ValueError(
                "no evaluation sets given, and the default ones (WikiText2, C4) need the hub, "
                f"which is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); give {example}"
            )
        rank_zero_info(
            f"{subcommand}: no --data.validation given: WikiText2 (test) and C4 (validation) "
            "from the Hugging Face hub"
        )


def _is_run_logger(logger: Any) -> bool:
    return isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("RunLogger")


def _is_pruner(class_path: Any) -> bool:
    return str(class_path).rsplit(".", 1)[-1] == "BlockwisePruner"


def _is_progress_bar(callback: Any) -> bool:
    """A callback of the parsed config (``class_path`` + ``init_args``) that is a progress bar."""
    module, _, name = str(getattr(callback, "class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, ProgressBar)


def resume_command(argv: list[str]) -> str:
    """The command that continues a partial run: the same arguments without a stopping
    ``--trainer.max_epochs`` and with ``--ckpt_path last``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        key = arg.split("=", 1)[0]
        if key in ("--trainer.max_epochs", "--ckpt_path"):
            skip = "=" not in arg
            continue
        out.append(shlex.quote(arg))
    return " ".join(["prox24", *out, "--ckpt_path", "last"])


class Prox24CLI(LightningCLI):
    """LightningCLI with an ``--evaluate`` switch that scores the model before/after fit, the
    pruner as the default model, and a run folder that a rerun with ``--ckpt_path last`` finds."""

    #: the arguments given to :func:`cli_main` (``None``: ``sys.argv``), for the resume hint.
    _argv: list[str] | None = None

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # ``predict`` has no meaning for a pruner; ``check`` is dispatched before the parser.
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser: Any) -> None:
        # The pruner is the default model; the tokenizer is the model's: one path, given once.
        parser.set_defaults({"model": {"class_path": "prox24_lightning.pruner.BlockwisePruner"}})
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")
        parser.link_arguments(
            "model.init_args.model_name_or_path", "data.max_positions", compute_fn=max_positions
        )
        parser.add_argument(
            "--evaluate",
            type=str,
            default="auto",
            choices=["auto", "none", "before", "after", "both"],
            help="fit only: perplexity of the dense model before and/or the pruned one after; "
            "auto = after when data.validation names evaluation sets, else none",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: start over in a run folder that holds a partial or finished run (its "
            "last.ckpt, mask files and block shards are deleted, the export is replaced); "
            "without it such a folder is refused",
        )
        parser.add_argument(
            "--prune_callbacks",
            type=bool,
            default=True,
            help="fit with the pruner: add the mask, block-checkpoint and export callbacks (and "
            "the block progress bar) unless the config lists them",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        root = trainer.default_root_dir or "."
        if trainer.logger is None or trainer.logger is True:
            # No version_N folder: logs of a rerun land where the first run's are.
            trainer.logger = Namespace(
                class_path="prox24_lightning.callbacks.RunLogger",
                init_args=Namespace(save_dir=root, name="logs"),
            )
        elif _is_run_logger(trainer.logger) and trainer.logger.init_args.get("save_dir") is None:
            trainer.logger.init_args.save_dir = root
        if trainer.enable_progress_bar is False and trainer.callbacks:
            # ``--trainer.enable_progress_bar false`` on a config that lists a bar (demo.yaml):
            # Lightning refuses the pair, the user asked for no bar.
            trainer.callbacks = [c for c in trainer.callbacks if not _is_progress_bar(c)]
        if _is_pruner(cfg.model.class_path) and trainer.enable_model_summary is None:
            trainer.enable_model_summary = False  # "Trainable params: 0" says nothing here
        if (
            _is_pruner(cfg.model.class_path)
            and trainer.strategy in (None, "auto")
            and device_count(trainer.devices) > 1
        ):
            # Lightning's default for several devices is DDP, which refuses a module with nothing
            # to train; the pruner's strategy is DDP's process group without the wrapper.
            trainer.strategy = "blockwise_ddp"
        if self.subcommand in ("validate", "test"):
            _check_evaluation_sets(cfg.data.get("validation"), self.subcommand)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI (2.5+) would replace the model arguments by the hyper-parameters stored in
        # an explicitly given checkpoint, silently (and not for ``--ckpt_path last``). Keep the
        # config as given instead: the pruner compares it with the checkpoint's fingerprint and
        # refuses a checkpoint of another configuration, naming the differences.
        return None

    def _evaluate(self, label: str) -> dict[str, float]:
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        metrics = {k: float(v) for r in results for k, v in r.items()}
        rank_zero_info(f"{label} perplexity: {metrics}")
        self._metrics[label] = metrics
        return metrics

    def _run_config(self) -> dict[str, Any] | None:
        """The full config of this run, as the saved ``config.yaml`` holds it."""
        try:
            cfg = self.config.get(str(self.subcommand), self.config)
            dumped = self._parser(self.subcommand).dump(cfg, skip_none=False, format="json")
            return json.loads(dumped)
        except Exception as err:  # noqa: BLE001 - the report must not break a finished run
            rank_zero_info(f"could not record the run config in the report: {err}")
            return None

    def _pruning(self) -> bool:
        return isinstance(self.model, BlockPruning)

    def _evaluate_mode(self) -> str:
        cfg = self.config.get(self.subcommand, {})
        mode = cfg.get("evaluate", "auto")
        if mode == "auto":
            # The hub's WikiText2/C4 (data.validation left unset) only when asked for.
            mode = "after" if cfg.get("data", {}).get("validation") is not None else "none"
        return mode

    def _guard_run_folder(self) -> None:
        """Refuse to lose or fake work in the run folder (:func:`~prox24_lightning.runfolder.
        guard_fit`), before anything loads."""
        cfg = self.config[self.subcommand]
        callbacks = self.trainer.callbacks
        ckpt = next((cb for cb in callbacks if isinstance(cb, BlockCheckpoint)), None)
        masks = next((cb for cb in callbacks if isinstance(cb, MaskCheckpoint)), None)
        exports = [cb for cb in callbacks if isinstance(cb, ExportPruned)]
        root = Path(self.trainer.default_root_dir)
        folder = RunFolder(
            root=root,
            checkpoints=Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else None,
            masks=Path(masks.dirpath) if masks is not None and masks.dirpath else root / "masks",
            export=exports[0].folder_in(root) if exports else None,
        )
        overwrite = bool(cfg.get("overwrite", False))
        argv = sys.argv[1:] if self._argv is None else self._argv
        resume = resume_command(argv)
        if not overwrite:  # read-only checks: every rank refuses alike
            guard_fit(folder, cfg.get("ckpt_path"), overwrite=False, resume_command=resume)
        else:
            if self.trainer.is_global_zero:  # one rank deletes, the others wait for it
                guard_fit(folder, cfg.get("ckpt_path"), overwrite=True, resume_command=resume)
            if self.trainer.world_size > 1:
                self.trainer.strategy.barrier()
        if overwrite:
            for cb in exports:
                cb.overwrite = True

    def _check_data_files(self) -> None:
        check = getattr(self.datamodule, "check_files", None)
        if callable(check):
            check(str(self.subcommand))

    def before_validate(self) -> None:
        self._check_data_files()

    def before_test(self) -> None:
        self._check_data_files()

    def before_fit(self) -> None:
        self._check_data_files()
        self._metrics: dict[str, dict[str, float]] = {}
        if self._pruning() and self.config[self.subcommand].get("prune_callbacks", True):
            install_pruning_callbacks(self.trainer)
        if self._pruning():
            self._guard_run_folder()
        # The run plan, and a refusal when the output disk is too small, before anything loads.
        plan_before_fit(self.config.get(self.subcommand, self.config), log=rank_zero_info)
        exports = [cb for cb in self.trainer.callbacks if isinstance(cb, ExportPruned)]
        if exports:
            config = self._run_config()
            for cb in exports:
                cb.run_config = config
        mode = self._evaluate_mode()
        ckpt = self.config.get(self.subcommand, {}).get("ckpt_path")
        if mode in ("before", "both") and ckpt is None:
            self._evaluate(getattr(self.model, "eval_labels", ("dense", "pruned"))[0])

    def after_fit(self) -> None:
        mode = self._evaluate_mode()
        label = getattr(self.model, "eval_labels", ("dense", "pruned"))[1]
        partial = self._pruning() and not self.model.is_complete
        if partial:
            done, total = len(self.model.pruned_blocks), self.model.num_blocks
            label = f"partial ({done}/{total} blocks pruned)"
            if self.trainer.is_global_zero:
                print(
                    f"partial run: {done} of {total} blocks pruned, no export yet. Resume with:\n"
                    f"  {resume_command(sys.argv[1:] if self._argv is None else self._argv)}"
                )
        if mode in ("after", "both"):
            self._evaluate(label)
        for cb in self.trainer.callbacks:
            if isinstance(cb, ExportPruned) and self.trainer.is_global_zero:
                cb.update_report(perplexity=self._metrics)
        if self._metrics and self.trainer.is_global_zero:
            print(format_perplexities(self._metrics))


def format_perplexities(metrics: dict[str, dict[str, float]]) -> str:
    names = sorted({k for m in metrics.values() for k in m})
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, m in metrics.items():
        lines.append(
            f"| {label} | " + " | ".join(f"{m.get(n, float('nan')):.3f}" for n in names) + " |"
        )
    return "\n".join(lines)


def cli_main(
    args: list[str] | None = None, *, exit_on_error: bool = True, **kwargs: Any
) -> Prox24CLI:
    """Build (and by default run) the CLI; ``args=None`` reads ``sys.argv``.

    ``model`` is any LightningModule given by class path: ``BlockwisePruner`` prunes,
    ``MaskedFinetuner`` finetunes an export with its masks held fixed. Both are imported here so
    the short names ``--model BlockwisePruner`` / ``--model MaskedFinetuner`` resolve.

    ``exit_on_error=False`` raises parse errors (``ArgumentError``) instead of printing the usage
    and exiting: the ``prox24`` executable turns them into short messages.
    """
    import lightning as L

    quiet()
    from . import strategies  # noqa: F401  (registers trainer.strategy: blockwise_ddp)
    from .finetune import MaskedFinetuner  # noqa: F401  (registers the short name)
    from .pruner import BlockwisePruner  # noqa: F401

    Prox24CLI._argv = None if args is None else list(args)
    return Prox24CLI(
        L.LightningModule,
        PruningDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        parser_kwargs={
            "description": "2:4 pruning of causal LMs (Kübler et al., TMLR 2025): fit (prune), "
            "validate (perplexity), test; `prox24 --help` lists every subcommand.",
            "exit_on_error": exit_on_error,
            **{name: {"exit_on_error": exit_on_error} for name in ("fit", "validate", "test")},
        },
        **kwargs,
    )
