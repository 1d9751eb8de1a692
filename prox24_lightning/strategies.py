"""A DDP strategy for gradient-free, layer-wise pruning, and the collectives the pruner uses.

Lightning's ``DDPStrategy`` wraps the module in ``DistributedDataParallel``, which refuses a module
without trainable parameters (the pruner trains nothing: its ``Prox24`` steps are analytic). The
pruner only needs the process group: calibration batches are sharded by Lightning's
``DistributedSampler`` and Gram matrices are summed with ``strategy.reduce`` before every solve.
The layer solves of a block are independent, so they are spread over the ranks
(:func:`assign_layers`); each solved weight and mask is then broadcast from the rank that owns it
(:func:`broadcast_`, raw bytes, so bit-exact), and all ranks hold the same model.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from .pipeline.distributed import all_gather_objects, assign_layers, broadcast_, is_distributed

__all__ = [
    "BlockwiseDDPStrategy",
    "all_gather_objects",
    "assign_layers",
    "broadcast_",
    "is_distributed",
]


class BlockwiseDDPStrategy(DDPStrategy):
    """``DDPStrategy`` without the ``DistributedDataParallel`` wrapper (nothing is trained)."""

    strategy_name = "blockwise_ddp"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        return model


def register() -> None:
    """Make ``trainer.strategy: blockwise_ddp`` available (idempotent)."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "blockwise_ddp" not in StrategyRegistry:
        StrategyRegistry.register(
            "blockwise_ddp",
            BlockwiseDDPStrategy,
            description="DDP for layer-wise pruning: process group and reductions, no DDP wrapper",
        )


register()
