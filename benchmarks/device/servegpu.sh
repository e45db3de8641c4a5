#!/usr/bin/env bash
# One device call: lmforge over HTTP (`lmforge serve`, streaming OpenAI clients) against its own Engine.step() figure
# and against lmdeploy's api_server (PyTorch backend), same preset, same workload (the peer kit's 256 requests), same
# card; then --dp 2 (two half-memory replicas on the one GPU) against --dp 1.
#   OUT=dir [MODEL=llama-1b] [BUDGET=150] [STAGES=engine,together,dp,rates] bash benchmarks/device/servegpu.sh
# Each step runs under `timeout` inside the budget; servers are killed at the end; logs and JSON lines under $OUT.
# STAGES=engine,together,dp,rates (default, llama-1b): the Engine.step figure, then three servers loaded at once
# (lmforge CACHE=0.2, lmdeploy 0.25 of the free memory). For llama-8b (more weights and KV per server) they run one
# at a time with 0.8 each, the default for any other MODEL: STAGES=serve,engine,lmdeploy,rates, API_SERVERS=2.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/lmf-triton
MODEL=${MODEL:-llama-1b}
BUDGET=${BUDGET:-150}
if [ "$MODEL" = llama-1b ]; then DEFAULT_STAGES=engine,together,dp,rates; else DEFAULT_STAGES=serve,engine,lmdeploy,rates; fi
STAGES=${STAGES:-$DEFAULT_STAGES}
RATES=${RATES:-16}        # finite request rates (req/s), RATE_N requests each
RATE_N=${RATE_N:-96}
API_SERVERS=${API_SERVERS:-2}  # the sequential stages' lmforge servers
OUT=${OUT:-/tmp/servegpu-out}; mkdir -p "$OUT"
PEER=${PEER:-/tmp/peer}; [ -d "$PEER/site" ] || PEER=$PWD/.peer
M=/tmp/lmf-models/$MODEL
T0=$(date +%s)
LMF=(python3 -c 'import sys; from lmforge.cli.main import main; sys.exit(main(sys.argv[1:]))')
BENCH=(python3 benchmarks/serve_bench.py --timeout 300 --client-procs "${CLIENT_PROCS:-4}" $BENCH_ARGS)  # BENCH_ARGS: e.g. smaller lengths for a CPU dry run
PIDS=()

has() { [[ ",$STAGES," == *",$1,"* ]]; }
left() { echo $((BUDGET - ($(date +%s) - T0) - 4)); }
lim() { local l; l=$(left); ((l < $1)) && echo "$l" || echo "$1"; }  # min(wanted, what is left)
note() { echo "{\"bench\": \"servegpu\", \"t_s\": $(($(date +%s) - T0)), $1}" | tee -a "$OUT/summary.jsonl"; }

wait_http() {  # URL SECONDS PID: until URL answers 200, the process dies, or time runs out
  local url=$1 until=$(($(date +%s) + $2)) pid=$3
  while (($(date +%s) < until)); do
    python3 - "$url" <<'EOF' 2>/dev/null && return 0
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
EOF
    kill -0 "$pid" 2>/dev/null || return 2
    sleep 0.5
  done
  return 1
}

stop_server() {  # PID: SIGTERM to its process group, then SIGKILL
  local pid=$1
  kill -TERM -- -"$pid" 2>/dev/null
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- -"$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}
cleanup() { for p in "${PIDS[@]}"; do stop_server "$p"; done; }
trap cleanup EXIT

# uvloop + httptools for the API servers, when their wheels travel with the tree (untracked: benchmarks/device/wheels)
SG_SITE=/tmp/sg-site
ls benchmarks/device/wheels/*.whl > /dev/null 2>&1 && [ "${FAST_LOOP:-1}" = 1 ] &&
  python3 -m pip install -q --no-index --no-deps --no-compile --target $SG_SITE benchmarks/device/wheels/*.whl > "$OUT/wheels.log" 2>&1
[ "${FAST_LOOP:-1}" = 1 ] || SG_SITE=/nonexistent
# what lmdeploy's api_server imports beyond the peer kit (openai types, PIL), only where the image lacks it
LMD_SITE=/tmp/sg-lmd-site
for pair in openai:openai jiter:jiter distro:distro sniffio:sniffio PIL:pillow; do
  mod=${pair%%:*}; whl=${pair##*:}
  PYTHONPATH=$PEER/site:/tmp/site python3 -c "import $mod" 2>/dev/null && continue
  ls benchmarks/device/wheels/lmdeploy/"$whl"-*.whl > /dev/null 2>&1 &&
    python3 -m pip install -q --no-index --no-deps --no-compile --target $LMD_SITE benchmarks/device/wheels/lmdeploy/"$whl"-*.whl \
      >> "$OUT/wheels.log" 2>&1 && echo "lmdeploy gets $whl" >> "$OUT/wheels.log"
done
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import msgspec, zmq, aiohttp; print('msgspec', msgspec.__version__, 'zmq', zmq.__version__, 'aiohttp', aiohttp.__version__)" \
  > "$OUT/deps.txt" 2>&1
PYTHONPATH=$PWD:/tmp/site:$SG_SITE:$PEER/site python3 -c "import uvloop, httptools; print('uvloop', uvloop.__version__, 'httptools', httptools.__version__)" \
  >> "$OUT/deps.txt" 2>&1
if [ ! -f "$M/config.json" ]; then
  timeout "$(lim 60)" python3 -c "import sys; sys.path.insert(0,'benchmarks'); from throughput import write_preset; write_preset('$MODEL','$M',0)" \
    > "$OUT/preset.log" 2>&1
fi
cp "$PEER"/tok/* "$M"/
note "\"step\": \"preset\", \"model\": \"$MODEL\", \"gpu\": \"$(head -2 "$OUT/gpu.txt" | tail -1)\""

# stage "together": the Engine.step figure first (alone on the GPU), then lmforge (--api-server-count 2; with stage
# api1 also 1), lmdeploy and (stage dp) lmforge --dp 2 load at once, each given a share of the free GPU memory that
# leaves it more KV than the llama-1b workload needs (~9.4 GiB), and are measured one after another while the others
# idle
CACHE=${CACHE:-0.2}  # lmforge's share of the free memory; lmdeploy's below: it may profile last, after the others
LMDEPLOY_CACHE=${LMDEPLOY_CACHE:-0.25}
start_lmf() {  # NAME PORT DP API_SERVERS: sets LAST_PID
  PYTHONPATH=$PWD:/tmp/site:$SG_SITE:$PEER/site setsid "${LMF[@]}" serve "$M" --port "$2" --dp "$3" \
    --api-server-count "$4" --cache-max-entry-count "$CACHE" --log-level WARNING > "$OUT/$1.server.log" 2>&1 &
  LAST_PID=$!; PIDS+=("$LAST_PID")
}
start_lmdeploy() {  # PORT
  PYTHONPATH=$PEER/site:/tmp/site:$SG_SITE:$LMD_SITE setsid python3 -m lmdeploy serve api_server "$M" --backend pytorch \
    --server-name 127.0.0.1 --server-port "$1" --log-level WARNING --cache-max-entry-count "$LMDEPLOY_CACHE" \
    > "$OUT/lmdeploy.server.log" 2>&1 &
  LAST_PID=$!; PIDS+=("$LAST_PID")
}
bench() {  # NAME PORT API [rates]
  local tag=inf extra=() t=60
  if [ "$4" = rates ]; then tag=rates t=150; extra=(--num-requests "$RATE_N" --request-rates "$RATES" --plot "$OUT/$1.rates.png"); fi
  timeout "$(lim "$t")" "${BENCH[@]}" --url "http://127.0.0.1:$2" --api "$3" --label "$1 $MODEL" "${extra[@]}" \
    > "$OUT/$1.$tag.jsonl" 2> "$OUT/$1.$tag.err"
  note "\"step\": \"$1 $tag\", \"rc\": $?"
}
up() {  # NAME PORT PID: 0 when it answers /health
  wait_http "http://127.0.0.1:$2/health" "$(lim 110)" "$3"; local rc=$?
  note "\"step\": \"$1 up\", \"rc\": $rc, \"start_s\": $(($(date +%s) - s))"
  return $rc
}
if has together; then
  if has engine; then
    timeout "$(lim 50)" python3 benchmarks/throughput.py --model "$MODEL" --model-dir "$M" --skip bs1 \
      > "$OUT/engine_step.jsonl" 2> "$OUT/engine_step.err"
    note "\"step\": \"engine\", \"rc\": $?"
  fi
  s=$(date +%s)
  start_lmf lmforge-api2 23336 1 2; PA2=$LAST_PID
  start_lmdeploy 23334; PL=$LAST_PID
  PD=; if has dp; then start_lmf lmforge-dp2 23335 2 2; PD=$LAST_PID; fi
  PA1=; has api1 && { start_lmf lmforge 23333 1 1; PA1=$LAST_PID; }
  up lmforge-api2 23336 "$PA2"; UA2=$?
  up lmdeploy 23334 "$PL"; UL=$?
  UD=1; if [ -n "$PD" ]; then up lmforge-dp2 23335 "$PD"; UD=$?; fi
  UA1=1; if [ -n "$PA1" ]; then up lmforge 23333 "$PA1"; UA1=$?; fi
  ((UA2 == 0)) && bench lmforge-api2 23336 completions
  ((UL == 0)) && (($(left) > 15)) && bench lmdeploy 23334 generate
  ((UD == 0)) && (($(left) > 15)) && bench lmforge-dp2 23335 completions
  has rates && ((UA2 == 0)) && (($(left) > 25)) && bench lmforge-api2 23336 completions rates
  has rates && ((UL == 0)) && (($(left) > 25)) && bench lmdeploy 23334 generate rates
  ((UA1 == 0)) && (($(left) > 15)) && bench lmforge 23333 completions
  cleanup; PIDS=()
fi

# 2. lmforge serve (one engine core; --dp N in stage dp)
lmf_serve() {  # NAME DP EXTRA...: start, bench all-at-once (+ rates when asked), stop
  local name=$1 dp=$2; shift 2
  PYTHONPATH=$PWD:/tmp/site:$SG_SITE:$PEER/site setsid "${LMF[@]}" serve "$M" --port 23333 --dp "$dp" \
    --api-server-count "$API_SERVERS" --log-level WARNING "$@" > "$OUT/$name.server.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  local s=$(date +%s)
  wait_http http://127.0.0.1:23333/health "$(lim 90)" "$pid"; local up=$?
  note "\"step\": \"$name start\", \"rc\": $up, \"start_s\": $(($(date +%s) - s))"
  if ((up == 0)); then
    timeout "$(lim 60)" "${BENCH[@]}" --url http://127.0.0.1:23333 --api completions --label "$name $MODEL" \
      > "$OUT/$name.inf.jsonl" 2> "$OUT/$name.inf.err"
    note "\"step\": \"$name all-at-once\", \"rc\": $?"
    if [ "$name" = lmforge ] && has rates && (($(left) > 40)); then
      timeout "$(lim 70)" "${BENCH[@]}" --url http://127.0.0.1:23333 --api completions --label "$name $MODEL" \
        --num-requests "$RATE_N" --request-rates "$RATES" --plot "$OUT/$name.rates.png" \
        > "$OUT/$name.rates.jsonl" 2> "$OUT/$name.rates.err"
      note "\"step\": \"$name rates\", \"rc\": $?"
    fi
  fi
  stop_server "$pid"
}
if has serve; then lmf_serve lmforge 1; fi

# 2b. the Engine.step() figure (after the server: the HTTP figure is the one to have if time runs out)
if has engine && ! has together; then
  timeout "$(lim 70)" python3 benchmarks/throughput.py --model "$MODEL" --model-dir "$M" --skip bs1 \
    > "$OUT/engine_step.jsonl" 2> "$OUT/engine_step.err"
  note "\"step\": \"engine\", \"rc\": $?"
fi


# 3. lmdeploy api_server, PyTorch backend (given the same uvloop/httptools): its /generate takes token ids (its
# /v1/completions reads a list of ints as several prompts), same SSE streaming
if has lmdeploy && (($(left) > 50)); then
  PYTHONPATH=$PEER/site:/tmp/site:$SG_SITE:$LMD_SITE setsid python3 -m lmdeploy serve api_server "$M" --backend pytorch \
    --server-name 127.0.0.1 --server-port 23334 --log-level WARNING --cache-max-entry-count 0.8 \
    > "$OUT/lmdeploy.server.log" 2>&1 &
  LPID=$!; PIDS+=("$LPID")
  s=$(date +%s)
  wait_http http://127.0.0.1:23334/health "$(lim 120)" "$LPID"; up=$?
  note "\"step\": \"lmdeploy start\", \"rc\": $up, \"start_s\": $(($(date +%s) - s))"
  if ((up == 0)); then
    timeout "$(lim 60)" "${BENCH[@]}" --url http://127.0.0.1:23334 --api generate --label "lmdeploy $MODEL" \
      > "$OUT/lmdeploy.inf.jsonl" 2> "$OUT/lmdeploy.inf.err"
    note "\"step\": \"lmdeploy all-at-once\", \"rc\": $?"
    if has rates && (($(left) > 40)); then
      timeout "$(lim 70)" "${BENCH[@]}" --url http://127.0.0.1:23334 --api generate --label "lmdeploy $MODEL" \
        --num-requests "$RATE_N" --request-rates "$RATES" --plot "$OUT/lmdeploy.rates.png" \
        > "$OUT/lmdeploy.rates.jsonl" 2> "$OUT/lmdeploy.rates.err"
      note "\"step\": \"lmdeploy rates\", \"rc\": $?"
    fi
  fi
  stop_server "$LPID"
fi

# 4. --dp 2 on the one GPU (each replica half of the KV memory) against the --dp 1 run above
if has dp && ! has together && (($(left) > 50)); then lmf_serve lmforge-dp2 2; fi

cleanup
trap - EXIT
echo "=== figures"
grep -h '"measure": "throughput"' "$OUT/engine_step.jsonl" 2>/dev/null | python3 -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l); print(json.dumps({'engine_step_out_tok_s': r['out_tok_s'], 'ttft_s': r['ttft_s'], 'device': r['device']}))"
cat "$OUT"/*.inf.jsonl "$OUT"/*.rates.jsonl 2>/dev/null | python3 -c "
import json, sys
keys = ('label', 'request_rate', 'completed', 'failed', 'wrong_length_requests', 'out_tok_s', 'out_tokens', 'out_chunks', 'ttft_mean_s', 'ttft_p99_s', 'itl_p50_s', 'itl_p99_s', 'e2e_p99_s')
for l in sys.stdin:
    if l.startswith('{'):
        r = json.loads(l); print(json.dumps({k: r.get(k) for k in keys}))"
python3 - "$OUT" <<'PYEOF'
import glob, json, os, sys
out = sys.argv[1]
rows = {}
for f in glob.glob(os.path.join(out, "*.jsonl")):
    name = os.path.basename(f)[: -len(".jsonl")]
    for line in open(f):
        if line.startswith("{"):
            rows[name] = json.loads(line)
eng = rows.get("engine_step", {}).get("out_tok_s")
def tok(n):
    return rows.get(n, {}).get("out_tok_s")
ratios = {}
for n in ("lmforge.inf", "lmforge-api2.inf", "lmforge-dp2.inf"):
    if eng and tok(n):
        ratios[f"{n} / engine_step"] = round(tok(n) / eng, 3)
    if tok("lmdeploy.inf") and tok(n):
        ratios[f"{n} / lmdeploy.inf"] = round(tok(n) / tok("lmdeploy.inf"), 3)
if tok("lmforge-dp2.inf") and tok("lmforge-api2.inf"):
    ratios["dp2 / dp1 (both 2 API servers)"] = round(tok("lmforge-dp2.inf") / tok("lmforge-api2.inf"), 3)
b = rows.get("lmdeploy.rates", {})
for n in ("lmforge-api2.rates", "lmforge.rates"):
    a = rows.get(n, {})
    if a.get("itl_p99_s") and b.get("itl_p99_s"):
        ratios[f"itl_p99 {n} / lmdeploy at rate"] = [a["request_rate"], round(a["itl_p99_s"] / b["itl_p99_s"], 3)]
print(json.dumps({"bench": "servegpu_ratios", "engine_step_out_tok_s": eng, **ratios}))
PYEOF
for f in "$OUT"/*.err "$OUT"/*.server.log; do [ -s "$f" ] && { echo "--- $f"; tail -4 "$f"; }; done
echo "total $(($(date +%s) - T0)) s"
