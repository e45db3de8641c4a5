"""GPU throughput and batch-1 benchmark, on the workload of the peer kit (../shared/peer/bench_peer.py):
256 requests, seed 0, input U[100,1024], output U[100,1024] tokens (EOS ignored), temperature 0.6,
all submitted at once; batch-1: 128 random ids in, 256 greedy tokens out. One JSON line per measure.

    python benchmarks/throughput.py --model llama-1b [--model-dir DIR]   # writes a random-weight preset if DIR is empty
    python benchmarks/throughput.py --model-path /path/to/hf_folder
Run it in the same device call as the peer kit so the figures compare on one card.
"""

from __future__ import annotations

import time

_SCRIPT_START = time.perf_counter()  # before torch and lmforge import: script_to_ready_s counts them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from common import device_name, emit, git_sha, log  # noqa: E402

from lmforge import GenerationConfig, PytorchEngineConfig  # noqa: E402

VOCAB = 49152
PRESETS = {
    "llama-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        tie_word_embeddings=True,
    ),
    "llama-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        tie_word_embeddings=False,
    ),
}


def workload(n: int, seed: int, vocab: int = VOCAB) -> list[tuple[list[int], int]]:
    """The peer kit's workload, draw for draw: per request in_len, out_len, then the ids."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        in_len = rng.randint(100, 1024)
        out_len = rng.randint(100, 1024)
        reqs.append(([rng.randint(10, vocab - 1) for _ in range(in_len)], out_len))
    return reqs


def bs1_ids(seed: int, vocab: int = VOCAB) -> list[int]:
    rng = random.Random(seed + 1)
    return [rng.randint(10, vocab - 1) for _ in range(128)]


def write_preset(name: str, path: str, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        **PRESETS[name],
    )
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def run(engine, reqs: list[tuple[list[int], GenerationConfig]]) -> tuple[float, list[float], int]:
    """Submit everything at once, step to the end; returns (wall s, per-request TTFT s, output tokens)."""
    t0 = time.perf_counter()
    ids = [engine.add_request(p, g) for p, g in reqs]
    first: dict[str, float] = {}
    n_out = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids:
                n_out += len(out.token_ids)
                first.setdefault(out.request_id, time.perf_counter() - t0)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, [first[i] for i in ids if i in first], n_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), default="llama-1b")
    p.add_argument("--model-dir", help="preset checkpoint folder (written when it has no config.json)")
    p.add_argument("--model-path", help="benchmark this HF folder instead of a preset")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", help="JSON workload written by bench_peer.py --write-workload")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-prefill-token-num", type=int, default=8192)
    p.add_argument("--skip", default="", help="comma list of measures to skip: throughput, bs1")
    p.add_argument("--no-warmup", action="store_true", help="no 16-request warm-up before the timed runs")
    p.add_argument("--quant-policy", type=int, choices=[0, 4, 8], default=0, help="KV cache int8 (8) / int4 (4)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="fp8: a float8 e4m3 KV cache")
    args = p.parse_args()

    from lmforge.engine.engine import Engine

    path = args.model_path or args.model_dir or os.path.join(tempfile.mkdtemp(), args.model)
    wrote_preset = not os.path.exists(os.path.join(path, "config.json"))
    if wrote_preset:  # imports transformers in this process, which then no longer shows in the engine's start
        log(f"writing {args.model} to {path}")
        write_preset(args.model, path, args.seed)
    if args.workload:
        with open(args.workload) as f:
            data = json.load(f)
        reqs = [(r["input_ids"], r["out_len"]) for r in data["requests"]]
    else:
        reqs = workload(args.num_requests, args.seed)
    base = dict(
        peer="lmforge",
        model=args.model_path or args.model,
        device=device_name("cuda"),
        git=git_sha(),
        eager=args.eager,
        quant_policy=args.quant_policy,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = Engine(
        path,
        PytorchEngineConfig(
            dtype="bfloat16",
            cache_max_entry_count=0.8,
            eager_mode=args.eager,
            max_batch_size=args.max_batch_size,
            max_prefill_token_num=args.max_prefill_token_num,
            quant_policy=args.quant_policy,
            kv_cache_dtype=args.kv_cache_dtype,
        ),
    )
    load_s = time.perf_counter() - t0
    ready_s = time.perf_counter() - _SCRIPT_START
    graphs = engine.graph_runner.capture_seconds if engine.graph_runner else 0.0
    base.update(
        load_s=round(load_s, 2),
        load_breakdown=engine.load_breakdown,
        # the whole process start (imports included) when this process did not write the preset first
        script_to_ready_s=round(ready_s, 2) if not wrote_preset else None,
        triton_cache=dict(dir=engine.triton_cache_dir, entries_at_start=engine.triton_cache_entries),
        graph_capture_s=round(graphs, 2),
        kv_blocks=engine.block_manager.num_blocks,
        block_size=engine.engine_config.block_size,
        max_batch_size=engine.max_batch_size,
    )
    log(f"engine ready in {load_s:.1f} s")

    def sampled(n: int) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=0.6, top_p=1.0, top_k=0, ignore_eos=True
        )

    warm = random.Random(123)
    if not args.no_warmup:
        run(engine, [([warm.randint(10, VOCAB - 1) for _ in range(64)], sampled(16 + 4 * i)) for i in range(16)])
    if "throughput" not in args.skip:
        engine.step_stats = dict.fromkeys(engine.step_stats, 0)
        wall, ttfts, n_out = run(engine, [(ids, sampled(n)) for ids, n in reqs])
        host = {k: round(v, 3) for k, v in engine.step_stats.items()}
        n_in = sum(len(ids) for ids, _ in reqs)
        ttfts.sort()
        emit(
            **base,
            measure="throughput",
            out_tok_s=round(n_out / wall, 1),
            total_tok_s=round((n_out + n_in) / wall, 1),
            wall_s=round(wall, 3),
            ttft_s=round(sum(ttfts) / len(ttfts), 3),
            ttft_p50_s=round(ttfts[len(ttfts) // 2], 3),
            requests=len(reqs),
            out_tokens=n_out,
            in_tokens=n_in,
            wrong_length_requests=int(n_out != sum(n for _, n in reqs)),
            peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
            host=host,
        )
    if "bs1" not in args.skip:
        greedy = GenerationConfig(max_new_tokens=256, min_new_tokens=256, top_k=1, ignore_eos=True)
        ids = bs1_ids(args.seed)
        run(engine, [(ids, greedy)])
        t0 = time.perf_counter()
        rid = engine.add_request(ids, greedy)
        t_first, n = None, 0
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == rid and out.token_ids:
                    n += len(out.token_ids)
                    t_first = t_first or time.perf_counter()
        t_end = time.perf_counter()
        emit(
            **base,
            measure="bs1_decode",
            out_tok_s=round((n - 1) / (t_end - t_first), 1),
            ttft_s=round(t_first - t0, 4),
            wall_s=round(t_end - t0, 3),
            out_tokens=n,
            in_tokens=len(ids),
        )


if __name__ == "__main__":
    main()
