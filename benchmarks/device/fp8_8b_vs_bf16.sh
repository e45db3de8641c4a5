#!/usr/bin/env bash
# One device call: llama-8b FP8 W8A8 (lmforge quantize fp8, compressed-tensors dynamic per-token) throughput vs bf16, same call
cd "$(dirname "$0")/../.."  # repo root; carry .peer (tokenizer files) and .whl (compressed-tensors and the other wheels)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
mkdir -p /tmp/peer && cp -r .peer/tok /tmp/peer/
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/lmf-triton
[ -f /tmp/lmf-models/llama-8b/config.json ] || python3 -c "import sys; sys.path.insert(0,'benchmarks'); from throughput import write_preset; write_preset('llama-8b','/tmp/lmf-models/llama-8b',0)"
cp /tmp/peer/tok/* /tmp/lmf-models/llama-8b/
M=/tmp/lmf-models/llama-8b; Q=/tmp/lmf-models/llama-8b-fp8
LMF="python3 -c 'import sys; from lmforge.cli.main import main; sys.exit(main(sys.argv[1:]))'"
S=$(date +%s)
[ -f $Q/config.json ] || eval timeout 120 $LMF quantize $M $Q --method fp8 --device cuda > $OUT/quantize_fp8.log 2>&1
echo "quantize rc=$? $(( $(date +%s) - S )) s" | tee -a $OUT/quantize_fp8.log; cp /tmp/peer/tok/* $Q/ 2>/dev/null
timeout 100 python3 benchmarks/throughput.py --model-path $Q --skip bs1 > $OUT/fp8.jsonl 2> $OUT/fp8.err
timeout 90 python3 benchmarks/throughput.py --model llama-8b --model-dir $M --skip bs1 > $OUT/bf16.jsonl 2> $OUT/bf16.err
grep -h '"measure"' $OUT/*.jsonl | cut -c1-600
