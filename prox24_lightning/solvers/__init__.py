"""Layer-level pruning: the method registry and one entry point, :func:`prune_weight`."""

from .admm import admm_prune
from .alps import alps_prune
from .baselines import magnitude_prune, sparsegpt_prune, wanda_prune
from .layer import (
    LayerSolve,
    PruneResult,
    PruneStats,
    needs_spread,
    optimizer_hparams,
    prune_weight,
)
from .methods import (
    METHODS,
    RECIPES,
    ADMMConfig,
    ALPSConfig,
    MagnitudeConfig,
    MethodConfig,
    ProxConfig,
    PruningMethod,
    SparseGPTConfig,
    WandaConfig,
    get_method,
    make_config,
)
from .solver_settings import SolverSettings, as_solver_mapping

__all__ = [
    "METHODS",
    "RECIPES",
    "ADMMConfig",
    "ALPSConfig",
    "LayerSolve",
    "needs_spread",
    "MagnitudeConfig",
    "MethodConfig",
    "ProxConfig",
    "PruneResult",
    "PruneStats",
    "PruningMethod",
    "SolverSettings",
    "SparseGPTConfig",
    "WandaConfig",
    "admm_prune",
    "as_solver_mapping",
    "alps_prune",
    "get_method",
    "magnitude_prune",
    "make_config",
    "optimizer_hparams",
    "prune_weight",
    "sparsegpt_prune",
    "wanda_prune",
]
