"""The cost model of each method's solve of one ``d_out x d_in`` layer (``m x n``).

For the run plan (``prox24 plan`` and the banner of ``prox24 fit``): floating-point operations,
the method's own buffers on the accelerator, and a time per block on a stated accelerator
throughput. Estimates from the algorithms, not measurements; docs/results.md has the measured
times next to them.

**FLOPs** (a GEMM ``m x n`` by ``n x n`` is ``2 m n^2``; an eigendecomposition ``9 n^3``, a
Cholesky factorisation and inverse ``2 n^3``, in line with LAPACK's operation counts):

* magnitude, Wanda: elementwise, ``O(m n)``.
* SparseGPT: the inverse Hessian's Cholesky factor ``2 n^3`` plus the lazy OBS updates ``2 m n^2``.
* ALPS: ``eigh`` once, ``I`` ADMM iterations of one GEMM each plus the rebuild of
  ``(G + ρI)^{-1}`` (``2 n^3``) every 3 iterations, 10 PCG steps.
* prox, ``prox_solver: admm`` (the default): as ALPS, and the elementwise 2:4 prox; for wide
  layers (``3m < n``) the inverse is applied through the eigenvectors instead (two GEMMs per
  iteration, no rebuild). Then ``refine_steps`` CG steps.
* prox, ``prox_solver: gradient``: one GEMM per prox iteration (``log(lambda_end / lambda0) /
  log(beta)`` of them) and per refinement step; the exact mask search adds a ``k x k``
  factorisation per row (``k = n/2``): ``m k^3 / 3`` per round start, the cost that makes it a
  recipe for small layers.
* ADMM (Boža): one Cholesky inverse, ``admm_iterations`` GEMMs.

Iteration counts that depend on the data use :data:`ASSUMED_ITERATIONS` (typical values on real
layers; a run prints the real counts in its report).

**Buffers** (fp32 unless said): every method holds the layer's normalised Gram (``4 n^2``, counted
by the plan) and the working weight, the target and refinement buffers (``SOLVER_COPIES`` x ``4 m
n``); the methods add:

* ADMM phases (prox default, ALPS): ``Y``, ``D``, ``V`` (``3 x 4 m n``), the top-two masks
  (``m n`` bytes), the eigenvectors (``4 n^2``), the inverse (``4 n^2``, not for wide layers), and
  while ``eigh`` runs, an fp64 copy, its eigenvectors and the solver's workspace (``~4 x 8 n^2``,
  one layer at a time).
* SparseGPT: the inverse Hessian's factor (``4 n^2``), ADMM (Boža): its inverse (``4 n^2``).
* the exact mask search: its per-row inverses, chunked (``128 MiB``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ASSUMED_ITERATIONS",
    "EIGH_TFLOPS",
    "GEMM_TFLOPS",
    "SolverCost",
    "layer_cost",
]

#: Accelerator throughput the time column assumes: IEEE fp32 GEMMs (an H100 SXM's fp32 peak is
#: about 67 TFLOP/s; 40 is a sustained figure), and fp64 symmetric eigendecompositions.
GEMM_TFLOPS = 40.0
EIGH_TFLOPS = 2.0
#: Typical data-dependent iteration counts (the estimate's assumption, not a measurement).
ASSUMED_ITERATIONS = {
    "alps": 33,
    "prox_admm": 36,
    # lambda grows from lambda0 to about 10^3 lambda0 before every group is 2:4
    "lambda_range": 1e3,
}
#: Elementwise work of the 2:4 prox per weight (sort, screens, the exact solves of the groups
#: that need them), in FLOP-equivalents.
PROX_FLOPS_PER_WEIGHT = 200
#: Bytes of the exact mask search's per-row inverse chunks.
SEARCH_CHUNK_BYTES = 128 * 2**20


@dataclass(frozen=True)
class SolverCost:
    """One layer's solve: GEMM-class FLOPs, eigendecomposition FLOPs (fp64), elementwise work,
    and the method's own buffers (persistent while the layer is solved, and a transient peak)."""

    gemm_flops: float
    eigh_flops: float
    buffer_bytes: int
    transient_bytes: int = 0

    @property
    def flops(self) -> float:
        return self.gemm_flops + self.eigh_flops

    def seconds(self, gemm_tflops: float = GEMM_TFLOPS, eigh_tflops: float = EIGH_TFLOPS) -> float:
        return self.gemm_flops / (gemm_tflops * 1e12) + self.eigh_flops / (eigh_tflops * 1e12)


def _get(config: Any, key: str, default: Any) -> Any:
    value = getattr(config, key, default)
    return default if value is None else value


def layer_cost(method: str, config: Any, d_out: int, d_in: int) -> SolverCost:
    """The cost of ``method`` with its resolved ``config`` (a method config dataclass) on one
    ``d_out x d_in`` layer (see the module docstring)."""
    m, n = float(d_out), float(d_in)
    gemm = 2.0 * m * n * n
    mn4 = 4 * d_out * d_in
    refine = int(_get(config, "refine_steps", 0)) * gemm
    eigh, eigh_transient = 9.0 * n**3, 4 * 8 * d_in * d_in

    def admm_buffers(wide: bool) -> int:
        return 3 * mn4 + d_out * d_in + 4 * d_in * d_in * (1 if wide else 2)

    if method in ("magnitude", "wanda"):
        return SolverCost(10.0 * m * n + refine, 0.0, 0)
    if method == "sparsegpt":
        return SolverCost(2.0 * n**3 + gemm + refine, 0.0, 4 * d_in * d_in)
    if method == "admm":
        iterations = int(_get(config, "admm_iterations", 20))
        return SolverCost(2.0 * n**3 + iterations * gemm + refine, 0.0, 4 * d_in * d_in)
    if method == "alps":
        iterations = ASSUMED_ITERATIONS["alps"]
        pcg = int(_get(config, "alps_pcg_iterations", 10))
        work = iterations * gemm + (iterations // 3) * 2.0 * n**3 + pcg * gemm + refine
        return SolverCost(work, eigh, admm_buffers(False), eigh_transient)
    if method != "prox":
        raise ValueError(f"no cost model for method {method!r}")
    prox_op = PROX_FLOPS_PER_WEIGHT * m * n
    if _get(config, "prox_solver", "gradient") == "admm":
        iterations = ASSUMED_ITERATIONS["prox_admm"]
        wide = 3 * d_out < d_in
        per_iteration = 2 * gemm if wide else gemm + 2.0 * n**3 / 3
        work = iterations * (per_iteration + prox_op) + refine
        return SolverCost(work, eigh, admm_buffers(wide), eigh_transient)
    beta = float(_get(config, "beta", 1.01))
    prox_steps = math.ceil(math.log(ASSUMED_ITERATIONS["lambda_range"]) / math.log(beta))
    work = prox_steps * (gemm + prox_op) + refine
    rounds = int(_get(config, "mask_search_rounds", 0))
    transient = 0
    if rounds > 0:
        k = n / 2
        # A factorisation and inverse per row at the start, rank updates per round.
        work += m * (k**3 / 3 + k**3) + rounds * m * k * k * 4 * int(
            _get(config, "mask_search_swaps", 16)
        )
        transient = SEARCH_CHUNK_BYTES
    return SolverCost(work, 0.0, 0, transient)
