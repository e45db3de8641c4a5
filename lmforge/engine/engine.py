"""Engine: the loop that owns all scheduling state. add_request / abort / step.

Each step: Scheduler.schedule -> executor.execute (the Workers' ModelRunner.forward) -> Sampler -> append
tokens, detokenize, check stop conditions -> free finished sequences. AsyncEngine runs this loop on a thread;
lmforge.engine.core runs it in a process of its own for the server.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import time
import uuid
from dataclasses import dataclass

import torch

from lmforge.config import SchedulerConfig
from lmforge.cpu_threads import CpuThreadGovernor, configure_cpu_threads
from lmforge.generation_defaults import load_generation_defaults
from lmforge.messages import GenerationConfig, PytorchEngineConfig
from lmforge.model_source import load_model_source, load_tokenizer

from .block_manager import BlockManager
from .cache_engine import check_kv_cache_format
from .detokenizer import Detokenizer
from .errors import RequestError
from .executor import make_executor
from .host_memory import bound_cpu_kernel_caches, release_free_host_memory
from .outputs import EngineStats, RequestOutput, TokenLogprob
from .requests import build_request_guide, validate_request, with_bad_word_ids
from .sampler import Sampler, SampleResult
from .scheduler import Scheduler, SchedulerOutput
from .sequence import PLACEHOLDER, Sequence
from .startup import (
    configure_triton_cache,
    in_daemon_thread,
    resolve_device_type,
    short_gil_switch,
    start_cuda_context,
    start_weight_prefetch,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Inflight:
    """A launched step whose sampled tokens are still on the device."""

    seqs: list[Sequence]
    sampled: list[Sequence]
    slots: list[int]  # index in each sampled sequence's token_ids of its placeholder
    token_ids: torch.Tensor | None  # on the device: the next step reads its placeholders from here
    result: SampleResult | None  # host copies (pinned) once `ready` has fired
    ready: torch.cuda.Event | None = None


class Engine:
    """Scheduling, sampling and request bookkeeping; the model runs in the Workers of one executor
    (engine/executor.py: one in-process Worker, tensor-parallel ranks as local processes, or Ray actors)."""

    def __init__(self, model_path: str | None = None, backend_config: PytorchEngineConfig | None = None):
        with short_gil_switch():
            self._start(model_path, backend_config or PytorchEngineConfig())

    def _start(self, model_path: str | None, cfg: PytorchEngineConfig) -> None:
        self.engine_config = cfg
        start = time.perf_counter()
        start_weight_prefetch(model_path)  # the disk reads overlap CUDA start and the model build
        device_type = resolve_device_type(cfg.device_type)
        self._thread_governor = None
        if device_type == "cpu":
            bound_cpu_kernel_caches()
            threads, chosen_here = configure_cpu_threads(cfg.cpu_threads)
            if chosen_here and threads > 1 and cfg.tp == 1:
                self._thread_governor = CpuThreadGovernor(threads)
        # compiled kernels persist between runs; set before the TP ranks start so that they share the folder
        self.triton_cache_dir, self.triton_cache_entries = (
            configure_triton_cache() if device_type == "cuda" else (None, 0)
        )
        if device_type == "cuda":
            cuda_start = start_cuda_context()
            importlib.import_module("lmforge.backends.cuda")  # Triton and the kernels, while CUDA starts
            cuda_start.join()
        # tensor parallelism: the other ranks start now and load their shards while this one loads its own
        self.executor = make_executor(model_path, cfg, device_type)
        try:
            self._build(model_path, cfg, device_type, start, time.perf_counter())
        except BaseException:
            self.executor.close(abort=True)
            raise

    def _build(
        self, model_path: str | None, cfg: PytorchEngineConfig, device_type: str, start: float, t_source: float
    ) -> None:
        executor = self.executor
        driver = executor.driver
        self.device = driver.device
        source = load_model_source(model_path, cfg.trust_remote_code, False, cfg.custom_module_map)
        self.source, self.model_config = source, source.model_config
        check_kv_cache_format(self.model_config, cfg.quant_policy, cfg.kv_cache_dtype)  # before the weights load
        # the tokenizer (and the transformers import it needs) loads on a thread while CUDA starts and the weights
        # go to the device; it is first needed by warm-up
        tokenizer_future = in_daemon_thread(
            "lmforge-tokenizer", load_tokenizer, source.path, source.model_config.eos_token_ids, cfg.trust_remote_code
        )
        t_model = time.perf_counter()
        # one GPU, no quantized layers: the weights load beside the memory profile step (Worker.load_model)
        quantized = getattr(source.hf_config, "quantization_config", None) is not None
        driver.load_model(source, background=device_type == "cuda" and cfg.tp == 1 and not quantized)
        self.dtype = driver.dtype
        t_weights = time.perf_counter()
        self.max_batch_size = cfg.max_batch_size or (256 if device_type == "cuda" else 64)
        num_blocks = executor.determine_num_blocks(self.max_batch_size)
        t_cache = time.perf_counter()
        executor.init_cache(num_blocks)
        max_pos = self.model_config.max_position_embeddings or 1 << 30
        capacity = num_blocks * cfg.block_size
        self.session_len = min(cfg.session_len or max_pos, capacity)
        if cfg.session_len and cfg.session_len > capacity:
            logger.warning(
                "session_len %d exceeds the KV cache (%d tokens); using %d", cfg.session_len, capacity, capacity
            )
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(self.max_batch_size, self.session_len, cfg.max_prefill_token_num), self.block_manager
        )
        if not cfg.eager_mode and (device_type == "cuda" or cfg.tp == 1):
            executor.capture_graphs(self.max_batch_size, -(-self.session_len // cfg.block_size))
        t_graphs = time.perf_counter()
        self.vocab_size = getattr(source.hf_config, "vocab_size", self.model_config.vocab_size)
        self.sampler = Sampler(self.vocab_size, self.device)
        # what a request that leaves sampling unset gets (lmforge.generation_defaults); the engine itself never
        # applies them: GenerationConfig has no "unset", so the callers that know do
        self.generation_defaults = load_generation_defaults(source.path, source.gguf_file)
        self._seq_counter = itertools.count()
        self._requests: dict[str, Sequence] = {}
        self.prompt_tokens_total = self.generation_tokens_total = 0
        # overlap host work with the device only where launches are asynchronous
        self.overlap = self.device.type == "cuda" and cfg.tp == 1
        self._inflight: _Inflight | None = None
        # where host time goes: schedule / launch (inputs, forward and sampling enqueued) / process (the
        # device sync and per-token work); read by benchmarks and metrics
        self.step_stats = dict.fromkeys(("steps", "decode_steps", "schedule_s", "launch_s", "process_s"), 0)
        t_tokenizer = time.perf_counter()
        self.tokenizer = source.tokenizer = tokenizer_future.result()
        t_warmup = time.perf_counter()
        # text and stop strings per request; an engine core leaves them to its front end (serve/core_client.py)
        self.detokenize = True
        if device_type == "cuda":
            self.warmup()
        self.load_seconds = time.perf_counter() - start
        # seconds per start-up phase, in order, summing to load_seconds: device and executor start, config, model
        # build, weights, memory profile, KV cache sizing + allocation, CUDA graphs, waiting for the tokenizer (it
        # loads on a thread from the config on), warm-up (with the runner and sampler set-up). Where the weights
        # load beside the profile step (one GPU), profile_s covers both and driver.load_times the load's own time
        times = driver.load_times
        build, profile = times.get("build_s", 0.0), times.get("profile_s", 0.0)
        self.load_breakdown = {
            k: round(v, 2)
            for k, v in (
                ("device_s", t_source - start),
                ("source_s", t_model - t_source),
                ("build_s", build),
                ("weights_s", t_weights - t_model - build),
                ("profile_s", profile),
                ("kv_cache_s", t_cache - t_weights - profile),
                ("graphs_s", t_graphs - t_cache),
                ("tokenizer_wait_s", t_warmup - t_tokenizer),
                ("warmup_s", start + self.load_seconds - t_warmup + t_tokenizer - t_graphs),
            )
        }
        logger.info(
            "engine ready in %.1f s: %s on %s (%s), KV cache %d blocks x %d tokens (%.2f GiB), session_len %d",
            self.load_seconds,
            source.name,
            self.device,
            str(self.dtype).replace("torch.", ""),
            num_blocks,
            cfg.block_size,
            driver.cache.nbytes / 2**30,
            self.session_len,
        )

    @property
    def eos_token_ids(self) -> list[int]:
        """The tokens that end a request unless it sets ignore_eos (the tokenizer's and the model config's)."""
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.model_config.eos_token_ids
        return list(dict.fromkeys(eos + self.model_config.eos_token_ids))

    @property
    def model(self):
        """The driver rank's model (rank 0's shard under tensor parallelism)."""
        return self.executor.driver.model

    @property
    def cache(self):
        """The driver rank's KV cache (rank 0's KV heads under tensor parallelism)."""
        return self.executor.driver.cache

    @property
    def graph_runner(self):
        """The driver rank's CUDA graphs, or None (CPU, eager mode)."""
        return self.executor.driver.graph_runner

    def warmup(self) -> None:
        """Run a small burst through the real loop at start: prefill chunks short and long (one a full
        max_prefill_token_num chunk), mixed steps (with a decode prefix) and decode steps, greedy and sampled rows,
        logprobs. Kernel compilation and library autotuning then happen here, not under the first real requests."""
        limit = self.session_len - 8
        chunk = self.engine_config.max_prefill_token_num + 50
        lengths = sorted({min(n, limit) for n in (1, 17, 100, 333, 1100, chunk)})
        # short requests first: they decode beside the prefills below, so mixed steps with a decode prefix (the
        # attention split of backends/cuda/attention.py) compile here too
        num_short = min(8, self.max_batch_size - len(lengths))
        for i in range(num_short):
            gen = GenerationConfig(max_new_tokens=len(lengths) + 4, ignore_eos=True, do_sample=bool(i % 2))
            self.add_request([(i + 5) % self.vocab_size] * 3, gen, request_id=f"warmup-short-{i}")
        for i, n in enumerate(lengths):
            gen = GenerationConfig(
                max_new_tokens=4,
                ignore_eos=True,
                do_sample=bool(i % 2),
                temperature=0.7,
                logprobs=2 if i == 2 else None,
            )
            self.add_request([(i + 3) % self.vocab_size] * n, gen, request_id=f"warmup-{i}")
            self.step()
        while self.has_unfinished():
            self.step()
        self.prompt_tokens_total = self.generation_tokens_total = 0
        self.step_stats = dict.fromkeys(self.step_stats, 0)
        self.block_manager.num_cache_hit_tokens = 0
        self.scheduler.num_preemptions = 0

    def close(self) -> None:
        """Stop the other ranks' workers, if any; a no-op otherwise. Steps need them, so an engine with tp > 1
        runs nothing after this."""
        self.executor.close()

    @property
    def model_name(self) -> str:
        return self.source.name

    # --- requests -----------------------------------------------------------------------------
    def validate_request(self, input_ids: list[int], gen_config: GenerationConfig) -> None:
        """Raise RequestError/ContextLengthError for a request that cannot run. Thread-safe (reads config only)."""
        validate_request(input_ids, gen_config, self.vocab_size, self.session_len)

    def add_request(
        self, input_ids: list[int], gen_config: GenerationConfig, request_id: str | None = None, guide=None
    ) -> str:
        self.validate_request(input_ids, gen_config)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        stop_ids = list(gen_config.stop_token_ids or [])
        if not gen_config.ignore_eos:
            stop_ids += [t for t in self.eos_token_ids if t not in stop_ids]
        if guide is None and gen_config.response_format is not None:
            guide = build_request_guide(self.tokenizer, self.vocab_size, gen_config.response_format)
        if gen_config.bad_words and self.tokenizer is not None:
            gen_config = with_bad_word_ids(gen_config, self.tokenizer)
        generator = None
        if gen_config.random_seed is not None and not gen_config.is_greedy:
            generator = torch.Generator(device=self.device).manual_seed(gen_config.random_seed)
        detok = None
        if self.tokenizer is not None and self.detokenize:
            detok = Detokenizer(
                self.tokenizer.hf, list(input_ids), gen_config.skip_special_tokens, gen_config.stop_words
            )
        seq = Sequence(
            next(self._seq_counter),
            request_id,
            list(input_ids),
            len(input_ids),
            gen_config,
            stop_ids=stop_ids,
            generator=generator,
            guide=guide,
            detokenizer=detok,
            sampling=self.sampler.row_info(gen_config, stop_ids),
        )
        self._requests[request_id] = seq
        self.prompt_tokens_total += len(input_ids)
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        return self._output(seq, [], "", None)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._inflight is not None

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            bm.num_free_blocks,
            bm.num_blocks,
            bm.usage(),
            self.prompt_tokens_total,
            self.generation_tokens_total,
            bm.num_cache_hit_tokens,
        )

    # --- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step, then return the outputs of the step before it (on CPU, where
        nothing overlaps, of this step).

        On CUDA the launch is asynchronous, so the host work of reading step N's tokens (the one
        device sync), detokenizing and checking stops overlaps the GPU running step N+1. Tokens
        sampled by a step in flight sit in token_ids as placeholders; the next step reads them
        from the device. A sequence that stops at step N has already been given a slot in step
        N+1; that extra token is dropped.
        """
        outputs = [
            self._finish(seq, "length") for seq in list(self.scheduler.waiting) if seq.gen_config.max_new_tokens == 0
        ]
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if self._inflight is not None and not self._can_overlap(sched):
            outputs += self._process(self._inflight)
            self._inflight = None
        t1 = time.perf_counter()
        launched = self._launch(sched, outputs)
        t2 = time.perf_counter()
        if self._inflight is not None:
            outputs += self._process(self._inflight)
        self._inflight = launched
        if launched is not None and not self.overlap:
            outputs += self._process(launched)
            self._inflight = None
        st = self.step_stats
        st["steps"] += 1
        st["decode_steps"] += bool(sched.seqs) and sched.is_decoding
        st["schedule_s"] += t1 - t0
        st["launch_s"] += t2 - t1
        st["process_s"] += time.perf_counter() - t2
        if self._thread_governor is not None and launched is not None:
            self._thread_governor.after_step()
        if self.device.type == "cpu" and (st["steps"] % 256 == 0 or not self.has_unfinished()):
            release_free_host_memory()  # keeps a long-running CPU server's resident memory flat
        return outputs

    def _can_overlap(self, sched: SchedulerOutput) -> bool:
        # penalties and grammars read the previous token on the host before this step's sampling
        return self.overlap and not any(s.guide is not None or s.sampling.penalised for s in sched.seqs)

    def _launch(self, sched: SchedulerOutput, outputs: list[RequestOutput]) -> _Inflight | None:
        keep = [i for i, s in enumerate(sched.seqs) if not s.is_finished]  # stopped while the schedule was made
        if len(keep) != len(sched.seqs):
            sched.seqs = [sched.seqs[i] for i in keep]
            sched.num_tokens = [sched.num_tokens[i] for i in keep]
        if sched.is_empty:
            return None
        # a sequence samples only when this step computes all of its known tokens; the placeholders this step
        # feeds (the previous step's tokens, still on the device) are those of sampling rows
        seqs, nums = sched.seqs, sched.num_tokens
        sample_rows, sampled, dst, src = [], [], [], []
        feeding = self._inflight is not None
        offset = 0
        for i, (s, n) in enumerate(zip(seqs, nums, strict=True)):
            offset += n
            if s.num_computed_tokens + n == len(s.token_ids):
                sample_rows.append(i)
                sampled.append(s)
                if feeding and s.inflight_row is not None:
                    dst.append(offset - 1)
                    src.append(s.inflight_row)
        patch = (dst, src, self._inflight.token_ids) if dst else None
        try:
            logits = self.executor.execute(sched, sample_rows, patch)
            token_ids = None
            result = None
            if sampled:
                result = self.sampler(logits, sampled)
                token_ids = result.token_ids
        except Exception as e:  # keep serving: fail this batch's requests, free their blocks
            logger.exception("step failed; failing %d requests", len(sched.seqs))
            for seq in sched.seqs:
                seq.error = f"{type(e).__name__}: {e}"
                outputs.append(self._finish(seq, "error"))
            return None
        slots = []
        for seq, n in zip(seqs, nums, strict=True):
            seq.num_computed_tokens += n
        session_len = self.session_len
        for row, seq in enumerate(sampled):
            tokens = seq.token_ids
            tokens.append(PLACEHOLDER)
            seq.inflight_row = row
            num = len(tokens)
            slots.append(num - 1)
            # no further step for a sequence whose length limit this token reaches
            seq.is_draining = num - seq.num_prompt_tokens >= seq.gen_config.max_new_tokens or num >= session_len
        ready = None
        if result is not None and self.device.type == "cuda":
            # copy the results out now, queued right behind this step: reading them later waits for this
            # step only, not for the next one, which is launched before they are read
            result = SampleResult(
                *(
                    None if t is None else _to_host(t)
                    for t in (result.token_ids, result.logprobs, result.top_ids, result.top_logprobs)
                )
            )
            ready = torch.cuda.Event()
            ready.record()
        return _Inflight(sched.seqs, sampled, slots, token_ids, result, ready)

    def _process(self, step: _Inflight) -> list[RequestOutput]:
        """Read a launched step's tokens (the device sync) and turn them into outputs."""
        outputs: list[RequestOutput] = []
        if step.sampled:
            if step.ready is not None:
                step.ready.synchronize()
            r = step.result
            token_ids = r.token_ids.tolist()
            logprobs = r.logprobs.tolist() if r.logprobs is not None else None
            top_ids = r.top_ids.tolist() if r.top_ids is not None else None
            top_lps = r.top_logprobs.tolist() if r.top_logprobs is not None else None
            now = time.monotonic()
            for j, (seq, slot) in enumerate(zip(step.sampled, step.slots, strict=True)):
                seq.token_ids[slot] = token_ids[j]
                if seq.inflight_row == j and seq.token_ids[-1] != PLACEHOLDER:
                    seq.inflight_row = None
                if seq.is_finished:  # stopped or aborted after this step was launched: drop the token
                    continue
                lp = None
                if logprobs is not None and seq.gen_config.logprobs is not None:
                    k = seq.gen_config.logprobs
                    top = list(zip(top_ids[j][:k], top_lps[j][:k], strict=True)) if top_ids is not None and k else []
                    lp = TokenLogprob(token_ids[j], logprobs[j], top)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                outputs.append(self._accept_token(seq, token_ids[j], lp, slot))
        if self.block_manager.enable_prefix_caching:
            for seq in step.seqs:
                if not seq.is_finished:
                    self.block_manager.register_full_blocks(seq)
        return outputs

    def _accept_token(self, seq: Sequence, token: int, lp: TokenLogprob | None, slot: int) -> RequestOutput:
        self.generation_tokens_total += 1
        cfg = seq.gen_config
        if seq.guide is not None:
            try:
                seq.guide.accept(token)
            except Exception as e:  # a grammar error fails this request only
                seq.error = f"guided decoding failed: {e}"
                return self._finish(seq, "error")
        finish, text, hit_stop_string = None, "", False
        num_new = slot - seq.num_prompt_tokens + 1  # a later step's placeholder may already follow this token
        if token in seq.stop_ids and num_new > cfg.min_new_tokens:
            finish = "stop"  # the stop token itself is returned in token_ids, never in text
        elif seq.detokenizer is not None:
            text, hit_stop_string = seq.detokenizer.step([token])
            finish = "stop" if hit_stop_string else None
        if finish is None:
            if num_new >= cfg.max_new_tokens or seq.num_prompt_tokens + num_new >= self.session_len:
                finish = "length"
            elif seq.guide is not None and seq.guide.is_terminated():
                finish = "stop"
        if finish is not None:
            if seq.detokenizer is not None and not hit_stop_string:
                text += seq.detokenizer.flush()  # release text held back as a possible stop-string prefix
            self._requests.pop(seq.request_id, None)
            self.scheduler.finish(seq)
            seq.finish_reason = finish
        return self._output(seq, [token], text, [lp] if lp is not None else None, num_new)

    def _finish(self, seq: Sequence, reason: str) -> RequestOutput:
        self._requests.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        return self._output(seq, [], "", None)

    def _output(
        self, seq: Sequence, token_ids: list[int], text: str, logprobs, num_new: int | None = None
    ) -> RequestOutput:
        num_new = seq.num_new_tokens - seq.token_ids.count(PLACEHOLDER) if num_new is None else num_new
        return RequestOutput(
            seq.request_id, text, token_ids, logprobs, seq.finish_reason, seq.num_prompt_tokens, num_new, seq.error
        )


def _to_host(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)
