#!/usr/bin/env bash
# One device call: llama-8b AWQ int4 (lmforge quantize) batch-1 + throughput, lmforge vs lmdeploy on the same checkpoint,
# lmforge bf16 batch-1 beside it; plus the compressed-tensors GPU parity cases
cd "$(dirname "$0")/../.."  # repo root; carry .peer (peer kit) and .whl (gguf, compressed-tensors, loguru wheels)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/lmf-triton
M=/tmp/lmf-models/llama-8b; Q=/tmp/lmf-models/llama-8b-awq
LMF="python3 -c 'import sys; from lmforge.cli.main import main; sys.exit(main(sys.argv[1:]))'"
(PYTHONPATH=$PWD:/tmp/site:$PWD/.peer/site timeout 200 python3 -m pytest -q -p no:cacheprovider tests/quant/test_gpu_quant.py 2>&1 | tail -30 > $OUT/ct_tests.log) &
T=$!
if [ ! -f $M/config.json ]; then python3 -c "import sys; sys.path.insert(0,'benchmarks'); from throughput import write_preset; write_preset('llama-8b','$M',0)"; fi
cp .peer/tok/* $M/
S=$(date +%s)
eval timeout 170 $LMF quantize $M $Q --method awq --group-size 128 --calib-random-ids --calib-samples 8 --calib-seq-len 256 --no-awq-clip --device cuda > $OUT/quantize.log 2>&1
echo "quantize rc=$? $(( $(date +%s) - S )) s" | tee -a $OUT/quantize.log
cp .peer/tok/* $Q/ 2>/dev/null; cat $Q/config.json | head -40 >> $OUT/quantize.log
timeout 140 python3 benchmarks/throughput.py --model-path $Q > $OUT/lmf_awq.jsonl 2> $OUT/lmf_awq.err
cd .peer && PYTHONPATH=$PWD/site timeout 160 python3 bench_peer.py --model llama-8b --model-dir $Q --peers lmdeploy --timeout 150 --log-dir $OUT > $OUT/lmdeploy_awq.jsonl 2> $OUT/lmdeploy_awq.err; cd ..
timeout 75 python3 benchmarks/throughput.py --model llama-8b --model-dir $M --skip throughput > $OUT/lmf_bf16.jsonl 2> $OUT/lmf_bf16.err
wait $T
tail -3 $OUT/ct_tests.log; grep -h -E '"measure"' $OUT/*.jsonl | cut -c1-400
