"""Worker: everything one rank does. Build the model under the build context and load its weights (with the
weights' post-load processing), profile activation memory, size and allocate the KV cache, capture CUDA graphs,
and run steps.

Rank 0 (the "driver", in the Engine's process) gets steps from the Engine through `execute`; with tensor
parallelism it broadcasts each command to the other ranks over its tp.Channel, and those ranks (Workers in
processes of their own, started by an executor) act on it in `serve`. A single rank has no channel.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from lmforge.config import CacheConfig
from lmforge.messages import PytorchEngineConfig
from lmforge.model_inputs import StepContextManager
from lmforge.model_source import ModelSource, load_model_source

from . import cache_engine as ce
from . import precompile, tp
from .model_loader import build_model, load_model_weights
from .model_runner import ModelRunner, ModelStep
from .profile import peak_step_memory, profile_num_tokens
from .profile_cache import load_profile, profile_key, store_profile
from .scheduler import SchedulerOutput
from .startup import in_daemon_thread, resolve_dtypes

logger = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        model_path: str | None,
        cfg: PytorchEngineConfig,
        device: torch.device,
        rank: int = 0,
        channel: tp.Channel | None = None,
    ):
        self.model_path, self.cfg, self.device, self.rank, self.channel = model_path, cfg, device, rank, channel
        self.world_size = channel.world if channel is not None else 1
        self.cache: ce.CacheEngine | None = None
        self.graph_runner = None
        self.runner: ModelRunner | None = None
        self.load_times: dict[str, float] = {}  # seconds of this rank's start-up steps (engine.load_breakdown)
        self.profile_cached = False  # the memory profile came from lmforge's cache (engine.profile_cache)
        self._weights = None  # a Future: the weight load on a thread (load_model(background=True))

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def _tell(self, cmd: int, *args: int) -> None:
        """The driver: have the other ranks do what it is about to do."""
        if self.channel is not None and self.is_driver:
            self.channel.send(cmd, *args)

    # --- start-up -------------------------------------------------------------------------------
    def load_model(self, source: ModelSource | None = None, background: bool = False) -> None:
        """Build this rank's shard of the model under the build context and load its weights (model_loader runs
        the layers' post-load weight processing). `background` (one GPU rank, a checkpoint without quantized
        layers): the weights load on a thread while the first profile step compiles its kernels (on whatever the
        parameters hold then: the kernels do not depend on the values); `wait_weights` joins it."""
        cfg = self.cfg
        if source is None:
            source = load_model_source(self.model_path, cfg.trust_remote_code, False, cfg.custom_module_map)
        self.source, self.model_config = source, source.model_config
        self.dtype, self.kv_cache_dtype = resolve_dtypes(
            cfg.dtype, source.hf_config, self.device.type, cfg.kv_cache_dtype, cfg.quant_policy
        )
        self.model_config.dtype = self.dtype
        self.ctx_mgr = StepContextManager()
        self.model = build_model(
            source,
            self.dtype,
            self.device,
            self.ctx_mgr,
            cfg.custom_module_map,
            self.rank,
            self.world_size,
            check_weights=cfg.check_weights,
            pack_gguf=cfg.dtype == "auto",  # an explicit dtype gets the dequantized reference weights
            times=self.load_times,
            load=not background,  # background: CUDA only, where GGUF is never packed (no plan to pass)
        )
        self.step = ModelStep(self.model, self.ctx_mgr)
        if background:
            self._weights = in_daemon_thread("lmforge-weights-load", self._load_weights_on_thread, source)
        elif self.is_driver:
            t = self.load_times
            logger.info("model built in %.2f s, weights loaded in %.2f s", t["build_s"], t["weights_s"])

    def _load_weights_on_thread(self, source: ModelSource) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the thread's own CUDA device (events, streams)
        t0 = time.perf_counter()
        load_model_weights(self.model, source, self.dtype, self.device, self.cfg.check_weights)
        self.load_times["weights_s"] = time.perf_counter() - t0
        logger.info("weights loaded in %.2f s (beside the profile step)", self.load_times["weights_s"])

    def wait_weights(self) -> None:
        """Join the background weight load, if any (its errors are raised here)."""
        if self._weights is not None:
            thread, self._weights = self._weights, None
            thread.result()

    def profile_peak_memory(self, max_batch_size: int) -> int:
        """Bytes the largest step needs beyond the weights (activations + logits of a full batch); with tensor
        parallelism, the largest over the ranks (each runs the same step on its shard)."""
        num_tokens = profile_num_tokens(self.cfg.max_prefill_token_num, self.model_config)
        if self.channel is None:  # one rank: a profile measured before on this very step is reused
            peak = self._cached_peak(num_tokens, max_batch_size)
        else:
            self._tell(tp.PROFILE, num_tokens)
            peak = peak_step_memory(
                self.step, self.model_config, self.cfg.block_size, self.dtype, self.device, num_tokens, self.channel
            )
        if self.is_driver:  # the sampler holds a few [batch, vocab] float32 tensors at once
            peak += 4 * max(1, min(max_batch_size, 256)) * self.model_config.vocab_size * 4
        if self.channel is not None:
            peak = self.channel.reduce_int(peak, dist.ReduceOp.MAX)
        if self.is_driver:
            logger.info("profile: a %d-token step needs %.2f GiB of activations", num_tokens, peak / 2**30)
        return int(peak)

    def _cached_peak(self, num_tokens: int, max_batch_size: int) -> int:
        """The profile step's peak from lmforge's cache (engine.profile_cache), else measured and stored. A cached
        profile also reserves what the measured step took outside torch's allocator: this start has not loaded
        those kernels and libraries yet, so the free memory it sees still counts them."""
        key = profile_key(self.source.hf_config, self.dtype, self.device, num_tokens, self.cfg.block_size)
        cached = load_profile(key)
        if cached is not None:
            self.profile_cached = True
            logger.info("profile: reused the measured peak of this step (%s)", key)
            return cached[0] + cached[1]
        if self.device.type == "cuda" and precompile.enabled():  # a cold start: compile the start's kernels at once
            lengths = [n for n in (1, 17, 100, 333, 1100) if n < num_tokens] + [num_tokens]
            batches = sorted({b for b in (1, 2, 16, max_batch_size) if 0 < b <= max(1, max_batch_size)})
            graph_batches, graph_blocks = [], 0
            if not self.cfg.eager_mode:  # the captures' table width, if the cache holds a whole session (typical)
                from .cuda_graph import batch_buckets

                max_pos = self.model_config.max_position_embeddings or 1 << 30
                graph_batches = batch_buckets(max_batch_size)
                graph_blocks = -(-(self.cfg.session_len or max_pos) // self.cfg.block_size)
            self.load_times["precompile_s"] = precompile.precompile_steps(
                self.step, self.cfg.block_size, self.model_config, self.dtype, self.device, lengths, batches,
                graph_batches, graph_blocks, self.model_config.vocab_size,
            )  # fmt: skip
        if self._weights is not None:
            # the weights are still loading: a first run compiles the step's kernels beside the load; the measured
            # run follows the load, since the load's own allocations would blur the step's peak
            peak_step_memory(self.step, self.model_config, self.cfg.block_size, self.dtype, self.device, num_tokens)
            self.wait_weights()
        outside: dict = {}
        peak = peak_step_memory(
            self.step, self.model_config, self.cfg.block_size, self.dtype, self.device, num_tokens, outside=outside
        )
        store_profile(key, peak, outside["bytes"])
        return peak

    def determine_num_blocks(self, max_batch_size: int) -> int:
        """KV blocks every rank can hold: on CPU from the host budget, on GPU from each rank's free memory after
        the profile step (the smallest count over the ranks)."""
        if self.device.type == "cpu":
            return ce.num_cpu_blocks(self.model_config, self._cache_config(), self.dtype)
        t0 = time.perf_counter()
        try:
            reserved = self.profile_peak_memory(max_batch_size)
        except BaseException:
            if self._weights is not None:  # let the load finish (its own error, if any, is secondary)
                self._weights.exception()
                self._weights = None
            raise
        self.wait_weights()  # before the free memory is read: the load's temporaries are gone by then
        self.load_times["profile_s"] = time.perf_counter() - t0
        self._tell(tp.SIZE, reserved)
        return self._gpu_blocks(reserved)

    def _cache_config(self) -> CacheConfig:
        cfg = self.cfg
        return CacheConfig(
            block_size=cfg.block_size,
            num_gpu_blocks=cfg.num_gpu_blocks,
            num_cpu_blocks=cfg.num_cpu_blocks,
            cache_max_entry_count=cfg.cache_max_entry_count,
            enable_prefix_caching=cfg.enable_prefix_caching,
            quant_policy=cfg.quant_policy,
            kv_cache_dtype=self.kv_cache_dtype,
        )

    def _gpu_blocks(self, reserved: int) -> int:
        blocks = ce.num_gpu_blocks(
            self.model_config, self._cache_config(), self.dtype, self.device, reserved, tp_size=self.world_size
        )
        if self.channel is not None:
            blocks = self.channel.reduce_int(blocks, dist.ReduceOp.MIN)
        return blocks

    def init_cache(self, num_blocks: int) -> None:
        self._tell(tp.ALLOC, num_blocks)
        cfg = self.cfg
        self.cache = ce.CacheEngine(
            self.model_config,
            num_blocks,
            cfg.block_size,
            self.dtype,
            self.device,
            tp_size=self.world_size,
            quant_policy=cfg.quant_policy,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        self._make_runner()

    def capture_graphs(self, max_batch_size: int, max_blocks: int) -> None:
        """CUDA graphs for decode batches up to max_batch_size sequences of up to max_blocks blocks each; every
        rank captures the same buckets, so a graph's collectives meet the other ranks' graphs. On the CPU (one
        rank), recorded kernel calls instead (engine/cpu_graph.py)."""
        self._tell(tp.GRAPHS, max_batch_size, max_blocks)
        if self.device.type == "cpu" and self.channel is None:  # recorded kernel calls, per batch size as it comes
            from .cpu_graph import CpuGraphRunner

            self.graph_runner = CpuGraphRunner(self.step, self.cache, self.cfg.block_size, max_batch_size, max_blocks)
            self._make_runner()
            return
        from .cuda_graph import CudaGraphRunner

        graphs = CudaGraphRunner(self.step, self.cache, self.cfg.block_size, self.device, max_batch_size, max_blocks)
        if self.channel is not None:  # every rank keeps the buckets that all ranks captured
            graphs.keep_largest(self.channel.reduce_int(len(graphs.graphs) if graphs.enabled else 0, dist.ReduceOp.MIN))
        self.graph_runner = graphs
        self._make_runner()

    def _make_runner(self) -> None:
        self.runner = ModelRunner(
            self.step, self.cache.kv_caches, self.cfg.block_size, self.device, self.graph_runner, self.channel
        )

    # --- steps ----------------------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput, sample_rows: list[int], patch=None) -> torch.Tensor | None:
        """The driver: run one step on every rank; float32 logits of the sampled rows (see ModelRunner.forward)."""
        return self.runner.forward(sched, sample_rows, patch)

    @torch.inference_mode()
    def serve(self) -> None:
        """Ranks > 0: act on the driver's commands until STOP."""
        channel = self.channel
        while True:
            cmd, *args = channel.recv()
            if cmd == tp.STOP:
                return
            if cmd == tp.STEP:
                self.runner.follow(args)
            elif cmd == tp.PROFILE:
                self.profile_peak_memory(0)
            elif cmd == tp.SIZE:
                self._gpu_blocks(args[0])
            elif cmd == tp.ALLOC:
                self.init_cache(args[0])
            elif cmd == tp.GRAPHS:
                self.capture_graphs(args[0], args[1])
            else:
                raise RuntimeError(f"tensor-parallel rank {self.rank}: unknown command {cmd}")


def run_worker(
    rank: int, world: int, init_method: str, device_type: str, model_path, cfg, device_index: int | None = None
) -> None:
    """A rank > 0 in a process of its own (a local process or a Ray actor): join the group, load the shard, then
    serve the driver's commands until STOP. `device_index`: the GPU to use (default: the rank's).

    Ctrl-C and SIGTERM reach the whole process group; only rank 0 acts on them (it finishes or aborts its
    requests, then sends STOP), since a rank that left mid-step would stall the other ranks' collectives."""

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if device_type == "cpu":
        from .host_memory import bound_cpu_kernel_caches

        bound_cpu_kernel_caches()
        torch.set_num_threads(tp.cpu_threads_per_rank(world))
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", rank if device_index is None else device_index)
        torch.cuda.set_device(device)
    tp.init_group(device_type, init_method, rank, world)
    try:
        worker = Worker(model_path, cfg, device, rank, tp.Channel(device))
        try:
            worker.load_model()
        except (ValueError, NotImplementedError, OSError):
            # a model this split cannot build (e.g. 9 heads over tp=2): rank 0 builds the same one and reports the
            # same error in one clear line; a second copy from here, as a traceback, would only bury it
            sys.exit(1)
        worker.serve()
    finally:
        dist.destroy_process_group()
