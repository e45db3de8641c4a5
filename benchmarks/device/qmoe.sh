#!/usr/bin/env bash
# Round 2 (BUDGET s in all, 37 by default): the grouped quantized-MoE kernel's timings on a Qwen3-30B-A3B-like layer
# against the old per-expert loop (benchmarks/qmoe.py: one JSON line per figure in qmoe.jsonl, each with its error
# against the loop). First 8 compile-only shards fill Triton's cache side by side, then one process times. A subset
# of the GPU tests runs beside it all at low CPU priority (the full list is for the lead's final call:
# tests/kernels/test_quant_moe_kernel.py, tests/kernels/test_fused_moe_kernel.py, the MoE tests of
# tests/kernels/test_quant_kernels.py, tests/quant/test_gpu_quant.py -k qwen3_moe).
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
B=${BUDGET:-37}; C=$(( B * 2 / 5 )); S=$(date +%s)
PT="nice -n 19 timeout $(( B - 2 )) python3 -m pytest -v -p no:cacheprovider"
F=tests/kernels/test_quant_moe_kernel.py
($PT $F -k "(matches and (t1] or t300]) and (fp8-block or fp8-channel or int4-g128)) or (cuda_graph and (1-fp8-block or 1-int4-g128 or 200-fp8-block)) or only_routed" > $OUT/tests_a.log 2>&1; echo "rc=$?" >> $OUT/tests_a.log) &
($PT tests/quant/test_gpu_quant.py tests/kernels/test_fused_moe_kernel.py -k "qwen3_moe or align" > $OUT/tests_b.log 2>&1; echo "rc=$?" >> $OUT/tests_b.log) &
Q="python3 benchmarks/qmoe.py --schemes fp8-block,int4-g128 --tokens 1,16,64,2048 --sweep"
P=""
for i in 0 1 2 3 4 5 6 7; do timeout $C $Q --compile-only --shard $i/8 > $OUT/compile_$i.log 2>&1 & P="$P $!"; done
wait $P
echo "compile phase $(( $(date +%s) - S )) s" > $OUT/times.txt
R=$(( B - $(date +%s) + S - 1 ))
timeout $R $Q --deadline $(( R - 4 )) > $OUT/qmoe.jsonl 2> $OUT/qmoe.err
echo "bench done $(( $(date +%s) - S )) s" >> $OUT/times.txt
wait
for f in $OUT/tests_*.log; do echo "== $f"; grep -E "PASSED|FAILED|ERROR|passed|failed|rc=" $f | tail -30; done
grep -h '"error"' $OUT/compile_*.log | cut -c1-600; tail -5 $OUT/qmoe.err; cut -c1-700 $OUT/qmoe.jsonl; cat $OUT/times.txt
