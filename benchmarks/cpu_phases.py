"""cpu.py's 32-request lmforge run split into its phases: the wall time of each engine step, summed for the first
step (the prefill of every prompt at once) and for the rest (the decode steps), one JSON line. For A/B runs of two
trees, alternate `PYTHONPATH=A` and `PYTHONPATH=B` invocations (this machine's speed moves by phases).

    PYTHONPATH=. python benchmarks/cpu_phases.py [--requests 32] [--threads 0]
"""

from __future__ import annotations

from lmforge.cpu_threads import set_omp_wait_policy  # noqa: E402

set_omp_wait_policy()  # before torch loads, as cpu.py

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from common import device_name, emit, git_sha  # noqa: E402
from cpu import workload  # noqa: E402

from lmforge import GenerationConfig, PytorchEngineConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="default 0: physical cores")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from lmforge.cpu_threads import configure_cpu_threads
    from lmforge.engine.engine import Engine

    num_threads, _ = configure_cpu_threads(args.threads)
    torch.set_num_threads(num_threads)
    engine = Engine(None, PytorchEngineConfig(device_type="cpu", dtype="auto", cpu_threads=args.threads))
    engine.add_request(list(range(100, 228)), GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    while engine.has_unfinished():
        engine.step()
    reqs = workload(args.requests, 49152, args.seed)
    for ids, n in reqs:
        gen = GenerationConfig(max_new_tokens=n, ignore_eos=True, do_sample=True, temperature=0.6, top_p=1.0, top_k=0)
        engine.add_request(ids, gen)
    steps, out_tokens = [], 0
    start = time.perf_counter()
    while engine.has_unfinished():
        t0 = time.perf_counter()
        out_tokens += sum(len(o.token_ids) for o in engine.step())
        steps.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    emit(
        bench="cpu_phases",
        git=git_sha(),
        device=device_name("cpu"),
        threads=torch.get_num_threads(),
        requests=len(reqs),
        input_tokens=sum(len(i) for i, _ in reqs),
        output_tokens=out_tokens,
        wall_s=round(wall, 2),
        output_tok_s=round(out_tokens / wall, 2),
        first_step_s=round(steps[0], 2),
        other_steps_s=round(sum(steps[1:]), 2),
        steps=len(steps),
    )


if __name__ == "__main__":
    main()
