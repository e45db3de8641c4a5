"""CPU benchmark on the embedded SmolLM2-135M-Instruct (Q4_1 GGUF): lmforge vs HF transformers in one run.

Measures batch-1 decode (128 random prompt ids, --bs1-tokens greedy tokens, EOS ignored) and the
throughput of --requests requests with mixed prompt/output lengths (seeded), all submitted at once.
HF runs the same requests as one left-padded static batch (generate) and counts only the tokens each
request asked for. Prints one JSON line per engine and measure.

    python benchmarks/cpu.py [--dtype float32|bfloat16] [--requests 32]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from common import device_name, emit, git_sha, log

from lmforge import GenerationConfig, PytorchEngineConfig


def workload(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        in_len, out_len = rng.randint(16, 256), rng.randint(16, 128)
        reqs.append(([rng.randint(10, vocab - 1) for _ in range(in_len)], out_len))
    return reqs


def bench_lmforge(args, reqs, bs1_ids) -> None:
    from lmforge.engine.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(None, PytorchEngineConfig(device_type="cpu", dtype=args.dtype))
    load_s = time.perf_counter() - t0
    base = dict(
        bench="cpu",
        engine="lmforge",
        model="SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype=args.dtype,
        device=device_name("cpu"),
        git=git_sha(),
        load_s=round(load_s, 2),
    )
    gen = GenerationConfig(max_new_tokens=args.bs1_tokens, ignore_eos=True)
    engine.add_request(bs1_ids, GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    while engine.has_unfinished():
        engine.step()
    t0 = time.perf_counter()
    engine.add_request(bs1_ids, gen)
    first = None
    n = 0
    while engine.has_unfinished():
        for out in engine.step():
            n += len(out.token_ids)
            if first is None and out.token_ids:
                first = time.perf_counter()
    end = time.perf_counter()
    emit(
        **base,
        measure="bs1_decode",
        input_len=len(bs1_ids),
        output_len=n,
        decode_tok_s=round((n - 1) / (end - first), 2),
        ttft_s=round(first - t0, 4),
    )
    t0 = time.perf_counter()
    ttfts: dict[str, float] = {}
    for ids, out_len in reqs:
        engine.add_request(
            ids,
            GenerationConfig(
                max_new_tokens=out_len, ignore_eos=True, do_sample=True, temperature=0.6, top_p=1.0, top_k=0
            ),
        )
    out_tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            out_tokens += len(out.token_ids)
            if out.token_ids and out.request_id not in ttfts:
                ttfts[out.request_id] = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    in_tokens = sum(len(i) for i, _ in reqs)
    emit(
        **base,
        measure="throughput",
        requests=len(reqs),
        input_tokens=in_tokens,
        output_tokens=out_tokens,
        wall_s=round(wall, 2),
        output_tok_s=round(out_tokens / wall, 2),
        total_tok_s=round((out_tokens + in_tokens) / wall, 2),
        mean_ttft_s=round(sum(ttfts.values()) / len(ttfts), 3),
    )


def bench_hf(args, reqs, bs1_ids) -> None:
    from transformers import AutoModelForCausalLM

    from lmforge.weights.default_model import default_model_path

    path = default_model_path()
    folder, name = path.rsplit("/", 1)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, args.dtype)).eval()
    load_s = time.perf_counter() - t0
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    base = dict(
        bench="cpu",
        engine="hf",
        model="SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype=args.dtype,
        device=device_name("cpu"),
        git=git_sha(),
        load_s=round(load_s, 2),
    )

    def gen(ids, mask, n, **kw):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)

    ids = torch.tensor([bs1_ids])
    mask = torch.ones_like(ids)
    gen(ids, mask, 4, do_sample=False)
    t0 = time.perf_counter()
    gen(ids, mask, 1, do_sample=False)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen(ids, mask, args.bs1_tokens, do_sample=False)
    total = time.perf_counter() - t0
    emit(
        **base,
        measure="bs1_decode",
        input_len=len(bs1_ids),
        output_len=args.bs1_tokens,
        decode_tok_s=round((args.bs1_tokens - 1) / (total - ttft), 2),
        ttft_s=round(ttft, 4),
    )
    max_in = max(len(i) for i, _ in reqs)
    batch = torch.zeros(len(reqs), max_in, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for r, (ids_, _) in enumerate(reqs):
        batch[r, max_in - len(ids_) :] = torch.tensor(ids_)
        mask[r, max_in - len(ids_) :] = 1
    max_out = max(n for _, n in reqs)
    t0 = time.perf_counter()
    gen(batch, mask, max_out, do_sample=True, temperature=0.6, top_p=1.0, top_k=0)
    wall = time.perf_counter() - t0
    out_tokens = sum(n for _, n in reqs)
    in_tokens = sum(len(i) for i, _ in reqs)
    emit(
        **base,
        measure="throughput",
        requests=len(reqs),
        input_tokens=in_tokens,
        output_tokens=out_tokens,
        wall_s=round(wall, 2),
        output_tok_s=round(out_tokens / wall, 2),
        total_tok_s=round((out_tokens + in_tokens) / wall, 2),
        note="one left-padded static batch",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--bs1-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", default="lmforge,hf", help="comma-separated: lmforge, hf")
    args = p.parse_args()
    reqs = workload(args.requests, 49152, args.seed)
    rng = random.Random(args.seed + 1)
    bs1_ids = [rng.randint(10, 49151) for _ in range(128)]
    for peer in args.peers.split(","):
        log(f"running {peer}")
        {"lmforge": bench_lmforge, "hf": bench_hf}[peer](args, reqs, bs1_ids)


if __name__ == "__main__":
    main()
