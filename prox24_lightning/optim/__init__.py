"""Optimizers whose ``step()`` is one iteration of a layer-wise 2:4 solver."""

from .prox24 import LayerStatus, LocalProblem, Prox24
from .settings import ProxPhaseSettings

__all__ = ["LayerStatus", "LocalProblem", "ProxPhaseSettings", "Prox24"]
