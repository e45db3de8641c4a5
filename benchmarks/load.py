"""Engine load time, phase by phase: one Engine start on a throughput.py preset (the same engine settings), then
exit. Prints one JSON line: load_s, the engine's load_breakdown, the script's own import times, the Triton
cache's entries before and after (new entries: kernels compiled by this start, 0 when the cache was warm) and
the capture seconds per CUDA-graph bucket.

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/load.py --model llama-1b --model-dir DIR   # cold cache
Run each start in a fresh process: a second Engine in one process finds the kernels already loaded.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402, F401  (timed: import_torch_s)

_T_TORCH = time.perf_counter()

from common import device_name, emit, git_sha, log  # noqa: E402
from throughput import PRESETS, write_preset  # noqa: E402

from lmforge import PytorchEngineConfig  # noqa: E402
from lmforge.engine.engine import Engine  # noqa: E402

_T_LMFORGE = time.perf_counter()


def _entries(path: str | None) -> int:
    try:
        return len(os.listdir(path)) if path else 0
    except OSError:
        return 0


def _short(text: str) -> str:
    import hashlib

    return hashlib.sha256(str(text).encode()).hexdigest()[:12]


def _record_compiles(t0: list[float]) -> list[dict]:
    """Wrap Triton's compile (called once per kernel specialization a process first launches, whether its binary
    then comes from the disk cache or is built): name, seconds since the engine start, seconds spent, the
    specialization (constexprs and argument attributes, shortened). A disk-cache hit takes milliseconds."""
    import triton.compiler

    calls: list[dict] = []
    real = triton.compiler.compile

    def timed(src, *args, **kwargs):
        start = time.perf_counter()
        try:
            return real(src, *args, **kwargs)
        finally:
            fn = getattr(src, "fn", None)
            calls.append(
                dict(
                    name=getattr(fn, "__name__", str(src)[:60]),
                    at_s=round(start - t0[0], 2),
                    s=round(time.perf_counter() - start, 3),
                    spec=str(sorted(getattr(src, "constants", {}).items()))[:300]
                    + " "
                    + str(getattr(src, "attrs", ""))[:200],
                    # the parts of Triton's disk-cache key: the function (source, callees, globals), the whole
                    # specialization, the compile options (same values in two starts: a hit)
                    fn_key=_short(getattr(fn, "cache_key", "")),
                    src_key=_short(src.hash()) if hasattr(src, "hash") else "",
                    options_key=_short(repr(sorted(kwargs.get("options", {}).items()))),
                )
            )

    triton.compiler.compile = timed
    return calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), default="llama-1b")
    p.add_argument("--model-dir", required=True, help="preset checkpoint folder (written when it has no config.json)")
    p.add_argument("--max-prefill-token-num", type=int, default=8192)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--tag", default="", help="a label copied into the JSON line (cold, warm, ...)")
    p.add_argument("--log-compiles", action="store_true", help="a JSON line per Triton kernel compile (or cache load)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # the engine's own log
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        log(f"writing {args.model} to {args.model_dir}")
        write_preset(args.model, args.model_dir, 0)
    t0 = time.perf_counter()
    compiles = _record_compiles([t0]) if args.log_compiles else None
    engine = Engine(
        args.model_dir,
        PytorchEngineConfig(
            dtype="bfloat16",
            cache_max_entry_count=0.8,
            eager_mode=args.eager,
            max_prefill_token_num=args.max_prefill_token_num,
        ),
    )
    load_s = time.perf_counter() - t0
    graphs = engine.graph_runner
    emit(
        peer="lmforge",
        measure="load",
        tag=args.tag,
        model=args.model,
        device=device_name(engine.device.type),
        git=git_sha(),
        load_s=round(load_s, 2),
        load_breakdown=engine.load_breakdown,
        import_torch_s=round(_T_TORCH - _T0, 2),
        import_lmforge_s=round(_T_LMFORGE - _T_TORCH, 2),
        script_to_ready_s=round(time.perf_counter() - _T0, 2),
        triton_cache=dict(
            dir=engine.triton_cache_dir,
            entries_at_start=engine.triton_cache_entries,
            entries_after=_entries(engine.triton_cache_dir),
        ),
        graph_buckets={bs: round(s, 3) for bs, s in sorted(graphs.bucket_seconds.items())} if graphs else {},
        profile_cached=engine.executor.driver.profile_cached,
        worker_times={k: round(v, 2) for k, v in engine.executor.driver.load_times.items()},
        kv_blocks=engine.block_manager.num_blocks,
        max_batch_size=engine.max_batch_size,
        transformers_imported="transformers" in sys.modules,
    )
    for c in compiles or []:
        emit(measure="triton_compile", tag=args.tag, model=args.model, **c)
    engine.close()


if __name__ == "__main__":
    main()
