"""Cold starts on a GPU: the Triton kernels of the start-up steps compiled side by side, before those steps run.

A llama start with an empty Triton cache compiles ~14 kernels and ~11 host-side launchers (C modules built with
the system compiler), one after another as the profile step, the CUDA graph captures and the warm-up burst first
launch them: 12-13 s of a 16 s start on the H200 machine. Triton itself can compile on an executor
(`AsyncCompileMode`), but a launch waits for its kernel, so a normal forward gains nothing from it. Here the
forwards of those steps (prefills of the warm-up's lengths, a mixed step, eager decode batches, the CUDA graph
captures' decode steps at their block-table width, the sampler's argmax) first run once with every Triton launch
of this thread turned into a compile-only "warmup": no kernel runs, the torch glue between them runs on
uninitialised activations, and the compiles queue on a thread pool, followed there by their launchers' builds.
When the pass ends every kernel is in its in-memory cache and Triton's disk cache; the real steps then only load
them. Anything the pass misses (or a shape it gets wrong) is compiled as before, on first launch. Only for one rank
and only when the memory profile is not cached (a start that compiled before skips it). `LMFORGE_PRECOMPILE=0`
turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from lmforge.messages import GenerationConfig

from .cache_engine import CacheEngine
from .model_runner import ModelRunner, ModelStep
from .scheduler import SchedulerOutput
from .sequence import Sequence

logger = logging.getLogger(__name__)
_local = threading.local()


def enabled() -> bool:
    return os.environ.get("LMFORGE_PRECOMPILE", "1") != "0"


def _patch_triton_run():
    """JITFunction.run with launches of a compile-only thread turned into warmups (once per process)."""
    import triton.runtime.jit as jit

    if getattr(jit.JITFunction, "_lmforge_compile_only", False):
        return
    original = jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return original(self, *args, grid=grid, warmup=warmup or getattr(_local, "active", False), **kwargs)

    jit.JITFunction.run = run
    jit.JITFunction._lmforge_compile_only = True


def _build_launchers(kernels: list, pool: ThreadPoolExecutor) -> int:
    """Build (into Triton's cache) the host-side launcher of each compiled kernel on the pool: a small C module that
    Triton otherwise compiles with the system C compiler, one after another, at each kernel's first launch (10 of
    them came after the pass in a llama cold start on the H200 machine). The first launch then loads it from the
    cache. Needs no CUDA context; a failed build is left to that launch. Returns how many were built."""
    from triton.runtime.driver import driver

    launcher = driver.active.launcher_cls
    futures = [pool.submit(launcher, k.src, k.metadata) for k in kernels]
    return sum(f.exception() is None for f in futures)


@contextlib.contextmanager
def compile_only(threads: int, counts: dict | None = None):
    """Inside, this thread's Triton launches only queue their kernel's compile on `threads` threads; on leaving,
    all compiles and their launchers' builds have finished (a failed one is left for its first real launch to
    raise). `counts`, when given, gets `kernels` (distinct compiles queued) and `launchers` (launchers built)."""
    from triton.runtime._async_compile import AsyncCompileMode

    _patch_triton_run()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="lmforge-compile")
    try:
        with AsyncCompileMode(pool, ignore_errors=True) as mode:
            _local.active = True
            try:
                yield
            finally:
                _local.active = False
        futures = getattr(mode, "future_kernels", {})
        built = [f.kernel for f in futures.values() if getattr(f, "kernel", None) is not None]
        launchers = _build_launchers(built, pool)
        if counts is not None:
            counts["kernels"], counts["launchers"] = len(futures), launchers
    finally:
        pool.shutdown(wait=True)


def _seq(i: int, length: int, computed: int, first_block: int, block_size: int) -> Sequence:
    seq = Sequence(-1 - i, f"precompile-{i}", [0] * length, length, GenerationConfig(max_new_tokens=1))
    seq.num_computed_tokens = computed
    seq.block_ids = list(range(first_block, first_block + (length + block_size - 1) // block_size))
    return seq


def _graph_steps(step: ModelStep, cache, block_size: int, device, batches: list[int], max_blocks: int) -> None:
    """The decode forwards of CudaGraphRunner's captures (engine/cuda_graph.py), uncaptured: a runner built without
    capturing runs the very forward each capture records (its static inputs, the lm_head where the graph holds it)."""
    from .cuda_graph import CudaGraphRunner

    runner = CudaGraphRunner(step, cache, block_size, device, max(batches), max_blocks, capture=False)
    for bs in batches:
        runner._forward(bs)


@torch.inference_mode()
def precompile_steps(
    step: ModelStep,
    block_size: int,
    model_config,
    dtype: torch.dtype,
    device: torch.device,
    prefill_lengths: list[int],
    decode_batches: list[int],
    graph_batches: list[int] = (),
    graph_max_blocks: int = 0,
    vocab_size: int = 0,
) -> float:
    """Compile (not run) the kernels of prefills of `prefill_lengths` tokens, one mixed step, eager decode steps
    of `decode_batches` sequences, the CUDA graph captures' decode steps (`graph_batches` rows of block tables
    `graph_max_blocks` wide, as CudaGraphRunner captures them: the table width and the split count it implies
    pick other kernel variants than short tables do) and the sampler's greedy kernel over `vocab_size` columns;
    seconds taken. Errors are logged and left to the real steps."""
    t0 = time.perf_counter()
    longest = max(prefill_lengths)
    num_blocks = max((longest + block_size - 1) // block_size + 1, max(decode_batches) + 1)
    steps: list[SchedulerOutput] = []
    for n in sorted(set(prefill_lengths)):
        steps.append(SchedulerOutput([_seq(0, n, 0, 0, block_size)], [n]))
    mixed = [_seq(0, 2, 1, 0, block_size), _seq(1, 17, 0, 1, block_size)]
    steps.append(SchedulerOutput(mixed, [1, 17]))
    for bs in sorted(set(decode_batches)):
        steps.append(SchedulerOutput([_seq(i, 2, 1, i, block_size) for i in range(bs)], [1] * bs))
    threads = max(2, min(16, (os.cpu_count() or 2)))
    counts = {"kernels": 0, "launchers": 0}
    try:
        cache = CacheEngine(model_config, num_blocks, block_size, dtype, device)
        runner = ModelRunner(step, cache.kv_caches, block_size, device)
        with compile_only(threads, counts):
            for sched in steps:
                sample_rows = list(range(len(sched.seqs)))
                runner.forward(sched, sample_rows)
            if graph_batches and graph_max_blocks > 0:
                _graph_steps(step, cache, block_size, device, sorted(set(graph_batches)), graph_max_blocks)
            if vocab_size > 0:
                from lmforge.backends import get_op

                for rows in (1, 2):  # the sampler's greedy pick (engine/sampler.py), over float32 logits
                    get_op("argmax_rows", device.type)(torch.empty(rows, vocab_size, device=device))
    except Exception as e:  # noqa: BLE001 - the real steps compile what is left and raise real errors
        logger.info("precompile pass stopped early (%s: %s); the rest compiles on first launch", type(e).__name__, e)
    finally:
        cache = runner = None
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    seconds = time.perf_counter() - t0
    logger.info(
        "compiled %d Triton kernels of the start-up steps (and %d launchers) on %d threads in %.2f s",
        counts["kernels"], counts["launchers"], threads, seconds,
    )  # fmt: skip
    return seconds
