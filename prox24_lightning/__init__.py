"""prox24_lightning: 2:4 post-training pruning with the proximal operator of Kübler et al. (TMLR 2025)."""

__version__ = "0.1.0"
