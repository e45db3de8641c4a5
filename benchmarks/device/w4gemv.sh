#!/usr/bin/env bash
# w4gemv device call (~6 min; BUDGET s caps it): GPU tests of the int4 kernels, the llama-8b batch-1 decode of int4
# (RTN g128 with zero points, written by lmforge quantize on the GPU) beside bf16, one run each, then the int4
# kernel table (JSON lines with GB/s and the bf16 time of the same shape). Round 2 of the w4gemv session gave it 90 s,
# not enough: the RTN quantization of the 8b preset alone took more than 40 s there.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/lmf-triton-w4
B=${BUDGET:-380}; S=$(date +%s)
left() { echo $((B - ($(date +%s) - S) - ${1:-0})); }
stamp() { echo "$1 at $(( $(date +%s) - S )) s" >> $OUT/timing.log; }
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv > $OUT/gpu.txt 2>&1
M=/tmp/lmf-models/llama-8b; Q=/tmp/lmf-models/llama-8b-rtn-w4
LMF="python3 -c 'import sys; from lmforge.cli.main import main; sys.exit(main(sys.argv[1:]))'"
if [ ! -f $M/config.json ]; then python3 -c "import sys; sys.path.insert(0,'benchmarks'); from throughput import write_preset; write_preset('llama-8b','$M',0)"; fi
# 1. quantize (GPU) beside the GPU tests of the int4 kernels (no timing in either)
if [ ! -f $Q/config.json ]; then
  (eval timeout 150 $LMF quantize $M $Q --method rtn --group-size 128 --no-sym --device cuda > $OUT/quantize.log 2>&1; echo "rc=$?" >> $OUT/quantize.log) &
  QP=$!
fi
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_quant_kernels.py -k "wna16 or w4" > $OUT/tests.log 2>&1
[ -n "$QP" ] && wait $QP
stamp "quantize+tests"
cp -n $M/*token* $Q/ 2>/dev/null; ls $Q >> $OUT/quantize.log 2>&1
# 2. batch-1 decode, int4 then bf16 (graphs up to batch 16 only: batch 1 is the measure); the load-time kernel
#    choice per shape goes to the log (lmforge.backends.cuda.quant at INFO)
E2E="import logging, runpy, sys; sys.path.insert(0, 'benchmarks'); logging.basicConfig(level=logging.WARNING); logging.getLogger('lmforge.backends.cuda.quant').setLevel(logging.INFO); sys.argv = ['benchmarks/throughput.py'] + sys.argv[1:]; runpy.run_path('benchmarks/throughput.py', run_name='__main__')"
if [ -f $Q/config.json ]; then
  # the default (chunked kernel), then the load-time choice among the w4 kernels and the chunked one
  timeout $(left 140) python3 -c "$E2E" --model-path $Q --skip throughput --no-warmup --max-batch-size 16 > $OUT/e2e_int4.jsonl 2> $OUT/e2e_int4.err
  LMFORGE_W4_KERNEL=auto timeout $(left 100) python3 -c "$E2E" --model-path $Q --skip throughput --no-warmup --max-batch-size 16 > $OUT/e2e_int4_auto.jsonl 2> $OUT/e2e_int4_auto.err
fi
stamp "int4"
timeout $(left 40) python3 benchmarks/throughput.py --model llama-8b --model-dir $M --skip throughput --no-warmup --max-batch-size 16 > $OUT/e2e_bf16.jsonl 2> $OUT/e2e_bf16.err
stamp "bf16"
# 3. kernel table: the op under LMFORGE_W4_KERNEL=auto (its choice in m1_kernel) at M=1..32 and 2048, then the
#    candidates (chunked = the default path)
LMFORGE_W4_KERNEL=auto timeout $(left 1) python3 benchmarks/w4gemv_bench.py --m 1,2,4,8,16,32 --cands wna16 --then cands --no-warm-up > $OUT/bench.jsonl 2> $OUT/bench.err
stamp "bench"
tail -n 3 $OUT/tests.log; tail -n 2 $OUT/quantize.log; cut -c1-400 $OUT/e2e_*.jsonl; grep -h "wna16 " $OUT/e2e_int4_auto.err; cut -c1-300 $OUT/bench.jsonl
