"""Perplexity through lmforge's own model build and weight loading (engine/model_loader.py), whatever the
checkpoint's format: one sequence at a time is prefilled through the paged KV cache and the logits of every
position are scored against the next token.

`prefill_logits` is the small internal API this needs: the float32 logits of every prompt position of one
sequence, from the model's forward under a hand-built single-sequence StepContext.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.model_inputs import AttnMetadata, StepContext, StepContextManager

# tensor names that only a quantized linear has: a model that has none of them would ignore them on load
_QUANT_TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "weight_scale", "input_scale", "weight_zero_point")


@torch.inference_mode()
def prefill_logits(model, ctx_mgr: StepContextManager, kv_caches: list, block_size: int, token_ids: torch.Tensor):
    """float32 logits [L, vocab] of every position of one sequence `token_ids [L]`, prefilled from position 0 into
    blocks 0, 1, ... of `kv_caches` (which must hold ceil(L / block_size) blocks)."""
    device = token_ids.device
    n = token_ids.numel()
    num_blocks = -(-n // block_size)
    i32 = dict(dtype=torch.int32, device=device)
    positions = torch.arange(n, dtype=torch.int64, device=device)
    meta = AttnMetadata(
        is_decoding=n == 1,
        block_tables=torch.arange(num_blocks, **i32).view(1, -1),
        q_start_loc=torch.zeros(1, **i32),
        q_seqlens=torch.tensor([n], **i32),
        kv_seqlens=torch.tensor([n], **i32),
        slot_mapping=positions,  # blocks 0.. in order: slot = position
        max_q_seqlen=n,
        max_kv_seqlen=n,
        block_size=block_size,
        q_seqlens_list=[n],
        kv_seqlens_list=[n],
    )
    ctx = StepContext(
        input_ids=token_ids.to(torch.int64),
        position_ids=positions,
        attn_metadata=meta,
        kv_caches=kv_caches,
        is_decoding=meta.is_decoding,
        last_token_indices=torch.tensor([n - 1], dtype=torch.int64, device=device),
    )
    with ctx_mgr.context(ctx):
        hidden = model(**model.prepare_inputs_for_generation(kv_caches, context=ctx))
    if callable(getattr(model, "get_logits", None)):
        return model.get_logits(hidden)
    return (hidden[0] if hidden.dim() == 3 else hidden).float()  # a seed-style model returning logits


def sequence_nll(logits: torch.Tensor, token_ids: torch.Tensor) -> float:
    """Summed negative log-likelihood of tokens 1.. given the logits of positions ..L-2."""
    return F.cross_entropy(logits[:-1].float(), token_ids[1:].to(logits.device), reduction="sum").item()


@dataclass(slots=True)
class EvalResult:
    model: str
    format: str
    ppl: float
    tokens: int  # tokens scored (each block's first token has no context and is not scored)
    nll: float  # mean negative log-likelihood per scored token, nats
    seq_len: int
    num_seqs: int
    dtype: str
    device: str


def checkpoint_format(hf_config) -> str:
    qc = getattr(hf_config, "quantization_config", None)
    if not qc:
        return "dense"
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method", "?")
    if method == "compressed-tensors":
        return f"compressed-tensors:{qc.get('format', '?')}"
    return f"{method}:int{qc['bits']}:g{qc['group_size']}" if "bits" in qc else str(method)


def _refuse_ignored_quantization(model, fmt: str, path: str) -> None:
    """A model built without quantized layers would load a quantized checkpoint's weights and silently drop its
    scales (its logits would be nonsense): stop before that."""
    if fmt == "dense":
        return
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    if not any(n.rsplit(".", 1)[-1] in _QUANT_TENSOR_SUFFIXES for n in names):
        raise ValueError(
            f"{path} is quantized ({fmt}) but this lmforge build made no quantized layers for it, so its scales "
            "would be dropped; evaluate it with --dequantize (a dense copy, weight-only effect) instead"
        )


def evaluate_perplexity(
    model_path: str | None,
    text: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    seq_len: int = 512,
    max_tokens: int | None = 20480,
    block_size: int = 64,
    progress: bool = True,
    name: str | None = None,
) -> EvalResult:
    """Perplexity of the model at `model_path` (None: the embedded default) on `text` (None: the built-in held-out
    stdlib text), over non-overlapping sequences of `seq_len` tokens, at most `max_tokens` tokens in all."""
    from lmforge.engine.cache_engine import CacheEngine
    from lmforge.engine.model_loader import build_model, load_model_weights
    from lmforge.engine.startup import resolve_dtypes
    from lmforge.model_source import load_model_source
    from lmforge.quantize.calib import builtin_text, encode_prefix, token_blocks

    source = load_model_source(model_path)
    if source.tokenizer is None:
        raise ValueError(f"{source.path} has no tokenizer files; lmforge eval needs one to encode the text")
    num_seqs = None if max_tokens is None else max(1, max_tokens // seq_len)
    text = builtin_text("evaluation") if text is None else text
    ids = encode_prefix(source.tokenizer, text, None if num_seqs is None else num_seqs * seq_len)
    if num_seqs is not None and num_seqs * seq_len > len(ids):
        num_seqs = None  # less text than asked for: score all of it
    blocks = token_blocks(ids, num_seqs, seq_len)

    torch_device = torch.device(device)
    # the compute dtype and KV cache format the engine would run (on CPU at dtype auto: a float16 cache)
    torch_dtype, kv_cache_dtype = resolve_dtypes(dtype, source.hf_config, torch_device.type)
    fmt = checkpoint_format(source.hf_config)
    ctx_mgr = StepContextManager()
    # a GGUF file on the CPU at dtype auto is scored as the engine runs it: linear layers kept packed (int4 planes)
    packed = dtype == "auto" and torch_device.type == "cpu" and getattr(source, "gguf_file", None) is not None
    model = build_model(source, torch_dtype, torch_device, ctx_mgr, load=packed, pack_gguf=packed)
    if packed:
        fmt = "gguf-packed"
    else:
        _refuse_ignored_quantization(model, fmt, source.path)
        load_model_weights(model, source, torch_dtype, torch_device)
    cache = CacheEngine(
        source.model_config, -(-seq_len // block_size), block_size, torch_dtype, torch_device,
        kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip

    total = 0.0
    disabled = not progress or not sys.stderr.isatty()
    for row in tqdm(blocks, desc="perplexity", unit="seq", disable=disabled):
        row = row.to(torch_device)
        total += sequence_nll(prefill_logits(model, ctx_mgr, cache.kv_caches, block_size, row), row)
    scored = blocks.shape[0] * (seq_len - 1)
    nll = total / scored
    return EvalResult(
        model=name or source.name,
        format=fmt,
        ppl=math.exp(nll),
        tokens=scored,
        nll=nll,
        seq_len=seq_len,
        num_seqs=blocks.shape[0],
        dtype=str(torch_dtype).removeprefix("torch."),
        device=device,
    )
