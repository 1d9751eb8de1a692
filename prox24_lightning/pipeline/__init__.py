"""The pruning pipeline in plain PyTorch (no Lightning): the rooms the pruner's hooks call.

* :class:`PrunableModel` (:mod:`.model`): the model, resident or offloaded, and the
  activations entering a block;
* :class:`BlockInputCache` (:mod:`.inputs`): cached activations entering the current block;
* :class:`BlockStage` (:mod:`.stage`): one block — calibrate, solve every layer, propagate;
* :class:`PruneState` (:mod:`.state`): report, masks, finished blocks, checkpoint form,
  fingerprint;
* :class:`TargetSelector` and the model/mask checks (:mod:`.targets`);
* collectives for multi-process runs (:mod:`.distributed`).

:class:`~prox24_lightning.pruner.BlockwisePruner` is the thin Lightning adapter on top.
"""

from .distributed import Collective, SingleProcess, all_gather_objects, assign_layers, broadcast_
from .inputs import BlockInputCache
from .model import PrunableModel
from .progress import SolveProgress
from .stage import BlockStage, StageSettings, check_finite
from .state import (
    PruneState,
    compare_fingerprints,
    layer_report,
    restore_pruned_weights,
    run_fingerprint,
)
from .targets import TargetSelector, check_masks, check_weights_finite

__all__ = [
    "BlockInputCache",
    "BlockStage",
    "Collective",
    "PrunableModel",
    "PruneState",
    "SingleProcess",
    "SolveProgress",
    "StageSettings",
    "TargetSelector",
    "all_gather_objects",
    "assign_layers",
    "broadcast_",
    "check_finite",
    "check_masks",
    "check_weights_finite",
    "compare_fingerprints",
    "layer_report",
    "restore_pruned_weights",
    "run_fingerprint",
]
