#!/usr/bin/env bash
# guidellm (the vLLM project's load generator) against `fewchips serve`: the paged engine, then the slot
# engine it replaced (one max_len block per request, no prefix cache, one-shot prefill), same cache bytes.
#   bash benchmarks/guidellm_engine.sh MODEL_DIR [GUIDELLM=guidellm] [PAIRS=1]
# 32 concurrent streams, 96 requests of 100 synthetic prompt tokens and 100 output tokens.
set -euo pipefail
MODEL=$1; GUIDELLM=${2:-guidellm}; PAIRS=${3:-1}; PORT=8123; OUT=${OUT:-/tmp/guidellm_engine}
mkdir -p "$OUT"
# 9 blocks of 2048 tokens of the model's per-token cache bytes: 8 slot requests, or 1,151 blocks of 16
GB=$(python -c "import json,sys; c=json.load(open('$MODEL/config.json')); b=4*c['num_hidden_layers']*(c['kv_lora_rank']+c['qk_rope_head_dim']); print(9*2048*b/2**30 + 1e-6)")
declare -A FLAGS=([paged]="" [slot]="--block-size 2048 --no-prefix-cache --max-prefill-tokens 8192")
for i in $(seq "$PAIRS"); do
  for name in paged slot; do
    fewchips serve --model "$MODEL" --port $PORT --max-batch 128 --cache-gb "$GB" ${FLAGS[$name]} > "$OUT/server_$name.log" 2>&1 &
    pid=$!
    until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do sleep 0.5; done
    "$GUIDELLM" run --backend kind=openai_http,target=http://127.0.0.1:$PORT --profile kind=concurrent,streams=32 \
      --constraint kind=max_requests,count=96 --data kind=synthetic_text,prompt_tokens=100,output_tokens=100 \
      --tokenizer kind=huggingface_auto,model="$MODEL" --output kind=json,path="$OUT/${name}_$i.json" \
      --output kind=console --disable-console-interactive > "$OUT/${name}_$i.log" 2>&1
    curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^fewchips:(num_preemptions_total|prefix_cache_hits_total)' || true
    kill -INT $pid; wait $pid || true
    echo "$name (pair $i): $(grep -m1 'cache' "$OUT/server_$name.log")"
    grep -E '^\| concurrent@32' "$OUT/${name}_$i.log" | sed -n '5p;7p'
  done
done
