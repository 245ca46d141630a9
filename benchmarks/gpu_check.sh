#!/usr/bin/env bash
# The GPU check: one call on a CUDA machine (one H100: a few minutes), nothing installed beyond the
# README's "GPU install" (a CUDA build of torch, then the pins).
#
#   benchmarks/gpu_check.sh            # from the repository root
#
# 1. pytest -m gpu: tests/test_gpu.py (SD 1.5 / SDXL tiny folders: stages 1 and 2 in bf16 under
#    DeepSpeed ZeRO-2 on cuda, the export sampled in bf16 and fp16, the fp16 base loader).
# 2. benchmarks/gpu_throughput.py: stage-2 steps/s of an SDXL-shaped UNet, DeepSpeed bf16 ZeRO-2
#    against plain fp32 PyTorch measured in the same run.
# Exits non-zero when CUDA is missing (the tests would only skip), a test fails, or the benchmark fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (a CPU build? see README 'GPU install')")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
start=$(date +%s)
timeout 360 "$PYTHON" -m pytest -m gpu tests/test_gpu.py -q
echo "gpu_check: pytest -m gpu took $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout 180 "$PYTHON" benchmarks/gpu_throughput.py "$@"
echo "gpu_check: throughput took $(( $(date +%s) - start )) s"
