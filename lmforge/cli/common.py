"""Arguments shared by the subcommands: engine settings and sampling settings."""

from __future__ import annotations

import argparse
import logging
import time

from lmforge.messages import KV_CACHE_DTYPES, GenerationConfig, PytorchEngineConfig


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in --help, unless its help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action.help = "default: %(default)s"  # argparse would skip an option without help text
        return super()._format_action(action)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when a GPU is present")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float16", "bfloat16", "float32"],
        help="auto: on GPUs the checkpoint's float16/bfloat16 (else bfloat16); on CPUs bf16 where native, else fp32, "
        "with a GGUF's Q4/Q5/Q8 layers kept packed as int4 (an explicit dtype dequantizes them)",
    )
    g.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor parallelism: ranks (GPUs, or CPU worker processes) the model is split over (default: 1)",
    )
    g.add_argument(
        "--distributed-executor-backend",
        choices=["mp", "ray"],
        default=None,
        help="where tensor-parallel ranks 1..tp-1 run: local processes (mp, the default) or Ray actors on the Ray "
        "cluster this machine belongs to (ray; start it with `ray start --head`)",
    )
    g.add_argument(
        "--session-len", type=int, default=None, help="max tokens per sequence, prompt + output (default: the model's)"
    )
    g.add_argument(
        "--max-batch-size", type=int, default=None, help="sequences per step (default: 256 on GPUs, 64 on CPUs)"
    )
    g.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="CPU engine threads (default 0: OMP_NUM_THREADS if set, else one per physical core)",
    )
    g.add_argument("--block-size", type=int, default=64, help="tokens per KV cache block")
    g.add_argument(
        "--num-cpu-blocks",
        type=int,
        default=0,
        help="KV blocks on CPU (0: a quarter of free memory, at most 4 GiB; committed as blocks are first used)",
    )
    g.add_argument(
        "--cache-max-entry-count", type=float, default=0.8, help="fraction of free GPU memory given to the KV cache"
    )
    g.add_argument("--max-prefill-token-num", type=int, default=8192, help="prefill token budget per step")
    g.add_argument("--enable-prefix-caching", action="store_true")
    g.add_argument(
        "--quant-policy",
        type=int,
        choices=[0, 4, 8],
        default=0,
        help="KV cache quantization: 8 int8, 4 int4 (a scale and zero point per token and head), 0 off",
    )
    g.add_argument(
        "--kv-cache-dtype",
        choices=list(KV_CACHE_DTYPES),
        default="auto",
        help="KV cache storage: auto (the model dtype; on CPU under --dtype auto, float16), fp8 (float8 e4m3, "
        "scale 1.0: 2x the tokens of bf16), float16 or float32 (on CUDA: only the model dtype)",
    )
    g.add_argument("--eager-mode", action="store_true", help="no CUDA graphs (on CPU: no recorded decode steps)")
    g.add_argument("--custom-module-map", default=None, help="a Python file defining MODULE_MAP for your own models")
    g.add_argument(
        "--stats",
        action="store_true",
        help="print speed figures: tokens/s of each reply (chat, generate) or every 10 s (serve), on stderr",
    )
    g.add_argument(
        "--skip-weight-checks",
        action="store_true",
        help="load a checkpoint even if tensors hold NaN/Inf or match no parameter (they are only logged)",
    )
    g.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


# what a sampling option is when neither the command line nor the model's generation defaults set it
SAMPLING_FALLBACKS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    g = p.add_argument_group("sampling (unset: the model's generation_config.json, else the value shown)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (else: 0)")
    g.add_argument("--top-p", type=float, default=None, help="(else: 1.0, off)")
    g.add_argument("--top-k", type=int, default=None, help="(else: 0, off)")
    g.add_argument("--min-p", type=float, default=None, help="(else: 0.0, off)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="(else: 1.0, off)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: none, a new draw each run)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def engine_config(args: argparse.Namespace) -> PytorchEngineConfig:
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return PytorchEngineConfig(
        dtype=args.dtype,
        device_type=args.device,
        tp=args.tp,
        distributed_executor_backend=args.distributed_executor_backend,
        cpu_threads=args.cpu_threads,
        session_len=args.session_len,
        max_batch_size=args.max_batch_size,
        block_size=args.block_size,
        num_cpu_blocks=args.num_cpu_blocks,
        cache_max_entry_count=args.cache_max_entry_count,
        max_prefill_token_num=args.max_prefill_token_num,
        enable_prefix_caching=args.enable_prefix_caching,
        quant_policy=args.quant_policy,
        kv_cache_dtype=args.kv_cache_dtype,
        eager_mode=args.eager_mode,
        custom_module_map=args.custom_module_map,
        check_weights=not args.skip_weight_checks,
    )


def sampling_settings(args: argparse.Namespace, model_defaults: dict | None = None) -> dict:
    """Each sampling option: the command line's, else the model's default, else SAMPLING_FALLBACKS'."""
    model_defaults = model_defaults or {}
    return {
        name: getattr(args, name) if getattr(args, name) is not None else model_defaults.get(name, fallback)
        for name, fallback in SAMPLING_FALLBACKS.items()
    }


class SpeedStats:
    """Times one streamed reply: `tick(delta)` on every delta, then `line()` says prompt tokens, generated tokens,
    time to the first token and the decode rate (tokens after the first over the time after the first)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = self.last = None
        self.prompt_tokens = self.generated = 0

    def tick(self, delta) -> None:
        now = time.perf_counter()
        if self.first is None and delta.generate_token_len:
            self.first = now
        self.last = now
        self.prompt_tokens = delta.input_token_len
        self.generated = max(self.generated, delta.generate_token_len)

    def line(self) -> str:
        if self.first is None:
            return "[stats] no tokens generated"
        total = self.last - self.start
        decode = self.last - self.first
        rate = f"{(self.generated - 1) / decode:.1f} tok/s decode" if self.generated > 1 and decode > 0 else "-"
        return (
            f"[stats] prompt {self.prompt_tokens} tokens, {self.generated} generated in {total:.2f} s: "
            f"first token {self.first - self.start:.3f} s, {rate}, {self.generated / total:.1f} tok/s overall"
        )


def generation_config(args: argparse.Namespace, model_defaults: dict | None = None) -> GenerationConfig:
    s = sampling_settings(args, model_defaults)
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=s["temperature"] > 0,
        temperature=s["temperature"] if s["temperature"] > 0 else 1.0,
        top_p=s["top_p"],
        top_k=s["top_k"],
        min_p=s["min_p"],
        repetition_penalty=s["repetition_penalty"],
        random_seed=args.seed,
        stop_words=args.stop,
    )
