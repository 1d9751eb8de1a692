"""Optimizers whose ``step()`` is one iteration of a layer-wise 2:4 solver."""

from .prox24 import LocalProblem, Prox24

__all__ = ["LocalProblem", "Prox24"]
