#!/usr/bin/env bash
# thr13 (issue 13 item 1): where llama-8b's throughput run spends GPU and host time. Pass 1 times every step with
# CUDA events (GPU span, idle gap before it, host phases); pass 2 profiles a few windows of steps (kernel tables,
# GPU busy fraction, gzipped chrome traces). Budget: ~115 s for the whole script.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
S=$(date +%s)
M=/tmp/lmf-models/llama-8b
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > $OUT/gpu.txt 2>&1
if [ ! -f $M/config.json ]; then
  timeout 50 python3 -c "import sys; sys.path.insert(0,'benchmarks'); from throughput import write_preset; write_preset('llama-8b','$M',0)" > $OUT/write.log 2>&1
  echo "wrote preset in $(( $(date +%s) - S )) s" >> $OUT/write.log
fi
LEFT=$(( 114 - ($(date +%s) - S) ))
timeout $LEFT python3 benchmarks/thr_profile.py --model-dir $M --out $OUT --budget-s $(( LEFT - 4 )) \
  --windows 3:5,100:104,600:604,950:954 > $OUT/thr_8b.jsonl 2> $OUT/thr_8b.err
echo "rc=$? total $(( $(date +%s) - S )) s"
grep -v '"thr_step"' $OUT/thr_8b.jsonl | cut -c1-600
tail -5 $OUT/thr_8b.err
