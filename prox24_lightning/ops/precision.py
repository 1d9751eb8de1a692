"""The solver's matmul precision, set locally and restored, whatever the global setting is.

``torch.set_float32_matmul_precision("high"/"medium")`` (Lightning suggests it on GPUs with
tensor cores) lets every fp32 GEMM run in TF32 (10-bit mantissa) on CUDA, and "medium" runs fp32
GEMMs in bf16 through oneDNN on CPUs with AVX512-BF16/AMX. That is fine for training, but a Gram
``H = sum_t x_t x_t^T`` and the masked refit are statistics and least-squares solves: their
rounding errors accumulate over every token and every refinement step, and TF32's short mantissa
moves the refit's result visibly (docs/results.md, "Figures moved from the code"). So Gram
accumulation, refinement and the power iteration run under :func:`matmul_precision` (IEEE fp32),
and only the prox phase may opt into TF32 (``prox_tf32``), where the iterate is re-projected
every step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["matmul_precision"]

#: torch >= 2.9 has per-backend settings (``fp32_precision``); reading the legacy ones after a
#: user set the new ones can raise, so the new API is used alone where it exists.
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(
    getattr(torch.backends, "mkldnn", None), "matmul"
)


@contextmanager
def matmul_precision(tf32: bool = False) -> Iterator[None]:
    """Run the block's fp32 matrix products in IEEE fp32 (or TF32 with ``tf32=True``).

    Sets the CUDA (cuBLAS) and CPU (oneDNN) fp32 matmul precision for the duration of the block
    and restores exactly the previous values afterwards, also when the block raises. It is
    cheap (a few attribute writes) and nests. Call it outside ``torch.compile``d functions:
    inductor's GEMMs read the setting at run time.

    Args:
        tf32: allow TF32 (the prox phase's option); ``False`` is full fp32.
    """
    if _NEW_API:
        cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
        saved = (cuda.fp32_precision, mkldnn.fp32_precision)
        value = "tf32" if tf32 else "ieee"
        cuda.fp32_precision = value
        mkldnn.fp32_precision = value
        try:
            yield
        finally:
            cuda.fp32_precision, mkldnn.fp32_precision = saved
        return
    # torch < 2.9: one global setting.
    old_precision = torch.get_float32_matmul_precision()
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old_precision)
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
