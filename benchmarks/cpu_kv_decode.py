"""The embedded model's decode step at --seqs sequences, a float32 vs a float16 KV cache, in one process: two engines
(dtype auto, kv_cache_dtype 'float32' and 'auto', which is float16 there), the same prompts run on each in turn for
--rounds rounds, so a swing of the machine hits both. A round's figure is the median time of its steps that decode
all sequences at once (after the first two, which record the step); one JSON line per cache with every round's.

    python benchmarks/cpu_kv_decode.py [--seqs 32] [--prompt-len 200] [--new-tokens 24] [--rounds 4] [--threads 2]
"""

from __future__ import annotations

from lmforge.cpu_threads import set_omp_wait_policy  # noqa: E402

set_omp_wait_policy()  # before torch loads, as the engine runs

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from common import device_name, emit, git_sha, log  # noqa: E402

from lmforge import GenerationConfig, PytorchEngineConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=200, help="prompt ids a sequence (+-10%%)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="an explicit count: the engine never drops to one thread")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from lmforge.engine.engine import Engine

    rng = random.Random(args.seed)
    lo, hi = int(args.prompt_len * 0.9), int(args.prompt_len * 1.1)
    prompts = [[rng.randint(10, 49151) for _ in range(rng.randint(lo, hi))] for _ in range(args.seqs)]
    engines = {}
    for kv in ("float32", "auto"):
        cfg = PytorchEngineConfig(device_type="cpu", dtype="auto", cpu_threads=args.threads, kv_cache_dtype=kv)
        engines[kv] = Engine(None, cfg)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    rounds: dict[str, list[float]] = {kv: [] for kv in engines}
    for r in range(args.rounds):
        for kv, engine in engines.items():
            for prompt in prompts:
                engine.add_request(prompt, gen)
            steps = []
            while engine.has_unfinished():
                t0 = time.perf_counter()
                outs = engine.step()
                elapsed = time.perf_counter() - t0
                if len(outs) == args.seqs and all(len(o.token_ids) == 1 for o in outs):
                    steps.append(elapsed)
            rounds[kv].append(statistics.median(steps[2:]))
            log(f"round {r} kv_cache_dtype={kv}: {len(steps)} decode steps, median {rounds[kv][-1] * 1e3:.1f} ms")
    f32 = statistics.median(rounds["float32"])
    for kv, engine in engines.items():
        med = statistics.median(rounds[kv])
        emit(
            bench="cpu_kv_decode",
            model="SmolLM2-135M-Instruct.Q4_1.gguf",
            dtype="auto",
            kv_cache_dtype=str(engine.cache.kv_caches[0][0].dtype).removeprefix("torch."),
            device=device_name("cpu"),
            threads=torch.get_num_threads(),
            git=git_sha(),
            seqs=args.seqs,
            prompt_len=f"{lo}-{hi}",
            new_tokens=args.new_tokens,
            round_step_ms=[round(t * 1e3, 1) for t in rounds[kv]],
            step_ms_median=round(med * 1e3, 1),
            speedup_vs_float32=round(f32 / med, 3),
        )


if __name__ == "__main__":
    main()
