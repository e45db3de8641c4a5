#!/bin/bash
# load13 device round: engine load phases of llama-1b / llama-8b bf16 (benchmarks/load.py), cold and warm Triton
# cache. Every step fits in what is left of BUDGET seconds (the round's wall limit) or is skipped.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-58}
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
cold=$(mktemp -d /tmp/load13-triton-XXXX)
python3 -c "
import time; t=time.perf_counter(); import torch; t1=time.perf_counter(); torch.zeros(1, device='cuda'); t2=time.perf_counter()
import json; print(json.dumps(dict(measure='cuda_init', import_torch_s=round(t1-t,2), first_alloc_s=round(t2-t1,2), device=torch.cuda.get_device_name())))
" >>"$OUT/load.jsonl" 2>&1
# round 1: today's load (safe_open reader) cold and warm, then the threaded reader on the warm cache
step load_1b_cold 20 env TRITON_CACHE_DIR=$cold LMFORGE_SAFETENSORS_READER=safe_open python3 benchmarks/load.py --model llama-1b --model-dir $M/llama-1b --tag cold-safe_open
step load_1b_warm 14 env TRITON_CACHE_DIR=$cold LMFORGE_SAFETENSORS_READER=safe_open python3 benchmarks/load.py --model llama-1b --model-dir $M/llama-1b --tag warm-safe_open
if [ -f $M/llama-8b/config.json ]; then
  step load_8b_warm 20 env TRITON_CACHE_DIR=$cold python3 benchmarks/load.py --model llama-8b --model-dir $M/llama-8b --tag warm-from-1b-threads
else
  echo '{"skipped": "load_8b (no preset)"}' >>"$OUT/load.jsonl"
  step load_1b_warm_threads 12 env TRITON_CACHE_DIR=$cold python3 benchmarks/load.py --model llama-1b --model-dir $M/llama-1b --tag warm-threads
fi
step pytest_reader 8 python3 -m pytest -q -x tests/weights/test_device_reader.py -p no:cacheprovider
cat "$OUT/load.jsonl"
