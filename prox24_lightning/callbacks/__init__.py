"""Callbacks of the pruning run, one module per job.

* :mod:`.checkpoint_io`: :class:`AtomicCheckpointIO`, the atomic ``last.ckpt`` writer.
* :mod:`.block_checkpoint`: :class:`BlockCheckpoint`, ``last.ckpt`` after every pruned block.
* :mod:`.progress`: :class:`BlockProgressBar`, ``block k/N`` instead of ``Epoch k``.
* :mod:`.logger`: :class:`RunLogger`, ``logs/metrics.csv`` with one row per pruned layer.
* :mod:`.masks`: :class:`MaskCheckpoint`, each block's masks as soon as it is pruned.
* :mod:`.export`: :class:`ExportPruned`, the checked export with its report.
* :mod:`.install`: :func:`install_pruning_callbacks`, what a pruning run adds by itself.
* :mod:`.protocol`: :class:`BlockPruning`, what these callbacks use of the module.

Every name is re-exported here: YAML configs name them as ``prox24_lightning.callbacks.X``.
"""

from ..artifacts import load_masks
from ..reports import library_versions
from .block_checkpoint import BlockCheckpoint, warn_about_checkpoint_callbacks
from .checkpoint_io import AtomicCheckpointIO, install_atomic_checkpoint_io
from .export import ExportPruned
from .install import install_pruning_callbacks
from .logger import RunLogger
from .masks import MaskCheckpoint
from .progress import BlockProgressBar
from .protocol import BlockPruning

__all__ = [
    "AtomicCheckpointIO",
    "BlockProgressBar",
    "RunLogger",
    "install_pruning_callbacks",
    "BlockCheckpoint",
    "BlockPruning",
    "MaskCheckpoint",
    "ExportPruned",
    "install_atomic_checkpoint_io",
    "warn_about_checkpoint_callbacks",
    # Re-exported from their own modules, as the single-file callbacks module did.
    "library_versions",
    "load_masks",
]
