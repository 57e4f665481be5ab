#!/usr/bin/env bash
# The GPU checks of issues 3-5 on the device machine, as two calls back to back (the machine
# stays warm 30 s between them; what a call leaves in /tmp stays). Prepare here, in the venv:
#   bash scripts/gpu_pack.sh                       # gpu-in/a, gpu-in/b, .whl (see its header)
#   git switch -c device && git rm -rq drafters/weights && git commit -qm "device: no weights"
#                                                  # tracked weights would exceed 64 MiB a call
# then, from that branch (git switch main afterwards; the branch is throwaway):
#   run(command="bash scripts/gpu_check.sh a", carry=["gpu-in/a"], timeout_s=120)
#   run(command="bash scripts/gpu_check.sh b", carry=["gpu-in/b", ".whl"], timeout_s=420)
# a: keeps the GGUF's first part in /tmp and starts the GPU tests in the background (they need
#    no model): the Triton kernels' file compiled for CUDA, then the gpu-marked tests (no host
#    sync in the rejection sampler, CUDA graphs against eager).
# b: assembles the model, collects the tests' log, profiles the step-shaped SPS curve (issue 5),
#    and runs `bench spec` (none vs dspark + HF prompt lookup) with CUDA graphs (the target's
#    and, since session 18, the drafter's), without and with the draft guard (issue 4); each
#    prints where a dspark round's time goes (ms by phase). GPU training (issue 3) is
#    gpu_train.sh's, in its own lease.
# Every part has its own timeout; results land in $OUT (or ./gpu-out).
set -uo pipefail
PART=${1:?usage: gpu_check.sh a|b}
if [ "$PART" = a ]; then
  STASH=/tmp/dspark-gpu && mkdir -p "$STASH"
  cp gpu-in/a/model.part0 "$STASH/"
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
  } > "$STASH/gpu.txt" 2>&1
  # the Triton kernels' tests (compiled for CUDA here, not interpreted), then the gpu-marked ones
  setsid bash -c "P='timeout 200 python3 -m pytest -q -p no:cacheprovider --durations=5'
    \$P tests/test_triton_attention.py > $STASH/pytest-gpu.txt 2>&1; echo \"pytest rc=\$?\" >> $STASH/pytest-gpu.txt
    \$P -m gpu tests/test_rejection_sampler.py tests/test_cuda_graphs.py tests/test_engine_spec.py tests/test_drafter_graphs.py tests/test_drafters.py \
      >> $STASH/pytest-gpu.txt 2>&1; echo \"pytest-gpu rc=\$?\" >> $STASH/pytest-gpu.txt" \
    < /dev/null > /dev/null 2>&1 &
  sleep 5; cat "$STASH/gpu.txt"; ls -la "$STASH"
  exit 0
fi
# Part b.
source scripts/gpu_common.sh
mkdir -p drafters/weights && cp -r gpu-in/b/dspark drafters/weights/
for _ in $(seq 60); do grep -q "pytest-gpu rc=" "$STASH/pytest-gpu.txt" 2>/dev/null && break; sleep 2; done
cat "$STASH/gpu.txt" "$STASH/pytest-gpu.txt" > "$OUT/pytest-gpu.txt" 2>&1; echo "pytest-wait at $(( $(date +%s) - t0 )) s" >> "$OUT/times.txt"
# issue 5: the SPS curve at the CUDA-graph buckets (cached for the benches below)
step profile 70 python3 -m server.cli profile --json "$OUT/profile.json"
# issue 4: none vs dspark side by side (+ HF prompt lookup on the GPU), graphs on, then with
# the draft guard (session 17 measured graphs off: 6.4x slower; dspark 0.78x none with graphs)
B="python3 -m server.cli bench spec --methods none,dspark --prompts gpu-in/b/bench-prompts.jsonl --no-identical"
step bench-graphs 120 $B --repeats 2 --json "$OUT/bench-spec-graphs.json"
step bench-guard 120 $B --repeats 2 --draft-guard --json "$OUT/bench-spec-guard.json"
cat "$OUT/times.txt"
