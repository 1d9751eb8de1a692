"""Layer-level pruning: one entry point, :func:`prune_weight`, for every method."""

from .baselines import magnitude_prune, sparsegpt_prune, wanda_prune
from .layer import METHODS, PruneResult, prune_weight

__all__ = [
    "METHODS",
    "PruneResult",
    "magnitude_prune",
    "prune_weight",
    "sparsegpt_prune",
    "wanda_prune",
]
