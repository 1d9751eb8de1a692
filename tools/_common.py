"""Helpers shared by the scripts in ``tools/`` (not part of the library API).

The synthetic data generator lives here so that the toy experiment and the benchmark use the same,
fixed recipe for "LLM-like" calibration features (paper.md §9): a few shared latent factors make
the features strongly correlated, a little isotropic noise keeps the Gram matrix full rank, and
log-normal per-feature scales give the heavy-tailed input norms that separate Wanda from
magnitude pruning in real models.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FeatureSpec",
    "best_time",
    "correlated_features",
    "markdown_table",
    "recipe",
    "round_to_multiple",
    "set_threads",
]


@dataclass(frozen=True)
class FeatureSpec:
    """Recipe for :func:`correlated_features`.

    Attributes:
        rank: number of shared latent factors, as a fraction of ``d_in`` (at least 1 factor).
        noise: standard deviation of the per-feature isotropic noise relative to the unit-variance
            factor part; small values mean strongly correlated features.
        scale_sigma: standard deviation of ``log`` of the per-feature scales (log-normal).
    """

    rank: float = 0.25
    noise: float = 0.3
    scale_sigma: float = 1.0


def correlated_features(
    n: int, d_in: int, generator: torch.Generator, spec: FeatureSpec | None = None
) -> Tensor:
    """Calibration inputs ``X`` ``[n, d_in]`` (float64) with correlated, heavy-tailed features.

    ``X = (F A + noise * E) diag(s)`` with ``F ~ N(0, 1)`` ``[n, k]``, ``A ~ N(0, 1/k)`` ``[k, d_in]``
    (so the factor part of each feature has unit variance), ``E ~ N(0, 1)`` and
    ``s_j = exp(scale_sigma * N(0, 1))``.
    """
    spec = spec or FeatureSpec()
    k = max(1, round(spec.rank * d_in))
    kw = dict(generator=generator, dtype=torch.float64)
    factors = torch.randn(n, k, **kw)
    loading = torch.randn(k, d_in, **kw) / math.sqrt(k)
    noise = torch.randn(n, d_in, **kw)
    scales = torch.exp(spec.scale_sigma * torch.randn(d_in, **kw))
    return (factors @ loading + spec.noise * noise) * scales


def recipe(name: str, **overrides: Any) -> dict[str, Any]:
    """The named prox recipe of ``prox24_lightning.solvers.RECIPES`` as keyword arguments for
    ``prune_weight``, with ``overrides`` applied (a fresh dict: the shared recipe never changes).
    """
    from prox24_lightning.solvers import RECIPES

    value = RECIPES[name]
    kwargs = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
    kwargs.update(overrides)
    return kwargs


def round_to_multiple(x: float, multiple: int = 4) -> int:
    """``x`` rounded to the nearest positive multiple of ``multiple`` (2:4 needs multiples of 4)."""
    return max(multiple, multiple * round(x / multiple))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (``None`` keeps the default) and return it."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def best_time(
    fn: Callable[[], object], repeats: int, *, sync: Callable[[], None] | None = None
) -> float:
    """Best wall time in seconds of ``repeats`` calls of ``fn`` (after one untimed warm-up).

    The minimum, not the mean, because other jobs share the machine: noise only ever adds time.
    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before reading the clock.
    """
    fn()
    if sync is not None:
        sync()
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        best = min(best, time.perf_counter() - start)
    return best


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; floats should be pre-formatted by the caller."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])
