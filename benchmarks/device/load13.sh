#!/bin/bash
# load13 device round: engine load phases of llama-1b / llama-8b bf16 (benchmarks/load.py), cold and warm Triton
# cache. Every step fits in what is left of BUDGET seconds (the round's wall limit) or is skipped.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-38}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
step() {  # step NAME NEED_S CMD...: run CMD with a timeout of what is left, when at least NEED_S are left
  local name=$1 need=$2; shift 2
  local l; l=$(left)
  if [ "$l" -lt "$need" ]; then echo "{\"skipped\": \"$name\", \"left_s\": $l}" | tee -a "$OUT/load.jsonl"; return; fi
  echo "== $name ($l s left)" >&2
  timeout $((l - 1)) "$@" >>"$OUT/load.jsonl" 2>>"$OUT/$name.log"
  echo "rc=$? $name" >&2
}
M=/tmp/lmf-models
mkdir -p $M
A=$(mktemp -d /tmp/load13-cacheA-XXXX)   # XDG_CACHE_HOME: lmforge/triton (kernels) + lmforge/profile
L="python3 benchmarks/load.py"
# round 1 (40 s): 1b with nothing cached, then 8b with the kernels 1b compiled (8b's own shapes may add some:
# entries_after says), then 1b with everything cached
step 1b_cold 14 env -u TRITON_CACHE_DIR XDG_CACHE_HOME=$A $L --model llama-1b --model-dir $M/llama-1b --tag cold
step 8b_warmish 12 env -u TRITON_CACHE_DIR XDG_CACHE_HOME=$A $L --model llama-8b --model-dir $M/llama-8b --tag kernels-from-1b
step 1b_warm 6 env -u TRITON_CACHE_DIR XDG_CACHE_HOME=$A $L --model llama-1b --model-dir $M/llama-1b --tag warm
cat "$OUT/load.jsonl"
