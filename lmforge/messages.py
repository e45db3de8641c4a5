"""Public dataclasses: GenerationConfig, PytorchEngineConfig, Response.

Field names follow lmdeploy's so its users feel at home. Every user-supplied value is
validated here with a ValueError that says what to fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort", "error"]


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass(slots=True)
class GenerationConfig:
    """Sampling and stopping parameters of one request. `top_k=1` is greedy whatever else is set."""

    n: int = 1
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    random_seed: int | None = None
    stop_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    response_format: dict | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI's)

    def __post_init__(self) -> None:
        for name in ("stop_words", "bad_words"):  # one string is one word, as OpenAI's `stop` takes it
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        self.validate()

    def validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _check(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
            f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}",
        )
        _check(
            isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens,
            f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}",
        )
        _check(0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        _check(
            0.01 <= self.repetition_penalty <= 100.0,
            f"repetition_penalty must be in [0.01, 100] (1 = off), got {self.repetition_penalty}",
        )
        _check(
            -2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"
        )
        _check(
            -2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
        )
        _check(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
            f"logprobs must be an integer in [0, 20] or None, got {self.logprobs!r}",
        )
        _check(
            self.random_seed is None or isinstance(self.random_seed, int),
            f"random_seed must be an integer or None, got {self.random_seed!r}",
        )
        for name in ("stop_words", "bad_words"):
            words = getattr(self, name)
            _check(
                words is None or (isinstance(words, (list, tuple)) and all(isinstance(w, str) and w for w in words)),
                f"{name} must be a list of non-empty strings",
            )
        _check(
            self.logit_bias is None
            or (
                isinstance(self.logit_bias, dict)
                and all(
                    isinstance(t, int) and t >= 0 and isinstance(b, (int, float)) and -100.0 <= b <= 100.0
                    for t, b in self.logit_bias.items()
                )
            ),
            "logit_bias must map token ids (integers >= 0) to biases in [-100, 100]",
        )
        for name in ("stop_token_ids", "bad_token_ids"):
            ids = getattr(self, name)
            _check(
                ids is None or all(isinstance(i, int) and i >= 0 for i in ids),
                f"{name} must be a list of non-negative integers",
            )

    @property
    def is_greedy(self) -> bool:
        # a temperature this small makes logits / temperature overflow; it means greedy anyway
        return self.top_k == 1 or not self.do_sample or self.temperature < 1e-5


# PytorchEngineConfig.kv_cache_dtype's values (lmforge.engine.cache_engine maps them to torch dtypes)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "float16", "fp16", "float32", "fp32")


@dataclass(slots=True)
class PytorchEngineConfig:
    """Engine settings. `device_type=None` picks 'cuda' when a GPU is present, else 'cpu'. dtype 'auto' is the
    checkpoint's float16/bfloat16 (else bfloat16) on CUDA; on CPU bfloat16 where the CPU computes it natively
    (AVX512-BF16 or AMX), float32 otherwise; on CPU 'auto' also keeps a GGUF file's Q4_0/Q4_1/Q4_K/Q5_0/Q5_1/Q5_K/Q8_0
    linear layers packed as int4 (an explicit dtype dequantizes every GGUF weight to it). `tp` > 1 splits the model
    over that many ranks, one worker process each (GPUs 0..tp-1 over NCCL; on CPU, processes over gloo); decode
    steps replay CUDA graphs on every rank.
    `distributed_executor_backend`: where ranks 1..tp-1 run, local processes (None or 'mp') or Ray actors
    ('ray', on the Ray cluster this process joins).
    `cpu_threads` is a CPU engine's torch thread count (0: OMP_NUM_THREADS if set, else one per physical core).

    KV cache format: `quant_policy` 8 / 4 stores keys and values as int8 / int4 with a scale and zero point per
    token and head (lmdeploy's meaning; about 1.9x / 3.6x the tokens of a bf16 cache at head_dim 128);
    `kv_cache_dtype='fp8'` stores them as float8 e4m3 (scale 1.0, values clamped to +-448; 2x the tokens);
    'float16' / 'float32' name the cache's float dtype (on CUDA only the model dtype itself). 'auto' is the model
    dtype, except on CPU under dtype 'auto' with float32 compute where lmforge's CPU attention kernel runs: a float16
    cache (llama.cpp's default; it halves the bytes the memory-bound CPU attention reads; values clamped to +-65504),
    which 'float32' turns off."""

    dtype: str = "auto"
    device_type: str | None = None
    tp: int = 1
    cpu_threads: int = 0
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float = 0.8
    block_size: int = 64
    num_gpu_blocks: int = 0
    num_cpu_blocks: int = 0
    max_prefill_token_num: int = 8192
    enable_prefix_caching: bool = False
    eager_mode: bool = False
    custom_module_map: str | None = None
    quant_policy: int = 0
    kv_cache_dtype: str = "auto"
    distributed_executor_backend: str | None = None
    trust_remote_code: bool = False
    download_dir: str | None = None
    revision: str | None = None
    check_weights: bool = True  # NaN/Inf or unused checkpoint tensors fail the load (False: only logged)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            self.dtype in ("auto", "float16", "bfloat16", "float32"),
            f"dtype must be one of 'auto', 'float16', 'bfloat16', 'float32', got {self.dtype!r}",
        )
        _check(
            self.device_type in (None, "cpu", "cuda"), f"device_type must be 'cpu' or 'cuda', got {self.device_type!r}"
        )
        _check(
            isinstance(self.cpu_threads, int) and self.cpu_threads >= 0,
            f"cpu_threads must be an integer >= 0 (0: one per physical core), got {self.cpu_threads!r}",
        )
        _check(isinstance(self.tp, int) and self.tp >= 1, f"tp must be an integer >= 1, got {self.tp!r}")
        _check(
            self.quant_policy in (0, 4, 8),
            f"quant_policy must be 0 (off), 4 (int4 KV cache) or 8 (int8 KV cache), got {self.quant_policy!r}",
        )
        _check(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            f"kv_cache_dtype must be 'auto' (the model dtype), 'fp8' (e4m3), 'float16' or 'float32', got "
            f"{self.kv_cache_dtype!r}",
        )
        _check(
            not (self.quant_policy and self.kv_cache_dtype != "auto"),
            f"quant_policy and kv_cache_dtype={self.kv_cache_dtype!r} are two KV cache formats: choose one",
        )
        _check(
            self.distributed_executor_backend in (None, "mp", "ray"),
            "distributed_executor_backend must be None/'mp' (tensor-parallel ranks as local processes) or 'ray' "
            f"(ranks as Ray actors), got {self.distributed_executor_backend!r}",
        )
        for name in ("download_dir", "revision"):
            _check(getattr(self, name) is None, f"{name} is not used: lmforge never downloads; pass a local model path")
        _check(0.0 < self.cache_max_entry_count <= 1.0, "cache_max_entry_count must be in (0, 1]")
        _check(
            self.block_size >= 1 and (self.block_size & (self.block_size - 1)) == 0,
            f"block_size must be a power of two, got {self.block_size}",
        )
        _check(self.max_prefill_token_num >= 1, "max_prefill_token_num must be >= 1")
        _check(self.session_len is None or self.session_len >= 1, "session_len must be >= 1")
        _check(self.max_batch_size is None or self.max_batch_size >= 1, "max_batch_size must be >= 1")


@dataclass(slots=True)
class Response:
    """One result (or, from stream_infer, one delta) of a request."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    index: int = 0
