"""Pure tensor math for 2:4 pruning. Nothing here imports Lightning."""

from .gram import DiagonalNormalization, GramAccumulator, lipschitz, local_loss, normalize
from .masks import apply_mask, frac_groups_2of4, is_2of4, mask_2of4, pack_mask, unpack_mask
from .prox import group_view, prox_2of4, prox_objective, reg_2of4

__all__ = [
    "DiagonalNormalization",
    "GramAccumulator",
    "apply_mask",
    "frac_groups_2of4",
    "group_view",
    "is_2of4",
    "lipschitz",
    "local_loss",
    "mask_2of4",
    "normalize",
    "pack_mask",
    "prox_2of4",
    "prox_objective",
    "reg_2of4",
    "unpack_mask",
]
