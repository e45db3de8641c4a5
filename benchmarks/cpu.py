"""CPU benchmark on the embedded SmolLM2-135M-Instruct (Q4_1 GGUF): lmforge vs HF transformers vs llama.cpp in
one run, on the same file, the same prompt ids and the same thread count.

Measures batch-1 decode (128 random prompt ids, --bs1-tokens greedy tokens, EOS ignored) and the
throughput of --requests requests with mixed prompt/output lengths (seeded), all submitted at once.
HF runs the same requests as one left-padded static batch (generate) and counts only the tokens each
request asked for; llama.cpp (llama-cpp-python, one sequence at a time) runs them one after another.
Every peer runs --repeats times, interleaved (lmforge, hf, llamacpp, lmforge, ...), so the spread of a
busy machine shows in the figures. Prints one JSON line per engine, measure and repeat, with the CPU
model and its vector flags (AVX2 / AVX-512 / AVX512-BF16 / AMX).

    python benchmarks/cpu.py [--dtype auto|float32|bfloat16] [--kv-cache-dtype auto|float16|float32] [--requests 32]
        [--peers lmforge,hf,llamacpp]

The llama.cpp peer needs llama-cpp-python, which has no Linux CPU wheel on PyPI: `--install-llama-cpp`
builds it from source for this CPU (CMAKE_ARGS=-DGGML_NATIVE=ON; about 40 minutes on 2 idle cores), i.e.

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-deps llama-cpp-python==0.3.36 diskcache==5.6.3

All peers run in this one process under one OpenMP wait policy (lmforge's: a short spin, GOMP_SPINCOUNT=10000,
unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set; llama.cpp's own threads are not OpenMP-torch's but are given the
same count). lmforge's engine may drop to one thread while other work contends for the cores (its
`thread_drops` field counts that); every peer starts at the same count.
"""

from __future__ import annotations

import os

from lmforge.cpu_threads import set_omp_wait_policy  # noqa: E402

set_omp_wait_policy()  # before torch loads; the same for every peer

import argparse  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from common import device_name, emit, git_sha, log  # noqa: E402

from lmforge import GenerationConfig, PytorchEngineConfig  # noqa: E402

LLAMA_CPP_PIN = ("llama-cpp-python==0.3.36", "diskcache==5.6.3")
_FLAGS = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vbmi",
    "avx512_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
)


def cpu_flags() -> str:
    """The vector extensions of this CPU that matter for these kernels, as one string."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return "unknown"
    return ",".join(flag for flag in _FLAGS if flag in flags) or "none of " + ",".join(_FLAGS)


def workload(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        in_len, out_len = rng.randint(16, 256), rng.randint(16, 128)
        reqs.append(([rng.randint(10, vocab - 1) for _ in range(in_len)], out_len))
    return reqs


def bench_lmforge(args, reqs, bs1_ids) -> None:
    from lmforge.engine.engine import Engine

    torch.set_num_threads(args.num_threads)
    t0 = time.perf_counter()
    cfg = PytorchEngineConfig(
        device_type="cpu", dtype=args.dtype, cpu_threads=args.threads, kv_cache_dtype=args.kv_cache_dtype
    )
    engine = Engine(None, cfg)
    load_s = time.perf_counter() - t0
    base = dict(
        bench="cpu",
        engine="lmforge",
        model="SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype=args.dtype,
        kv_cache_dtype=str(engine.cache.kv_caches[0][0].dtype).removeprefix("torch."),  # what 'auto' chose
        device=device_name("cpu"),
        cpu_flags=cpu_flags(),
        threads=torch.get_num_threads(),
        repeat=args.repeat,
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
        thread_drops=engine._thread_governor.drops if engine._thread_governor else 0,
    )
    torch.set_num_threads(args.num_threads)  # the governor's choice does not carry over to the next peer


def bench_hf(args, reqs, bs1_ids) -> None:
    from transformers import AutoModelForCausalLM

    from lmforge.weights.default_model import default_model_path

    path = default_model_path()
    folder, name = path.rsplit("/", 1)
    t0 = time.perf_counter()
    dtype = "float32" if args.dtype == "auto" else args.dtype
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - t0
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    base = dict(
        bench="cpu",
        engine="hf",
        model="SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype=dtype,
        device=device_name("cpu"),
        cpu_flags=cpu_flags(),
        threads=torch.get_num_threads(),
        repeat=args.repeat,
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


def install_llama_cpp() -> None:
    """Build llama-cpp-python from source for this CPU (no deps: its numpy/jinja2/typing-extensions come with
    lmforge's own stack)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *LLAMA_CPP_PIN]
    log("building llama-cpp-python from source (tens of minutes on a small CPU):", " ".join(cmd))
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON")}
    subprocess.run(cmd, env=env, check=True)


def bench_llamacpp(args, reqs, bs1_ids) -> None:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit(
            "the llama.cpp peer needs llama-cpp-python: run this benchmark once with --install-llama-cpp, or\n"
            f"    CMAKE_ARGS=-DGGML_NATIVE=ON pip install --no-deps {' '.join(LLAMA_CPP_PIN)}"
        ) from None
    import llama_cpp

    from lmforge.weights.default_model import default_model_path

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    llm = Llama(
        default_model_path(), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    load_s = time.perf_counter() - t0
    base = dict(
        bench="cpu",
        engine="llama.cpp",
        version=llama_cpp.__version__,
        model="SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype="gguf (Q4_1 kept packed)",
        device=device_name("cpu"),
        cpu_flags=cpu_flags(),
        threads=threads,
        repeat=args.repeat,
        git=git_sha(),
        load_s=round(load_s, 2),
    )

    def run(ids, n, **sampling):
        """(seconds to the first token, seconds for all n tokens): n tokens whatever they are (EOS ignored)."""
        start = time.perf_counter()
        first = None
        for i, _ in enumerate(llm.generate(ids, reset=True, **sampling)):
            if first is None:
                first = time.perf_counter()
            if i + 1 == n:
                break
        return first - start, time.perf_counter() - start

    greedy = dict(temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    run(bs1_ids, 4, **greedy)  # warm-up
    ttft, total = run(bs1_ids, args.bs1_tokens, **greedy)
    emit(
        **base,
        measure="bs1_decode",
        input_len=len(bs1_ids),
        output_len=args.bs1_tokens,
        decode_tok_s=round((args.bs1_tokens - 1) / (total - ttft), 2),
        ttft_s=round(ttft, 4),
    )
    t0 = time.perf_counter()
    ttfts = []
    for ids, out_len in reqs:
        ttft, _ = run(ids, out_len, temp=0.6, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        ttfts.append(ttft)
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
        note="one request after another",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="lmforge's dtype (auto: GGUF weights kept packed as int4; HF then runs float32); default auto",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "float16", "float32"],
        help="lmforge's KV cache (auto: float16 under dtype auto without native bf16, else the model dtype)",
    )
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--bs1-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", default="lmforge,hf,llamacpp", help="comma-separated: lmforge, hf, llamacpp")
    p.add_argument("--repeats", type=int, default=1, help="runs of every peer, interleaved")
    p.add_argument("--threads", type=int, default=0, help="threads of every peer (default 0: physical cores)")
    p.add_argument("--install-llama-cpp", action="store_true", help="build llama-cpp-python first (see above)")
    args = p.parse_args()
    if args.install_llama_cpp:
        install_llama_cpp()
    from lmforge.cpu_threads import configure_cpu_threads

    args.num_threads, _ = configure_cpu_threads(args.threads)
    peers = {"lmforge": bench_lmforge, "hf": bench_hf, "llamacpp": bench_llamacpp}
    unknown = [name for name in args.peers.split(",") if name not in peers]
    if unknown:
        p.error(f"unknown peer(s) {unknown}; choose from {sorted(peers)}")
    reqs = workload(args.requests, 49152, args.seed)
    rng = random.Random(args.seed + 1)
    bs1_ids = [rng.randint(10, 49151) for _ in range(128)]
    for repeat in range(args.repeats):
        args.repeat = repeat
        for peer in args.peers.split(","):
            log(f"running {peer} (repeat {repeat})")
            peers[peer](args, reqs, bs1_ids)


if __name__ == "__main__":
    main()
