"""Triton kernels of the cuda backend against the torch reference ops (lmforge.backends.cpu run on the GPU).

Prints one JSON line per case to stdout: device, op, shape, median ms (triton.testing.do_bench, which
clears L2 between runs), achieved GB/s (bytes the op must move / time) and the same for the reference.
The first line measures a plain device copy: the bandwidth floor the memory-bound kernels are held to.

    python3 benchmarks/kernel_sweep.py [--quick] [--only copy,decode,prefill,pointwise,moe,kvquant,bs1]

bs1 (on request): batch-1 decode attention with the step's key/value fill, as a decode graph runs it (block table
as wide as an 8,192-token session, llama-1b / llama-8b heads), over block_n, num_warps and min_split_keys.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from lmforge.backends import cpu as cpu_ops
from lmforge.backends import cuda as cuda_ops
from lmforge.kernels.cuda.decode_attention import decode_attention, default_block_n, default_num_splits
from lmforge.kernels.cuda.prefill_attention import prefill_attention
from lmforge.model_inputs import AttnMetadata, AttnOptions

DEVICE = torch.device("cuda")
BF16 = torch.bfloat16


def _git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


HEADER = {"git_sha": _git_sha(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}


def emit(
    op: str,
    shape: dict,
    ms: float,
    num_bytes: float | None = None,
    ref_ms: float | None = None,
    flops: float | None = None,
    **extra,
) -> None:
    rec = {**HEADER, "op": op, "shape": shape, "ms": round(ms, 4)}
    if num_bytes is not None:
        rec["gb_s"] = round(num_bytes / ms / 1e6, 1)
    if flops is not None:
        rec["tflop_s"] = round(flops / ms / 1e9, 1)
    if ref_ms is not None:
        rec["ref_ms"] = round(ref_ms, 4)
        if num_bytes is not None:
            rec["ref_gb_s"] = round(num_bytes / ref_ms / 1e6, 1)
        if flops is not None:
            rec["ref_tflop_s"] = round(flops / ref_ms / 1e9, 1)
        rec["speedup"] = round(ref_ms / ms, 2)
    rec.update(extra)
    print(json.dumps(rec), flush=True)


def bench(fn, rep: int = 100) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def graph_bench(fn, rep: int = 100) -> float:
    """Median ms of fn replayed from a CUDA graph: kernel time without Python launch overhead."""
    return do_bench_cudagraph(fn, rep=rep, return_mode="median")


def eager_us(fn, calls: int = 200) -> float:
    """Wall microseconds per call of back-to-back eager calls: the launch overhead, for ops too small to hide it."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) / calls * 1e6, 1)


def paged_inputs(
    q_lens: list[int], kv_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttnMetadata]:
    """Random caches with each sequence's blocks scattered over the pool, as a long-running server has them."""
    num_seqs = len(q_lens)
    max_blocks = max(-(-kv // block_size) for kv in kv_lens)
    num_blocks = num_seqs * max_blocks
    block_tables = torch.randperm(num_blocks, device=DEVICE).int().view(num_seqs, max_blocks)
    q_lens_t = torch.tensor(q_lens, dtype=torch.int32, device=DEVICE)
    meta = AttnMetadata(
        is_decoding=max(q_lens) == 1,
        block_tables=block_tables,
        q_start_loc=(torch.cumsum(q_lens_t, 0) - q_lens_t).int(),
        q_seqlens=q_lens_t,
        kv_seqlens=torch.tensor(kv_lens, dtype=torch.int32, device=DEVICE),
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64, device=DEVICE),
        max_q_seqlen=max(q_lens),
        max_kv_seqlen=max(kv_lens),
        block_size=block_size,
        q_seqlens_list=q_lens,
        kv_seqlens_list=kv_lens,
    )
    query = torch.randn(sum(q_lens), num_heads, head_dim, device=DEVICE, dtype=BF16)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE, dtype=BF16)
    v_cache = torch.randn_like(k_cache)
    return query, k_cache, v_cache, meta


def bench_copy() -> None:
    src = torch.empty(1 << 29, dtype=torch.uint8, device=DEVICE)  # 512 MiB
    dst = torch.empty_like(src)
    emit("copy", {"bytes": src.numel()}, bench(lambda: dst.copy_(src)), 2 * src.numel())


def bench_decode(
    num_seqs: int, kv_len: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, sweep: bool = False
) -> None:
    query, k_cache, v_cache, meta = paged_inputs(
        [1] * num_seqs, [kv_len] * num_seqs, num_heads, num_kv_heads, head_dim, block_size
    )
    scale = head_dim**-0.5
    shape = {
        "batch": num_seqs,
        "kv_len": kv_len,
        "heads": num_heads,
        "kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "block_size": block_size,
    }
    num_bytes = 2 * num_seqs * kv_len * num_kv_heads * head_dim * 2 + 2 * query.numel() * 2
    op = cuda_ops.OPS["paged_attention"]
    ms = bench(lambda: op(query, k_cache, v_cache, meta, AttnOptions(scale)))
    ref_ms = bench(lambda: cpu_ops.paged_attention(query, k_cache, v_cache, meta, AttnOptions(scale)))
    graph_ms = graph_bench(lambda: op(query, k_cache, v_cache, meta, AttnOptions(scale)))
    block_n = default_block_n(head_dim, head_dim)
    splits = default_num_splits(num_seqs, num_kv_heads, meta.block_tables.shape[1] * block_size, block_n, DEVICE)
    emit(
        "paged_attention_decode",
        shape,
        ms,
        num_bytes,
        ref_ms,
        graph_ms=round(graph_ms, 4),
        graph_gb_s=round(num_bytes / graph_ms / 1e6, 1),
        num_splits=splits,
        block_n=block_n,
        eager_us=eager_us(lambda: op(query, k_cache, v_cache, meta, AttnOptions(scale))),
    )
    if not sweep:
        return
    for block_n, num_warps in ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8)):
        for num_splits in (1, 2, 3, 4, 8):

            def run(block_n=block_n, num_splits=num_splits, num_warps=num_warps):
                return decode_attention(
                    query,
                    k_cache,
                    v_cache,
                    meta.block_tables,
                    meta.kv_seqlens,
                    scale,
                    num_splits=num_splits,
                    block_n=block_n,
                    num_warps=num_warps,
                )

            ms = graph_bench(run, rep=30)
            emit(
                "paged_attention_decode_sweep",
                shape,
                ms,
                num_bytes,
                block_n=block_n,
                num_splits=num_splits,
                num_warps=num_warps,
                timing="cuda_graph",
            )


def bench_bs1_decode(kv_len: int, head_dim: int, session: int = 8192, block_size: int = 64) -> None:
    """One sequence, 32 query / 8 KV heads, the fused fill of this step's key and value (fill_kv_and_attend)."""
    query, k_cache, v_cache, meta = paged_inputs([1], [session], 32, 8, head_dim, block_size)
    meta.kv_seqlens.fill_(kv_len)
    key = torch.randn(1, 8, head_dim, device=DEVICE, dtype=BF16)
    value = torch.randn_like(key)
    slots = (meta.block_tables[0, (kv_len - 1) // block_size].long() * block_size + (kv_len - 1) % block_size).view(1)
    scale = head_dim**-0.5
    shape = {"batch": 1, "kv_len": kv_len, "heads": 32, "kv_heads": 8, "head_dim": head_dim, "session": session}
    num_bytes = 2 * kv_len * 8 * head_dim * 2
    block_ns = (32, 64) if head_dim > 64 else (64, 128)
    for block_n in (None, *block_ns):
        for num_warps in (2, 4):
            for min_keys in (None, 64, 128) if block_n else (None,):
                if block_n is None and num_warps != 4:
                    continue

                def run(block_n=block_n, num_warps=num_warps, min_keys=min_keys):
                    return decode_attention(
                        query,
                        k_cache,
                        v_cache,
                        meta.block_tables,
                        meta.kv_seqlens,
                        scale,
                        block_n=block_n,
                        num_warps=num_warps,
                        key=key,
                        value=value,
                        slot_mapping=slots,
                        min_split_keys=min_keys,
                    )

                ms = graph_bench(run, rep=20)
                emit(
                    "bs1_decode_attention",
                    shape,
                    ms,
                    num_bytes,
                    block_n=block_n or "default",
                    num_warps=num_warps,
                    min_split_keys=min_keys or "default",
                    timing="cuda_graph",
                )


def bench_prefill(
    num_seqs: int,
    q_len: int,
    kv_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    sweep: bool = False,
) -> None:
    query, k_cache, v_cache, meta = paged_inputs(
        [q_len] * num_seqs, [kv_len] * num_seqs, num_heads, num_kv_heads, head_dim, block_size
    )
    scale = head_dim**-0.5
    shape = {
        "batch": num_seqs,
        "q_len": q_len,
        "kv_len": kv_len,
        "heads": num_heads,
        "kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "block_size": block_size,
    }
    visible_pairs = num_seqs * sum(kv_len - q_len + i + 1 for i in range(q_len))
    flops = 4 * visible_pairs * num_heads * head_dim  # QK^T and PV, 2 flops per multiply-add
    op = cuda_ops.OPS["paged_attention"]
    ms = bench(lambda: op(query, k_cache, v_cache, meta, AttnOptions(scale)))
    ref_ms = bench(lambda: cpu_ops.paged_attention(query, k_cache, v_cache, meta, AttnOptions(scale)))
    extra = {}
    if q_len == kv_len:  # contiguous causal SDPA (FlashAttention in torch): what a non-paged kernel reaches
        q = torch.randn(num_seqs, num_heads, q_len, head_dim, device=DEVICE, dtype=BF16)
        k = torch.randn(num_seqs, num_kv_heads, kv_len, head_dim, device=DEVICE, dtype=BF16)
        sdpa_ms = bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        )
        extra = {"sdpa_contiguous_ms": round(sdpa_ms, 4), "sdpa_tflop_s": round(flops / sdpa_ms / 1e9, 1)}
    emit("paged_attention_prefill", shape, ms, None, ref_ms, flops=flops, **extra)
    if not sweep:
        return
    configs = [
        (64, 64, 4, 2),
        (64, 64, 4, 3),
        (128, 64, 4, 2),
        (128, 64, 4, 3),
        (128, 64, 8, 2),
        (128, 64, 8, 3),
        (128, 128, 8, 2),
        (128, 32, 4, 3),
        (64, 128, 4, 2),
    ]
    for config in configs:

        def run(config=config):
            return prefill_attention(
                query,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.q_start_loc,
                meta.q_seqlens,
                meta.kv_seqlens,
                meta.max_q_seqlen,
                scale,
                config=config,
            )

        try:
            emit("paged_attention_prefill_sweep", shape, bench(run, rep=50), flops=flops, config=config)
        except Exception as exc:  # a config that does not fit shared memory is a result, not a crash
            print(f"prefill config {config} failed: {exc!r:.200}", file=sys.stderr)


def bench_op(op: str, shape: dict, fn, ref_fn, num_bytes: float) -> None:
    """Device time (do_bench) and, since these ops are tiny at decode sizes, wall time per eager call."""
    emit(op, shape, bench(fn), num_bytes, bench(ref_fn), eager_us=eager_us(fn), ref_eager_us=eager_us(ref_fn))


def bench_pointwise(num_tokens: int) -> None:
    hidden, inter, heads, kv_heads, head_dim = 4096, 14336, 32, 8, 128
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=BF16)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device=DEVICE, dtype=BF16)
    shape = {"tokens": num_tokens, "hidden": hidden}
    bench_op(
        "rms_norm_residual",
        shape,
        lambda: cuda_ops.OPS["rms_norm"](x, w, 1e-6, res),
        lambda: cpu_ops.rms_norm(x, w, 1e-6, res),
        4 * x.numel() * 2,
    )
    gate_up = torch.randn(num_tokens, 2 * inter, device=DEVICE, dtype=BF16)
    shape = {"tokens": num_tokens, "intermediate": inter}
    bench_op(
        "silu_and_mul",
        shape,
        lambda: cuda_ops.OPS["silu_and_mul"](gate_up),
        lambda: cpu_ops.silu_and_mul(gate_up),
        3 * num_tokens * inter * 2,
    )
    bench_op(
        "gelu_tanh_and_mul",
        shape,
        lambda: cuda_ops.OPS["gelu_and_mul"](gate_up, "tanh"),
        lambda: cpu_ops.gelu_and_mul(gate_up, "tanh"),
        3 * num_tokens * inter * 2,
    )
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=BF16)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    pos = torch.arange(num_tokens, device=DEVICE).float()[:, None] * torch.rand(head_dim, device=DEVICE)[None]
    cos, sin = pos.cos(), pos.sin()
    shape = {"tokens": num_tokens, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
    bench_op(
        "apply_rotary",
        shape,
        lambda: cuda_ops.OPS["apply_rotary"](q, k, cos, sin),
        lambda: cpu_ops.apply_rotary(q, k, cos, sin),
        2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 4,
    )
    value = qkv[:, (heads + kv_heads) * head_dim :].view(num_tokens, kv_heads, head_dim)
    k_cache = torch.empty(math.ceil(num_tokens / 16) + 8, 16, kv_heads, head_dim, device=DEVICE, dtype=BF16)
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(k_cache.shape[0] * 16, device=DEVICE)[:num_tokens]
    shape = {"tokens": num_tokens, "kv_heads": kv_heads, "head_dim": head_dim}
    bench_op(
        "fill_kv_cache",
        shape,
        lambda: cuda_ops.OPS["fill_kv_cache"](k, value, k_cache, v_cache, slots),
        lambda: cpu_ops.fill_kv_cache(k, value, k_cache, v_cache, slots),
        4 * k.numel() * 2,
    )


def bench_moe(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int) -> None:
    """Triton fused MoE against the reference op on the GPU (grouped: one matmul pair per expert that got tokens)."""
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=BF16)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, dtype=BF16) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, device=DEVICE, dtype=BF16) * inter**-0.5
    weights, ids = torch.randn(num_tokens, num_experts, device=DEVICE).softmax(-1).topk(top_k, dim=-1)
    shape = {"tokens": num_tokens, "hidden": hidden, "intermediate": inter, "experts": num_experts, "top_k": top_k}
    flops = 2 * num_tokens * top_k * 3 * hidden * inter
    num_bytes = ids.unique().numel() * 3 * hidden * inter * 2 + 2 * x.numel() * 2  # weights of the experts used
    op = cuda_ops.OPS["fused_moe"]
    ms = bench(lambda: op(x, gate_up, down, weights, ids))
    ref_ms = bench(lambda: cpu_ops.fused_moe(x, gate_up, down, weights, ids))
    graph_ms = graph_bench(lambda: op(x, gate_up, down, weights, ids))
    emit("fused_moe", shape, ms, num_bytes, ref_ms, flops=flops, graph_ms=round(graph_ms, 4))


def bench_kv_quant(num_seqs: int, kv_len: int, q_len: int, head_dim: int, block_size: int = 64) -> None:
    """Decode (q_len 1) or prefill attention over a bf16, int8, int4 and fp8 cache of the same keys (llama-1b
    heads: 32 / 8); GB/s counts the cache bytes each format reads."""
    from lmforge.model_inputs import QuantizedCache

    query, k_cache, v_cache, meta = paged_inputs([q_len] * num_seqs, [kv_len] * num_seqs, 32, 8, head_dim, block_size)
    opts = AttnOptions(head_dim**-0.5)
    op = cuda_ops.OPS["paged_attention"]
    slots = torch.arange(k_cache.shape[0] * block_size, device=DEVICE)
    rows = num_seqs * kv_len * 8  # token-head rows read per cache
    for fmt in ("bf16", "int8", "int4", "fp8"):
        if fmt == "bf16":
            caches, row_bytes = (k_cache, v_cache), 2 * head_dim
        elif fmt == "fp8":
            caches, row_bytes = (k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)), head_dim
        else:
            bits = 8 if fmt == "int8" else 4
            caches = tuple(
                QuantizedCache(
                    torch.empty(*c.shape[:3], head_dim * bits // 8, dtype=torch.uint8, device=DEVICE),
                    torch.empty(*c.shape[:3], 2, device=DEVICE),
                    bits,
                )
                for c in (k_cache, v_cache)
            )
            for src, dst in zip((k_cache, v_cache), caches, strict=True):
                cpu_ops.fill_kv_cache(src.flatten(0, 1), None, dst, None, slots)
            row_bytes = head_dim * bits // 8 + 8
        shape = {"batch": num_seqs, "kv_len": kv_len, "q_len": q_len, "head_dim": head_dim, "cache": fmt}
        ms = bench(lambda caches=caches: op(query, *caches, meta, opts))
        emit("paged_attention_kv_quant", shape, ms, 2 * rows * row_bytes)


def main() -> None:
    if not torch.cuda.is_available():
        print("benchmarks/kernel_sweep.py needs a CUDA device", file=sys.stderr)
        sys.exit(1)
    quick = "--quick" in sys.argv
    groups = {"copy", "decode", "prefill", "pointwise", "moe"}  # and, on request, kvquant
    if "--only" in sys.argv:
        groups = set(sys.argv[sys.argv.index("--only") + 1].split(","))
    torch.manual_seed(0)
    print(f"triton {triton.__version__}, torch {torch.__version__}", file=sys.stderr)
    if "copy" in groups:
        bench_copy()
    if "decode" in groups:
        bench_decode(64, 1024, 32, 8, 64, 16, sweep=not quick)
        bench_decode(64, 1024, 32, 8, 64, 64)
        bench_decode(64, 1024, 32, 8, 128, 16, sweep=not quick)
        bench_decode(256, 512, 32, 8, 128, 16)
        bench_decode(1, 8192, 32, 8, 128, 16)
        bench_decode(8, 2048, 16, 1, 256, 16)
    if "bs1" in groups:
        for head_dim in (128, 64):
            for kv_len in (128, 320, 512, 1024):
                bench_bs1_decode(kv_len, head_dim)
    if "prefill" in groups:
        bench_prefill(4, 1024, 1024, 32, 8, 128, 16, sweep=not quick)
        bench_prefill(4, 512, 2048, 32, 8, 128, 16)
        bench_prefill(1, 4096, 4096, 32, 8, 64, 64, sweep=not quick)
    if "kvquant" in groups:
        bench_kv_quant(256, 1024, 1, 64)
        bench_kv_quant(64, 2048, 1, 128)
        bench_kv_quant(4, 1024, 1024, 64)
    if "pointwise" in groups:
        for num_tokens in (64, 4096):
            bench_pointwise(num_tokens)
    if "moe" in groups:
        # Qwen1.5-MoE / DeepSeek-V2-Lite-like (64 x 1408, top 6), Qwen3-30B-A3B (128 x 768, top 8), Mixtral-like
        for num_tokens in (1, 64, 4096):
            bench_moe(num_tokens, 2048, 1408, 64, 6)
        for num_tokens in (1, 256, 4096):
            bench_moe(num_tokens, 2048, 768, 128, 8)
        bench_moe(4096, 2048, 1408, 8, 2)


if __name__ == "__main__":
    main()
