"""CPU paged attention over a float32 vs a float16 KV cache, kernel time only: one decode step of the embedded
SmolLM2-135M (30 layers, 9 query / 3 KV heads of 64 dims, block size 64), each layer its own cache, this step's
keys and values written in the same call (fill_kv_and_attend, as the engine runs it).

The formats alternate (float32, float16, float32, ...) for --rounds rounds of --steps steps each, so a swing of the
machine's memory bandwidth hits both; one JSON line per format with the median and spread of the rounds' median
step times, and the cache bytes a step reads over that time (GB/s).

    python benchmarks/cpu_attention.py [--seqs 32] [--tokens 200] [--rounds 7] [--steps 20] [--torch]

--torch: the backends' plain-torch path instead of the kernel (the kernels off, as without a C compiler).
"""

from __future__ import annotations

import os

from lmforge.cpu_threads import set_omp_wait_policy  # noqa: E402

set_omp_wait_policy()  # before torch loads, as the engine runs

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from common import device_name, emit, git_sha, log  # noqa: E402

from lmforge.backends.cpu import attention  # noqa: E402
from lmforge.kernels import cpu as cpu_kernels  # noqa: E402
from lmforge.model_inputs import AttnMetadata, AttnOptions  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 30, 9, 3, 64, 64


def decode_batch(seqs: int, tokens: int, seed: int) -> tuple[AttnMetadata, int]:
    """A decode step of `seqs` sequences of tokens +-10% each (seeded), blocks in shuffled order."""
    rng = random.Random(seed)
    kv_lens = [rng.randint(int(tokens * 0.9), int(tokens * 1.1)) for _ in range(seqs)]
    blocks = [-(-n // BLOCK_SIZE) for n in kv_lens]
    order = list(range(sum(blocks)))
    rng.shuffle(order)
    tables = torch.zeros(seqs, max(blocks), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.tensor(order[used : used + n], dtype=torch.int32)
        used += n
    slots = [int(tables[i, (n - 1) // BLOCK_SIZE]) * BLOCK_SIZE + (n - 1) % BLOCK_SIZE for i, n in enumerate(kv_lens)]
    ones = torch.ones(seqs, dtype=torch.int32)
    meta = AttnMetadata(
        is_decoding=True,
        block_tables=tables,
        q_start_loc=torch.arange(seqs, dtype=torch.int32),
        q_seqlens=ones,
        kv_seqlens=torch.tensor(kv_lens, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_q_seqlen=1,
        max_kv_seqlen=max(kv_lens),
        block_size=BLOCK_SIZE,
        q_seqlens_list=[1] * seqs,
        kv_seqlens_list=kv_lens,
    )
    return meta, sum(kv_lens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--tokens", type=int, default=200, help="cached tokens a sequence (+-10%%)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=20, help="decode steps (x 30 layers) a round")
    p.add_argument("--threads", type=int, default=0, help="0: one per physical core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch", action="store_true", help="the plain-torch path (kernels off)")
    args = p.parse_args()
    from lmforge.cpu_threads import configure_cpu_threads

    configure_cpu_threads(args.threads)
    if args.torch:
        os.environ["LMFORGE_CPU_KERNELS"] = "0"
    elif not cpu_kernels.available():
        raise SystemExit("the CPU kernels did not build (no C compiler?); --torch times the plain-torch path")
    meta, cached_tokens = decode_batch(args.seqs, args.tokens, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    num_blocks = int(meta.block_tables.max()) + 1
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    caches = {dtype: [] for dtype in (torch.float32, torch.float16)}
    for _ in range(LAYERS):
        k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        for dtype, layers in caches.items():
            layers.append((k.to(dtype), v.to(dtype)))
    query = torch.randn(args.seqs, HEADS, HEAD_DIM, generator=g)
    key, value = torch.randn(args.seqs, KV_HEADS, HEAD_DIM, generator=g), torch.randn(args.seqs, KV_HEADS, HEAD_DIM)
    options = AttnOptions(scale=HEAD_DIM**-0.5)

    def step(layers) -> None:
        meta.scratch.clear()  # the torch path builds its per-step layout once, as in the engine
        for k_cache, v_cache in layers:
            attention.fill_kv_and_attend(query, key, value, k_cache, v_cache, meta, options)

    for layers in caches.values():  # warm-up: pages touched, the library loaded
        step(layers)
    rounds: dict[torch.dtype, list[float]] = {dtype: [] for dtype in caches}
    for r in range(args.rounds):
        for dtype, layers in caches.items():
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(layers)
                times.append(time.perf_counter() - t0)
            rounds[dtype].append(statistics.median(times))
        log(f"round {r}: " + ", ".join(f"{str(d)[6:]} {t[-1] * 1e3:.2f} ms" for d, t in rounds.items()))
    base = dict(
        bench="cpu_attention",
        impl="torch" if args.torch else "kernel",
        device=device_name("cpu"),
        threads=torch.get_num_threads(),
        git=git_sha(),
        layers=LAYERS,
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        seqs=args.seqs,
        cached_tokens=cached_tokens,
        rounds=args.rounds,
        steps_per_round=args.steps,
    )
    f32 = statistics.median(rounds[torch.float32])
    for dtype, times in rounds.items():
        # keys and values of every cached token, every layer
        read = LAYERS * cached_tokens * KV_HEADS * HEAD_DIM * 2 * torch.finfo(dtype).bits // 8
        med = statistics.median(times)
        emit(
            **base,
            kv_cache_dtype=str(dtype).removeprefix("torch."),
            step_ms_median=round(med * 1e3, 3),
            step_ms_min=round(min(times) * 1e3, 3),
            step_ms_max=round(max(times) * 1e3, 3),
            cache_gb_s=round(read / med / 1e9, 2),
            speedup_vs_float32=round(f32 / med, 3),
        )


if __name__ == "__main__":
    main()
