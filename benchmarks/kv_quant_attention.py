"""Decode and prefill attention over a bf16, int8, int4 and fp8 KV cache of the same keys, kernel time only.

One JSON line per case: device, op, shape, cache format, microseconds (CUDA-graph replay, so no launch overhead),
GB/s of the cache bytes the format must read, and the ratio to the bf16 cache of the same case. Heads are
llama's 32 query / 8 KV heads; head_dim 64 is llama-1b, 128 llama-8b.

    python3 benchmarks/kv_quant_attention.py [--head-dims 64,128] [--sweep] [--compare DIR] [--deadline S]

--compare DIR: a folder of packages kvattn_<name>, each another copy of lmforge/kernels/cuda (decode_attention.py,
prefill_attention.py, common.py), timed beside this tree's as impl <name>.
--compile-only --shard i/n: launch each case once (fills the Triton cache for the timed run, n processes in parallel).
--deadline: stop starting cases after S seconds.
"""

from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import importlib
import json
import os
import sys
import time

import torch
from triton.testing import do_bench_cudagraph

from lmforge.backends import cpu as cpu_ops
from lmforge.kernels.cuda import decode_attention as decode_mod
from lmforge.kernels.cuda import prefill_attention as prefill_mod
from lmforge.model_inputs import QuantizedCache

DEVICE = torch.device("cuda")
HEADS, KV_HEADS, BLOCK_SIZE = 32, 8, 64
FORMATS = ("bf16", "int8", "int4", "fp8")
# decode launch configs of --sweep: (block_n, num_warps, num_stages)
SWEEP = ((64, 4, 2), (128, 4, 2), (128, 8, 2), (256, 4, 2), (256, 8, 2))


def caches_of(k_cache: torch.Tensor, v_cache: torch.Tensor, fmt: str) -> tuple[tuple, dict, int]:
    """(k, v) in format fmt, the launcher's quant kwargs, and bytes per (token, head) row of one cache."""
    head_dim = k_cache.shape[-1]
    if fmt == "bf16":
        return (k_cache, v_cache), {}, 2 * head_dim
    if fmt == "fp8":
        return (k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)), {}, head_dim
    bits = 8 if fmt == "int8" else 4
    slots = torch.arange(k_cache.shape[0] * k_cache.shape[1], device=DEVICE)
    out = []
    for src in (k_cache, v_cache):
        q = QuantizedCache(
            torch.empty(*src.shape[:3], head_dim * bits // 8, dtype=torch.uint8, device=DEVICE),
            torch.empty(*src.shape[:3], 2, device=DEVICE),
            bits,
        )
        cpu_ops.fill_kv_cache(src.flatten(0, 1), None, q, None, slots)
        out.append(q)
    kwargs = {"k_scales_zeros": out[0].scales_zeros, "v_scales_zeros": out[1].scales_zeros, "quant_bits": bits}
    return (out[0].data, out[1].data), kwargs, head_dim * bits // 8 + 8


def paged(num_seqs: int, q_len: int, kv_len: int, head_dim: int) -> dict:
    max_blocks = -(-kv_len // BLOCK_SIZE)
    num_blocks = num_seqs * max_blocks
    q_lens = torch.full((num_seqs,), q_len, dtype=torch.int32, device=DEVICE)
    k = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, head_dim, device=DEVICE, dtype=torch.bfloat16)
    return {
        "query": torch.randn(num_seqs * q_len, HEADS, head_dim, device=DEVICE, dtype=torch.bfloat16),
        "k": k,
        "v": torch.randn_like(k),
        "block_tables": torch.randperm(num_blocks, device=DEVICE).int().view(num_seqs, max_blocks),
        "q_start_loc": (torch.cumsum(q_lens, 0) - q_lens).int(),
        "q_seqlens": q_lens,
        "kv_seqlens": torch.full((num_seqs,), kv_len, dtype=torch.int32, device=DEVICE),
    }


def source_sha(mods: tuple) -> str:
    """Short hash of an implementation's kernel sources (its two modules and their common.py): which code ran."""
    digest = hashlib.sha1()
    for mod in mods:
        with open(mod.__file__, "rb") as f:
            digest.update(f.read())
    with open(os.path.join(os.path.dirname(mods[0].__file__), "common.py"), "rb") as f:
        digest.update(f.read())
    return digest.hexdigest()[:10]


def load_impls(compare: str | None) -> dict:
    """This tree's kernels as "new", and each kvattn_<name> package in the compare folder as <name>."""
    impls = {"new": (decode_mod, prefill_mod)}
    if compare:
        sys.path.insert(0, compare)
        for pkg in sorted(glob.glob(os.path.join(compare, "kvattn_*", "__init__.py"))):
            name = os.path.basename(os.path.dirname(pkg))
            impls[name.removeprefix("kvattn_")] = (
                importlib.import_module(f"{name}.decode_attention"),
                importlib.import_module(f"{name}.prefill_attention"),
            )
    return impls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--batches", default="256,64")
    p.add_argument("--kv-lens", default="512,2048")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--sweep", action="store_true", help="decode launch configs (SWEEP) for the int8 cache")
    p.add_argument("--prefill", action="store_true", help="also prefill of 512 new tokens after a 1536-token prefix")
    p.add_argument("--compare", help="folder of kvattn_<name> packages (other kernels/cuda copies)")
    p.add_argument("--only-quant-impls", action="store_true", help="copies but base: int8 / int4 decode only")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--shard", default="0/1")
    p.add_argument("--deadline", type=float, default=1e9)
    p.add_argument("--rep", type=int, default=30, help="ms of replays per timing")
    args = p.parse_args()
    t0 = time.perf_counter()
    shard, num_shards = map(int, args.shard.split("/"))
    impls = load_impls(args.compare)
    formats = args.formats.split(",")
    header = {"device": torch.cuda.get_device_name()}
    sources = {name: source_sha(mods) for name, mods in impls.items()}
    # (op, head_dim, batch, q_len, kv_len, fmt, impl, launch overrides), the most telling first (--deadline)
    head_dims, batches = [int(d) for d in args.head_dims.split(",")], [int(b) for b in args.batches.split(",")]
    kv_lens = [int(n) for n in args.kv_lens.split(",")]
    cases = []
    for batch in batches[:1]:
        for kv_len in kv_lens:
            for head_dim in head_dims:
                cases += [("decode", head_dim, batch, 1, kv_len, fmt, impl, {}) for fmt in formats for impl in impls]
    if args.only_quant_impls:  # copies other than "base" time only the int8 / int4 decode cases
        cases = [c for c in cases if c[6] in ("new", "base") or c[5] in ("int8", "int4")]
    for head_dim in head_dims if args.sweep else ():
        for block_n, num_warps, num_stages in SWEEP:
            overrides = {"block_n": block_n, "num_warps": num_warps, "num_stages": num_stages}
            cases.append(("decode", head_dim, batches[0], 1, max(kv_lens), "int8", "new", overrides))
    for head_dim in head_dims if args.prefill else ():
        cases += [
            ("prefill", head_dim, 4, 512, 2048, fmt, impl, {})
            for fmt in formats
            for impl in impls
            if impl in ("new", "base") or not args.only_quant_impls
        ]
    for batch in batches[1:]:
        for kv_len in kv_lens:
            for head_dim in head_dims:
                cases += [("decode", head_dim, batch, 1, kv_len, fmt, impl, {}) for fmt in formats for impl in impls]
    inputs, bf16_us = {}, {}
    for i, (op, head_dim, batch, q_len, kv_len, fmt, impl, overrides) in enumerate(cases):
        if i % num_shards != shard:
            continue
        if time.perf_counter() - t0 > args.deadline:
            print(f"deadline: {len(cases) - i} cases not run", file=sys.stderr)
            break
        key = (head_dim, batch, q_len, kv_len)
        if key not in inputs:
            inputs.clear()
            torch.cuda.empty_cache()
            inputs[key] = (paged(batch, q_len, kv_len, head_dim), {})
        data, by_fmt = inputs[key]
        if fmt not in by_fmt:
            by_fmt[fmt] = caches_of(data["k"], data["v"], fmt)
        (k_cache, v_cache), quant, row_bytes = by_fmt[fmt]
        decode, prefill = impls[impl]
        scale = head_dim**-0.5
        if op == "decode":
            fn = functools.partial(
                decode.decode_attention,
                data["query"], k_cache, v_cache, data["block_tables"], data["kv_seqlens"], scale, **quant, **overrides,
            )  # fmt: skip
        else:
            fn = functools.partial(
                prefill.prefill_attention,
                data["query"], k_cache, v_cache, data["block_tables"], data["q_start_loc"], data["q_seqlens"],
                data["kv_seqlens"], q_len, scale, **quant,
            )  # fmt: skip
        try:
            fn()
            torch.cuda.synchronize()
            if args.compile_only:
                continue
            us = do_bench_cudagraph(fn, rep=args.rep, return_mode="median") * 1e3
        except Exception as exc:  # a config that does not compile is a result, not the end of the run
            print(f"{op} {key} {fmt} {impl} {overrides}: {exc!r:.300}", file=sys.stderr)
            continue
        num_bytes = 2 * batch * kv_len * KV_HEADS * row_bytes
        rec = {**header, "op": op, "head_dim": head_dim, "batch": batch, "q_len": q_len, "kv_len": kv_len}
        rec.update(
            {
                "cache": fmt,
                "impl": impl,
                "src": sources[impl],
                **overrides,
                "us": round(us, 1),
                "gb_s": round(num_bytes / us / 1e3),
            }
        )
        if fmt == "bf16" and not overrides:
            bf16_us[(op, key, impl)] = us
        base = bf16_us.get((op, key, impl))
        if base:
            rec["vs_bf16"] = round(base / us, 3)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
