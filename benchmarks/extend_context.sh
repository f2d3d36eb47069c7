#!/usr/bin/env bash
# Long-context extension (arXiv 2412.19437 §4.3) on a trained model, on CPU: held-out bits per byte at 1x,
# 2x and 4x the model's context, for the model as trained (its config widened, plain RoPE), with YaRN
# switched on but no training, and after one YaRN phase (`fewchips train --init --extend-context`).
#   bash benchmarks/extend_context.sh [BASE=runs/demo] [OUT=runs/extend] [STEPS=30]
set -euo pipefail
BASE=${1:-runs/demo}; OUT=${2:-runs/extend}; STEPS=${3:-30}
DATA=${DATA:-$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")/idlelib}   # long files
N=$(python -c "import json; print(json.load(open('$BASE/config.json'))['max_position_embeddings'])")
mkdir -p "$OUT"
for variant in plain yarn0; do
  rm -rf "$OUT/$variant"; cp -r "$BASE" "$OUT/$variant"; rm -rf "$OUT/$variant/checkpoint"
  python - "$OUT/$variant/config.json" "$N" "$variant" <<'PY'
import json, sys
path, n, variant = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = json.load(open(path))
c["max_position_embeddings"] = 4 * n
if variant == "yarn0":
    c["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": n, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
json.dump(c, open(path, "w"), indent=2)
PY
done
fewchips train --init "$BASE" --extend-context $((4 * N)) --seq-len $((2 * N)) --batch-size 2 --steps "$STEPS" \
  --lr 2e-4 --warmup 3 --threads 2 --out "$OUT/phase" --overwrite 2>&1 | grep -E "extend-context|^done" || true
for variant in plain yarn0 phase; do
  for L in "$N" $((2 * N)) $((4 * N)); do
    bpb=$(fewchips eval --model "$OUT/$variant" --data "$DATA" --seq-len "$L" --max-mb 0.2 --threads 2 --json 2>/dev/null |
          python -c "import json,sys; d=json.load(sys.stdin); print(round(d.get('bits_per_byte', d.get('bpb', float('nan'))), 4))")
    echo "$variant seq_len=$L bits/byte=$bpb"
  done
done
