"""GPU-only checks (skipped cleanly without CUDA): bf16 pruning numerics and the 2:4 kernel."""

from __future__ import annotations

import pytest
import torch

from prox24_lightning.ops import is_2of4
from prox24_lightning.solvers import RECIPES, prune_weight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _layer(d_out: int = 256, d_in: int = 512, n: int = 4096):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, d_in, generator=g) * torch.exp(torch.randn(d_in, generator=g))
    return torch.randn(d_out, d_in, generator=g) * 0.02, x.T @ x


@pytest.mark.parametrize("method", ["prox", "wanda", "sparsegpt"])
def test_cuda_bf16_matches_cpu_fp32_quality(method):
    w, h = _layer()
    cpu = prune_weight(w, h, method, config=RECIPES["fast"])
    gpu = prune_weight(w.cuda().bfloat16(), h.cuda(), method, config=RECIPES["fast"])
    assert gpu.weight.dtype == torch.bfloat16 and gpu.weight.is_cuda
    assert is_2of4(gpu.weight) and not bool(torch.signbit(gpu.weight[gpu.weight == 0]).any())
    # solver math is fp32 on both devices: losses agree up to the bf16 input rounding
    assert gpu.stats.loss_final <= cpu.stats.loss_final * 1.05 + 1e-6


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="semi-structured sparsity needs compute capability >= 8.0",
)
def test_semi_structured_kernel_reproduces_pruned_layer():
    from torch.sparse import to_sparse_semi_structured

    w, h = _layer(d_out=512, d_in=512)
    pruned = prune_weight(w, h, "wanda").weight.cuda().bfloat16()
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    dense = torch.nn.functional.linear(x, pruned)
    sparse = torch.nn.functional.linear(x, to_sparse_semi_structured(pruned))
    torch.testing.assert_close(sparse, dense, rtol=2e-2, atol=2e-2)
