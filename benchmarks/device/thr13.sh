#!/usr/bin/env bash
# thr13 (issue 13 item 1): where the throughput run spends GPU and host time. Pass 1 times every step with CUDA
# events (GPU span, idle gap before it, host phases): the out tok/s figure. Pass 2 (time permitting) reruns the
# workload: mixed steps alternate the decode-prefix attention split on/off (an A/B on the same run), then profiles
# a few windows of decode steps (kernel tables, GPU busy fraction, gzipped chrome traces). llama-8b, then llama-1b
# pass 1, then the GPU tests of what this branch touched. Budget: BUDGET seconds for the whole script (default 85).
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
S=$(date +%s)
B=${BUDGET:-85}
left() { echo $(( B - ($(date +%s) - S) )); }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > $OUT/gpu.txt 2>&1
for m in llama-8b llama-1b; do
  if [ ! -f /tmp/lmf-models/$m/config.json ]; then
    timeout $(( $(left) - 5 )) python3 -c "import sys; sys.path.insert(0,'benchmarks'); from throughput import write_preset; write_preset('$m','/tmp/lmf-models/$m',0)" >> $OUT/write.log 2>&1
    echo "wrote $m at $(( $(date +%s) - S )) s" >> $OUT/write.log
  fi
  [ $m = llama-8b ] && W=100:102 || W=
  L=$(left); [ $L -lt 20 ] && break
  [ $m = llama-8b ] && PB=$(( L - 40 )) || PB=$(( L - 3 ))
  timeout $(( L - 1 )) python3 benchmarks/thr_profile.py --model-dir /tmp/lmf-models/$m --out $OUT --budget-s $PB \
    --windows "$W" > $OUT/thr_$m.jsonl 2> $OUT/thr_$m.err
  echo "$m rc=$? at $(( $(date +%s) - S )) s"
done
L=$(left); [ $L -gt 12 ] && timeout $(( L - 2 )) python3 -m pytest -q -p no:cacheprovider tests/kernels/test_mixed_attention.py tests/kernels/test_sampling_kernel.py tests/engine/test_sampler.py > $OUT/gpu_tests.log 2>&1; tail -4 $OUT/gpu_tests.log
L=$(left); [ $L -gt 6 ] && timeout $(( L - 1 )) python3 benchmarks/sampler_bench.py > $OUT/sampling.jsonl 2>&1; cat $OUT/sampling.jsonl | tail -2
for m in llama-8b llama-1b; do grep -v '"thr_step"' $OUT/thr_$m.jsonl 2>/dev/null | cut -c1-700; grep -v Warning $OUT/thr_$m.err 2>/dev/null | tail -3; done
