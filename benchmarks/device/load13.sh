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
A=$(mktemp -d /tmp/load13-cacheA-XXXX)   # XDG_CACHE_HOME: lmforge/triton (kernels) + lmforge/profile
python3 -c "
import time; t=time.perf_counter(); import torch; t1=time.perf_counter(); torch.zeros(1, device='cuda'); t2=time.perf_counter()
import json; print(json.dumps(dict(measure='cuda_init', import_torch_s=round(t1-t,2), first_alloc_s=round(t2-t1,2), device=torch.cuda.get_device_name())))
" >>"$OUT/load.jsonl" 2>&1
L="python3 benchmarks/load.py"
OLD="env -u TRITON_CACHE_DIR LMFORGE_SAFETENSORS_READER=safe_open"
# cold: nothing cached, the old reader; warm-old: kernels cached, profile not (a fresh XDG), the old reader;
# warm: kernels and profile cached, the threaded reader
step 1b_cold 20 $OLD XDG_CACHE_HOME=$A $L --model llama-1b --model-dir $M/llama-1b --tag cold-old
step 1b_warm_old 14 $OLD XDG_CACHE_HOME=$(mktemp -d) TRITON_CACHE_DIR=$A/lmforge/triton $L --model llama-1b --model-dir $M/llama-1b --tag warm-old
step 1b_warm 12 env -u TRITON_CACHE_DIR XDG_CACHE_HOME=$A $L --model llama-1b --model-dir $M/llama-1b --tag warm
step pytest_gpu 12 env -u TRITON_CACHE_DIR XDG_CACHE_HOME=$A python3 -m pytest -q -x -p no:cacheprovider tests/weights/test_device_reader.py tests/engine/test_gpu_startup.py
if [ -f $M/llama-8b/config.json ]; then
  step 8b_warmish 18 env -u TRITON_CACHE_DIR XDG_CACHE_HOME=$A $L --model llama-8b --model-dir $M/llama-8b --tag warm-kernels-from-1b
else
  echo '{"skipped": "8b (no preset)"}' >>"$OUT/load.jsonl"
fi
cat "$OUT/load.jsonl"
