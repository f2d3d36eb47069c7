#!/usr/bin/env bash
# The post-training loop from the CLI, from the `make demo` model, on the bundled offline data:
#   SFT on the bundled chats -> fewchips sample (rejection sampling, arithmetic) -> SFT on what was kept
#   -> GRPO on arithmetic (held-out prompts disjoint from training). Prints each stage's numbers.
#   bash benchmarks/post_training_cli.sh [BASE=runs/demo] [OUT=runs/post-cli]
set -euo pipefail
BASE=${1:-runs/demo}; OUT=${2:-runs/post-cli}; T="--threads 2"
mkdir -p "$OUT"
fewchips sft --model "$BASE" --steps 100 --batch-size 8 --seq-len 256 --out "$OUT/sft" --overwrite $T 2>&1 | tail -2
fewchips sample --model "$OUT/sft" --reward arithmetic --count 200 --n 4 --keep best --max-new-tokens 8 \
  --temperature 1.0 --out "$OUT/kept.jsonl" $T 2>&1 | tail -2
fewchips sft --model "$OUT/sft" --data "$OUT/kept.jsonl" --steps 30 --batch-size 8 --seq-len 256 --lr 5e-4 \
  --out "$OUT/sft2" --overwrite $T 2>&1 | tail -2
fewchips grpo --model "$OUT/sft2" --task arithmetic --steps 40 --batch-size 8 --group-size 8 --max-new-tokens 8 \
  --val-prompts 50 --seed 0 --out "$OUT/grpo" --overwrite $T 2>&1 | grep -E "held-out|done|warning" | tail -4
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/grpo/metrics.jsonl")]
train = [r for r in rows if "reward_mean" in r]
val = [r for r in rows if "val_reward" in r or "heldout_reward" in r]
print("grpo reward_mean by step:", [round(r["reward_mean"], 3) for r in train])
print("grpo held-out:", [(r["step"], round(r.get("val_reward", r.get("heldout_reward", 0)), 3)) for r in val])
PY
