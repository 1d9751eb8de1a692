"""What the console shows: library messages nobody pruning a model needs are filtered here, once,
for every ``prox24`` command.

A pruning run prints its run plan, its progress bars, one line per finished block and the
summary of the export; the library lines below say nothing a user acts on (the seed is recorded
in the report, the devices in the plan) or, like the ``Trainer.fit`` stop message, land in the
middle of a progress bar.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["quiet"]

#: Lines nobody pruning a model needs (Lightning's and torch's, matched by message).
_QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",
    r"Found \d+ module\(s\) in eval mode.*",
    r"Starting from v1\.9\.0, `tensorboardX` has been removed.*",
    r"The '\w+_dataloader' does not have many workers.*",
    r".*`max_epochs` was not set.*",
    r"The number of training batches \(\d+\) is smaller than the logging interval.*",
    # LightningCLI seeds every run (``seed_everything: true``); the seed is in the report.
    r"No seed found, seed set to \d+",
    # The ``prox24`` executable hands its arguments to LightningCLI as ``args`` on purpose.
    r"LightningCLI's args parameter is intended to run from within Python.*",
)

#: Logger name -> messages dropped from it (``re.search`` on the formatted message).
_QUIET_LOGS: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        r"^💡 Tip",
        r"^GPU available: ",
        r"^TPU available: ",
        r"^HPU available: ",
        # The pruner ends fit itself after the last block (max_epochs = number of blocks); a
        # partial run gets the CLI's resume hint instead.
        r"^`Trainer\.fit` stopped: `max_epochs=",
    ),
    "lightning.fabric.utilities.rank_zero": (r"^💡 Tip",),
    "lightning.fabric.utilities.seed": (r"Seed set to \d+",),
    "lightning.pytorch.accelerators.cuda": (r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",),
}


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def _quiet_transformers_bars() -> None:
    """No "Loading weights" / "Writing model shards" bars (a bar per load and save, twice per
    run, fast next to the pruning); hub download bars stay as they were."""
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - both are dependencies
        return
    hub_bars = not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns the hub's bars off: restored below
    if hub_bars:
        enable_progress_bars()


def quiet() -> None:
    """Install the filters (idempotent)."""
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, patterns in _QUIET_LOGS.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in log.filters):
            log.addFilter(_DropMessages(patterns))
    _quiet_transformers_bars()
