"""``prox24``: the command line, a LightningCLI with ``fit``, ``validate``, ``test`` and ``check``.

    prox24 fit --config configs/demo.yaml
    prox24 validate --config configs/demo.yaml        # the same model, unpruned
    prox24 check outputs/demo/export                  # verify an export is exactly 2:4

The method is chosen with ``model.init_args.method`` (``prox``, ``wanda``, ``sparsegpt``,
``magnitude``); everything else is in the YAML files of ``configs/``.

Resume an interrupted run with the same arguments plus ``--ckpt_path last`` (a fresh start, with a
warning, when no checkpoint exists yet). The config given is the config used: a checkpoint of
another configuration is refused, naming the differences.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from .callbacks import ExportPruned
from .check import check_export
from .data import PruningDataModule
from .plan import plan_before_fit, plan_main

__all__ = ["Prox24CLI", "main"]


class Prox24CLI(LightningCLI):
    """LightningCLI with an ``--evaluate`` switch that scores the model before/after fit."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        # The tokenizer is the model's: one path, given once.
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")
        parser.add_argument(
            "--evaluate",
            type=str,
            default="after",
            choices=["none", "before", "after", "both"],
            help="fit only: perplexity of the dense model before and/or the pruned one after",
        )

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

    def before_fit(self) -> None:
        # The run plan, and a refusal when the output disk is too small, before anything loads.
        plan_before_fit(self.config.get(self.subcommand, self.config), log=rank_zero_info)
        self._metrics: dict[str, dict[str, float]] = {}
        exports = [cb for cb in self.trainer.callbacks if isinstance(cb, ExportPruned)]
        if exports:
            config = self._run_config()
            for cb in exports:
                cb.run_config = config
        mode = self.config.get(self.subcommand, {}).get("evaluate", "after")
        ckpt = self.config.get(self.subcommand, {}).get("ckpt_path")
        if mode in ("before", "both") and ckpt is None:
            self._evaluate(getattr(self.model, "eval_labels", ("dense", "pruned"))[0])

    def after_fit(self) -> None:
        mode = self.config.get(self.subcommand, {}).get("evaluate", "after")
        if mode in ("after", "both"):
            self._evaluate(getattr(self.model, "eval_labels", ("dense", "pruned"))[1])
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


def _check_main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(
            "usage: prox24 check EXPORT_DIR\n\nVerify that every layer in masks.safetensors is "
            "exactly 2:4 in the saved weights, agrees with its mask, and has no -0.0/NaN/Inf."
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    result = check_export(argv[0])
    print(result.verdict())
    return 0 if result.ok else 1


def cli_main(args: list[str] | None = None, **kwargs: Any) -> Prox24CLI:
    """Build (and by default run) the CLI; ``args=None`` reads ``sys.argv``.

    ``model`` is any LightningModule given by class path: ``BlockwisePruner`` prunes,
    ``MaskedFinetuner`` finetunes an export with its masks held fixed. Both are imported here so
    the short names ``--model BlockwisePruner`` / ``--model MaskedFinetuner`` resolve.
    """
    import lightning as L

    from . import strategies  # noqa: F401  (registers trainer.strategy: blockwise_ddp)
    from .finetune import MaskedFinetuner  # noqa: F401  (registers the short name)
    from .pruner import BlockwisePruner  # noqa: F401

    return Prox24CLI(
        L.LightningModule,
        PruningDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        parser_kwargs={"description": "2:4 pruning of causal LMs (Kübler et al., TMLR 2025)"},
        **kwargs,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point ``prox24``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "check":
        raise SystemExit(_check_main(argv[1:]))
    if argv and argv[0] == "plan":
        raise SystemExit(plan_main(argv[1:]))
    cli_main(args)


if __name__ == "__main__":
    main()
