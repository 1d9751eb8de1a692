#!/usr/bin/env bash
# GPU check: the default prox solver, ALPS and SparseGPT on a Llama-2-7B block and a 70B
# down_proj shape (time, peak memory, loss); a Llama-2-7B-shaped block (Grams, prox phase split into GEMM / prox /
# sync, fast and capped paper recipe, Wanda, SparseGPT, peak memory), a bf16-true `prox24 fit`,
# the CUDA offload test and the 2:4 semi-structured kernel; one table at the end. About 8 minutes
# of GPU time; every part has its own timeout, and any failed or timed-out part makes the exit
# status non-zero. Works from a fresh checkout: the repository root goes on PYTHONPATH and only
# the project's declared dependencies are needed (no packaged model, no network).
#
#   tools/gpu_check.sh              # on a CUDA machine
#   tools/gpu_check.sh --dry-run    # the same script on the CPU with shapes / 32 (CI)
#   PY=/path/to/python tools/gpu_check.sh --parts block --timeout block=400
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${PY:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
exec "$PY" tools/gpu_check.py "$@"
