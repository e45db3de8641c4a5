#!/bin/bash
# load13: engine load phases of llama-1b / llama-8b bf16 (benchmarks/load.py), cold and warm caches, on the
# throughput.py presets. Every step fits in what is left of BUDGET seconds (the call's wall limit) or is skipped;
# about 60 s covers the four lmforge starts, 170 s lmdeploy's load beside them.
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
# byte-compiled sources, as an installed package has them (pip compiles at install; the device's fresh copy of the
# tree and --no-compile wheels have none, and compiling them would add seconds of imports to the first start only)
python3 -m compileall -q -j 8 lmforge benchmarks $(ls -d /tmp/site 2>/dev/null) > "$OUT/compileall.log" 2>&1
A=$(mktemp -d /tmp/load13-cacheA-XXXX)   # XDG_CACHE_HOME: lmforge/triton (kernels) + lmforge/profile
L="python3 benchmarks/load.py"
# how much of each preset's weight files is in the page cache (mincore), before the first start reads them
python3 - $M/llama-8b $M/llama-1b >>"$OUT/load.jsonl" 2>>"$OUT/mincore.log" <<'PY'
import ctypes, glob, json, os, sys
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
page = os.sysconf("SC_PAGE_SIZE")
for folder in sys.argv[1:]:
    total = resident = 0
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY)
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0:
            resident += bytes(vec).count(1) * page
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
        os.close(fd)
        total += size
    print(json.dumps(dict(measure="page_cache", folder=folder, gib=round(total / 2**30, 2), resident_frac=round(resident / max(total, 1), 3))))
PY
# 8b with nothing cached (kernels and memory profile in a fresh XDG_CACHE_HOME), then 8b with both cached; the
# same for 1b; then lmdeploy's load of 1b (bench_peer's load_s) when 110 s are left
step 8b_cold 20 env -u TRITON_CACHE_DIR XDG_CACHE_HOME=$A $L --model llama-8b --model-dir $M/llama-8b --tag cold
step 8b_warm 10 env -u TRITON_CACHE_DIR XDG_CACHE_HOME=$A $L --model llama-8b --model-dir $M/llama-8b --tag warm
B=$(mktemp -d /tmp/load13-cacheB-XXXX)
step 1b_cold 17 env -u TRITON_CACHE_DIR XDG_CACHE_HOME=$B $L --model llama-1b --model-dir $M/llama-1b --tag cold
step 1b_warm 9 env -u TRITON_CACHE_DIR XDG_CACHE_HOME=$B $L --model llama-1b --model-dir $M/llama-1b --tag warm
if [ -f /tmp/peer/bench_peer.py ]; then
  mkdir -p "$OUT/peer"
  step lmdeploy_1b 110 bash -c "cd /tmp/peer && PYTHONPATH=/tmp/peer/site python3 bench_peer.py --model llama-1b --peers lmdeploy --model-dir $M/llama-1b --timeout 100 --log-dir $OUT/peer"
fi
cat "$OUT/load.jsonl"
