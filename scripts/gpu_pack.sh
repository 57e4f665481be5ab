#!/usr/bin/env bash
# Packs what scripts/gpu_check.sh needs on the device machine, here, inside the venv (one call
# carries at most 64 MiB with the working tree; the model's GGUF alone is 94 MiB):
#   gpu-in/a  the first 60 MiB of the embedded model's GGUF
#   gpu-in/b  the rest of it, the shipped dspark drafter, the bench and training prompts
#   .whl      the gguf wheel (transformers' GGUF loader needs it; the device image lacks it)
# The tracked drafter weights (74 MiB) must not travel either: run the two calls from a branch
# that drops them (gpu_check.sh's header says how), and carry gpu-in/a, then gpu-in/b.
set -euo pipefail
TRAIN_PER_DOMAIN=${TRAIN_PER_DOMAIN:-512}  # for gpu_train.sh (1,536 prompts answered in ~100 s)
grep -qx '/gpu-in/' .git/info/exclude 2>/dev/null || printf '/gpu-in/\n/.whl/\n' >> .git/info/exclude
rm -rf gpu-in .whl && mkdir -p gpu-in/a gpu-in/b .whl
gguf=$(python -c "from engine.weights import default_gguf_path; print(default_gguf_path())")
split -b 60M -d -a 1 "$gguf" gpu-in/model.part
mv gpu-in/model.part0 gpu-in/a/ && mv gpu-in/model.part1 gpu-in/b/
cp -r drafters/weights/dspark gpu-in/b/dspark
python - <<'PY'
import json
from drafters.prompts import eval_prompts
with open("gpu-in/b/bench-prompts.jsonl", "w") as f:
    for row in eval_prompts(4):  # bench spec's default held-out set (4 per domain)
        f.write(json.dumps(row) + "\n")
PY
python -m server.cli train prompts --out gpu-in/b/train-prompts.jsonl --per-domain "$TRAIN_PER_DOMAIN"
python -m pip download -q --no-deps --only-binary=:all: -d .whl gguf==0.19.0
du -sh gpu-in/a gpu-in/b .whl
