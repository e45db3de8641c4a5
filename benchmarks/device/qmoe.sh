#!/usr/bin/env bash
# Round 2 (40 s): the grouped quantized-MoE kernel's GPU tests (three parallel pytest processes, a subset: the
# rest of tests/kernels/test_quant_moe_kernel.py runs in the lead's final call) and its timings against the old
# per-expert loop on a Qwen3-30B-A3B-like layer (benchmarks/qmoe.py, one JSON line per figure in qmoe.jsonl).
# The benchmark compiles and checks beside the tests, then waits for them before it times.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
PT="python3 -m pytest -v -p no:cacheprovider"
F=tests/kernels/test_quant_moe_kernel.py
: > $OUT/test_pids
(timeout 28 $PT $F -k "matches and (t1] or t300]) and (fp8-block or fp8-channel or int4-g128)" > $OUT/tests_a.log 2>&1; echo "rc=$?" >> $OUT/tests_a.log) &
echo $! >> $OUT/test_pids
(timeout 28 $PT $F -k "cuda_graph and (fp8-block or int4-g128) or only_routed or qwen3" > $OUT/tests_b.log 2>&1; echo "rc=$?" >> $OUT/tests_b.log) &
echo $! >> $OUT/test_pids
(timeout 28 $PT tests/kernels/test_fused_moe_kernel.py tests/kernels/test_quant_kernels.py -k "align or (matches_reference and bfloat16) or fused_moe_quantized" > $OUT/tests_c.log 2>&1; echo "rc=$?" >> $OUT/tests_c.log) &
echo $! >> $OUT/test_pids
(timeout 30 $PT tests/quant/test_gpu_quant.py -k qwen3_moe > $OUT/tests_d.log 2>&1; echo "rc=$?" >> $OUT/tests_d.log) &
echo $! >> $OUT/test_pids
timeout 37 python3 benchmarks/qmoe.py --schemes fp8-block,int4-g128 --tokens 1,16,64,2048 --sweep --deadline 33 \
  --wait-pids $OUT/test_pids > $OUT/qmoe.jsonl 2> $OUT/qmoe.err
wait
for f in $OUT/tests_*.log; do echo "== $f"; tail -4 $f; done
tail -5 $OUT/qmoe.err; cat $OUT/qmoe.jsonl | cut -c1-600
