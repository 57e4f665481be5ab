#!/usr/bin/env bash
# The CPU cycle that replaces the shipped drafter set, one phase per call (each resumable):
#   scripts/drafter_set.sh data       the target answers the training prompts (DATA) and the 90
#                                     evaluation prompts (runs/data-evalset, for `proxy`)
#   scripts/drafter_set.sh train      the five drafters and eagle3-2l at one budget, two lanes
#                                     of one thread each
#   scripts/drafter_set.sh proxy      teacher-forced greedy τ on the eval-set answers (~25 s each)
#   scripts/drafter_set.sh eval       dspark eval at T = 0 and 1 for all six (those trained to the
#                                     end so far), and the README table
#   scripts/drafter_set.sh calibrate  DSpark's two calibrations (temperature 1, then greedy)
# Settings (environment): SET (name prefix, default "next"), DATA (runs/data-ps2; several
# directories, space-separated, train as one: `data` then refuses), STEPS (1400),
# RANK (DSpark's head rank, 256), DECAY (the loss's position decay, 4), PROMPTS (training
# prompts per domain for `data`, 256), PRECISION (auto: bf16 where native), FUSE
# (--fuse-loss; empty to leave it off) and INIT (a path prefix: each drafter continues from
# ${INIT}NAME, e.g. INIT=drafters/weights/ for a second budget on the shipped set; a drafter
# without one there is skipped). Drafters land in runs/drafters/$SET-NAME, logs in
# runs/log-$SET-NAME.txt, reports in runs/eval/.
# Shipping is a decision, not a phase: copy weights.safetensors and drafter.json (and DSpark's
# calibrations) of all five into drafters/weights/NAME together (the table stays at one budget),
# and only when the set's rows beat the shipped ones beyond their noise (session 14 shipped with
# every row up but DFlash at T = 1, -0.6%). eagle3-2l is a table row, not shipped.
# Run it inside the project's virtual environment (`dspark` and `python` on the PATH).
set -uo pipefail
cd "$(dirname "$0")/.."
SET=${SET:-next} DATA=${DATA:-runs/data-ps2} STEPS=${STEPS:-1400} RANK=${RANK:-256}
DECAY=${DECAY:-4} PROMPTS=${PROMPTS:-256} PRECISION=${PRECISION:-auto} FUSE=${FUSE---fuse-loss}
INIT=${INIT:-}
NAMES=(dspark dspark-rnn dflash eagle3 eagle3-2l mtp1)
# Eagle3 is the one-layer chain the issue and the paper define; eagle3-2l is the same chain at
# the parallel drafters' depth (2 layers), the equal-depth row of the table.
declare -A METHOD=([dspark]="dspark --head markov" [dspark-rnn]="dspark --head rnn"
                   [dflash]=dflash [eagle3]="eagle3 --layers 1" [eagle3-2l]=eagle3 [mtp1]=mtp1)
mkdir -p runs/eval
DATA_ARGS=()
for dir in $DATA; do DATA_ARGS+=(--data "$dir"); done

finished() {  # name: its weights are saved, without a stop mark (a run cut short has one)
  python -c "import sys, pathlib; from drafters.registry import read_drafter_config as read
sys.exit('stopped_at_step' in read(pathlib.Path(sys.argv[1]))[1])" "runs/drafters/$SET-$1" 2>/dev/null
}

train_one() {  # name: a finished drafter is left alone
  local out=runs/drafters/$SET-$1
  finished "$1" && return
  local init=()
  if [ -n "$INIT" ]; then
    [ -f "${INIT}$1/drafter.json" ] || { echo "no ${INIT}$1 to continue: $1 skipped" >&2; return; }
    init=(--init "${INIT}$1")
  fi
  # shellcheck disable=SC2086  # METHOD holds "method [--head h]", FUSE a flag or nothing
  dspark train drafter "${DATA_ARGS[@]}" --out "$out" --method ${METHOD[$1]} --head-rank "$RANK" \
    --decay "$DECAY" --steps "$STEPS" --lr 1e-3 --precision "$PRECISION" $FUSE --num-threads 1 \
    "${init[@]}" >> "runs/log-$SET-$1.txt" 2>&1
}

case ${1:-} in
  data)  # the evaluation prompts twice each: the even copy is answered greedily
    [ ${#DATA_ARGS[@]} -eq 2 ] || { echo "data answers into one directory; DATA=$DATA" >&2; exit 2; }
    python -c "import json; from drafters.prompts import eval_prompts
print(''.join(2 * (json.dumps({'domain': p['domain'], 'prompt': p['prompt']}) + '\n')
              for p in eval_prompts(30)), end='')" > runs/evalset-prompts.jsonl
    dspark train data --prompts runs/evalset-prompts.jsonl --out runs/data-evalset \
      --max-new-tokens 128 --num-threads 2 &&
    dspark train data --per-domain "$PROMPTS" --out "$DATA" --num-threads 2 ;;
  train)  # DSpark and DFlash first, side by side: their ratio is the first figure a set gives
    (train_one dspark; train_one eagle3; train_one mtp1) &
    (train_one dflash; train_one dspark-rnn; train_one eagle3-2l) &
    wait ;;
  proxy)
    for n in "${NAMES[@]}"; do
      finished "$n" || { echo "$SET-$n: not trained to the end yet" >&2; continue; }
      dspark eval --data runs/data-evalset --drafter "runs/drafters/$SET-$n" --num-threads 1 \
        | tail -n 1
    done ;;
  eval)
    for t in 0 1; do
      for n in "${NAMES[@]}"; do  # the drafters trained to the end so far
        finished "$n" || continue
        [ -f "runs/eval/$SET-$n-t$t.json" ] || dspark eval --drafter "runs/drafters/$SET-$n" \
          --temperature "$t" --per-domain 20 --max-new-tokens 128 --batch 10 --num-threads 2 \
          --json "runs/eval/$SET-$n-t$t.json" > /dev/null
      done
    done
    dspark eval-table runs/eval/"$SET"-*-t0.json runs/eval/"$SET"-*-t1.json \
      --plot "runs/eval/$SET-acceptance.png" ;;
  calibrate)
    d=runs/drafters/$SET-dspark
    dspark calibrate --drafter "$d" --per-domain 130 --max-new-tokens 128 --batch 20 \
      --rounds-out "runs/calib-rounds-$SET.npz" --json "runs/calib-$SET.json" --num-threads 2
    dspark calibrate --drafter "$d" --temperature 0 --per-domain 130 --max-new-tokens 128 \
      --batch 20 --rounds-out "runs/calib-rounds-greedy-$SET.npz" \
      --json "runs/calib-greedy-$SET.json" --num-threads 2 ;;
  *)
    echo "usage: scripts/drafter_set.sh data|train|proxy|eval|calibrate" >&2
    exit 2 ;;
esac
