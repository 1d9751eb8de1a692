"""Layer-level pruning: one entry point, :func:`prune_weight`, for every method."""

from .baselines import magnitude_prune, sparsegpt_prune, wanda_prune
from .layer import (
    METHODS,
    RECIPES,
    LayerSolve,
    PruneResult,
    PruneStats,
    SolverConfig,
    prune_weight,
)

__all__ = [
    "METHODS",
    "RECIPES",
    "LayerSolve",
    "PruneResult",
    "PruneStats",
    "SolverConfig",
    "magnitude_prune",
    "prune_weight",
    "sparsegpt_prune",
    "wanda_prune",
]
