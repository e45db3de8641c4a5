#!/usr/bin/env bash
# Round 2 (40 s in all): the grouped quantized-MoE kernel's timings on a Qwen3-30B-A3B-like layer against the old
# per-expert loop (benchmarks/qmoe.py, one JSON line per figure in qmoe.jsonl, each with its error against the loop),
# and, beside it, a subset of its GPU tests in two pytest processes (the full list runs in the lead's final call:
# tests/kernels/test_quant_moe_kernel.py, tests/kernels/test_fused_moe_kernel.py, the MoE tests of
# tests/kernels/test_quant_kernels.py, tests/quant/test_gpu_quant.py -k qwen3_moe).
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
PT="python3 -m pytest -v -p no:cacheprovider"
F=tests/kernels/test_quant_moe_kernel.py
(timeout 34 $PT $F -k "(matches and (t1] or t300]) and (fp8-block or fp8-channel or int4-g128)) or (cuda_graph and (1-fp8-block or 1-int4-g128 or 200-fp8-block)) or only_routed" > $OUT/tests_a.log 2>&1; echo "rc=$?" >> $OUT/tests_a.log) &
(timeout 34 $PT tests/quant/test_gpu_quant.py tests/kernels/test_fused_moe_kernel.py -k "qwen3_moe or align" > $OUT/tests_b.log 2>&1; echo "rc=$?" >> $OUT/tests_b.log) &
timeout 38 python3 benchmarks/qmoe.py --schemes fp8-block,int4-g128 --tokens 1,16,64,2048 --sweep --deadline 34 \
  > $OUT/qmoe.jsonl 2> $OUT/qmoe.err
wait
for f in $OUT/tests_*.log; do echo "== $f"; grep -E "PASSED|FAILED|ERROR|passed|failed|rc=" $f | tail -30; done
tail -5 $OUT/qmoe.err; cut -c1-700 $OUT/qmoe.jsonl
