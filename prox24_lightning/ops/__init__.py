"""Pure tensor math for 2:4 pruning. Nothing here imports Lightning."""

from .gram import (
    REFERENCE_TOKENS,
    DiagonalNormalization,
    GramAccumulator,
    GramSpread,
    lipschitz,
    local_loss,
    normalize,
    shrinkage_ridge,
    token_scale,
)
from .masks import apply_mask, frac_groups_2of4, is_2of4, mask_2of4, pack_mask, unpack_mask
from .precision import matmul_precision
from .prox import group_view, prox_2of4, prox_objective, reg_2of4

__all__ = [
    "REFERENCE_TOKENS",
    "DiagonalNormalization",
    "GramAccumulator",
    "GramSpread",
    "apply_mask",
    "frac_groups_2of4",
    "group_view",
    "is_2of4",
    "lipschitz",
    "local_loss",
    "mask_2of4",
    "matmul_precision",
    "normalize",
    "pack_mask",
    "prox_2of4",
    "shrinkage_ridge",
    "prox_objective",
    "reg_2of4",
    "token_scale",
    "unpack_mask",
]
