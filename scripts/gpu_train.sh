#!/usr/bin/env bash
# Drafter training data and training on the device machine (issue 3: "if your session has a
# GPU, train there too"). Prepare as for gpu_check.sh (bash scripts/gpu_pack.sh, which writes
# 512 training prompts a domain; the no-weights branch), then in one lease, back to back:
#   run(command="bash scripts/gpu_check.sh a", carry=["gpu-in/a"], timeout_s=120)
#   run(command="bash scripts/gpu_train.sh", carry=["gpu-in/b", ".whl"], timeout_s=600)
# The target answers gpu-in/b/train-prompts.jsonl on the GPU (batch 256; features cached in /tmp),
# then each drafter of DRAFTERS trains TRAIN_S seconds of wall clock (`--minutes`: the same budget
# for each, the schedule annealed over it) at SEQS sequences a step, DSpark's head at rank 256,
# bf16 autocast. Session 17 measured the GPU at 0.16 s a step of 32 sequences against 1.8-3.0 s a
# step of 8 on one CPU thread (~45x a sequence); 128 a step ran 0.53 s (likely host-bound: fewer
# optimiser steps for 1.27x the sequences); 1,536 prompts answered in 94 s.
# Time: ~40 s model conversion + ~100 s data + per drafter TRAIN_S + ~17 s start, under 600 s.
# Out ($OUT): the trained drafters (no checkpoints) as one tar in 15 MiB parts (a file over 16 MiB
# does not come back): `cat drafters.tar.part* | tar -x -C DIR` here; the log, times.txt, and the
# Triton tests' log from part a.
set -uo pipefail
source scripts/gpu_common.sh
DATA=/tmp/dspark-data
RUNS=/tmp/dspark-drafters
TRAIN_S=${TRAIN_S:-200}
SEQS=${SEQS:-32}
DRAFTERS=${DRAFTERS:-"dspark dflash"}  # of: dspark dspark-rnn dflash eagle3 mtp1
step train-data 150 python3 -m server.cli train data --prompts gpu-in/b/train-prompts.jsonl \
  --out "$DATA" --batch 256
# name:method:head:layers (Eagle3 is the one-layer chain; the rest have the default 2 layers)
for spec in dspark:dspark:markov: dspark-rnn:dspark:rnn: dflash:dflash:: eagle3:eagle3::1 mtp1:mtp1::; do
  IFS=: read -r name method head layers <<< "$spec"
  [[ " $DRAFTERS " == *" $name "* ]] || continue
  step "train-$name" $((TRAIN_S + 40)) python3 -m server.cli train drafter --data "$DATA" \
    --out "$RUNS/$name" --method "$method" ${head:+--head "$head"} ${layers:+--layers "$layers"} \
    --lr 1e-3 --minutes "$(awk "BEGIN {print $TRAIN_S / 60}")" --seqs-per-step "$SEQS" \
    --head-rank 256 --precision auto --fuse-loss
done
tar -C "$RUNS" -cf - --exclude checkpoint.pt . | split -b 15M -d -a 1 - "$OUT/drafters.tar.part"
cp "$STASH/pytest-gpu.txt" "$OUT/" 2>/dev/null
cat "$OUT/times.txt"
