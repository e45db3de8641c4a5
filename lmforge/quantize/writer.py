"""Checkpoint writers: quantized linears -> the tensors and `quantization_config` of each standard format, then
safetensors shards (with an index when more than one), config.json, tokenizer and generation files.

Formats: AutoAWQ "gemm" (awq), AutoGPTQ / GPTQModel v1 (gptq, also used for rtn), compressed-tensors
`float-quantized` (fp8: per-channel FP8 weights, dynamic per-token FP8 activations) and `int-quantized` (w8a8:
per-channel int8 weights, dynamic per-token int8 activations), with the config `llmcompressor` writes for its
FP8_DYNAMIC and W8A8 schemes (the keys of compressed-tensors' own `QuantizationConfig`).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from lmforge.quantize.packing import AWQ_ORDER, pack_cols, pack_rows
from lmforge.quantize.qparams import IntWeight

COMPRESSED_TENSORS_VERSION = "0.20.1"  # the compressed-tensors release whose config layout this writes
_EXTRA_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def awq_tensors(w: IntWeight) -> dict[str, torch.Tensor]:
    """qweight int32 [K, N / 8], qzeros int32 [K / G, N / 8] (AWQ nibble order), scales fp16 [K / G, N]."""
    if w.spec.bits != 4:
        raise ValueError("AutoAWQ's gemm layout holds 4-bit weights only; use --bits 4 with --method awq")
    return {
        "qweight": pack_cols(w.q.t(), 4, AWQ_ORDER),
        "qzeros": pack_cols(w.zeros.t().to(torch.int32), 4, AWQ_ORDER),
        "scales": w.scales.t().to(torch.float16).contiguous(),
    }


def gptq_tensors(w: IntWeight) -> dict[str, torch.Tensor]:
    """qweight int32 [K / p, N], qzeros int32 [K / G, N / p] holding zero - 1, scales fp16 [K / G, N], g_idx [K]."""
    bits = w.spec.bits
    return {
        "qweight": pack_rows(w.q.t(), bits),
        "qzeros": pack_cols(w.zeros.t().to(torch.int32) - 1, bits),
        "scales": w.scales.t().to(torch.float16).contiguous(),
        "g_idx": w.g_idx.to(torch.int32).contiguous(),
    }


def awq_config(bits: int, group_size: int) -> dict:
    return {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


def gptq_config(bits: int, group_size: int, sym: bool, desc_act: bool, damp: float, method: str) -> dict:
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": "gptq",
        "damp_percent": damp,
        "true_sequential": True,
        "static_groups": False,
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": ["lmforge"], "method": method},  # rtn or gptq: who rounded, for the reader
    }


def compressed_tensors_config(kind: str) -> dict:
    """kind 'float' (FP8_DYNAMIC) or 'int' (W8A8): 8-bit per-channel symmetric weights, dynamic per-token
    symmetric activations, every Linear but lm_head."""

    def args(strategy: str, dynamic: bool) -> dict:
        return {
            "num_bits": 8,
            "type": kind,
            "symmetric": True,
            "group_size": None,
            "strategy": strategy,
            "dynamic": dynamic,
        }

    scheme = {
        "targets": ["Linear"],
        "weights": args("channel", False),
        "input_activations": args("token", True),
        "output_activations": None,
        "format": None,
    }
    return {
        "version": COMPRESSED_TENSORS_VERSION,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        "config_groups": {"group_0": scheme},
        "kv_cache_scheme": None,
        "format": f"{kind}-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": ["lm_head"],
        "moe_sparsity_config": None,
    }


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Names per shard, in order, each shard at most max_shard_bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_safetensors(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json; the files written."""
    shards = plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file_name, shard in zip(names, shards, strict=True):
        part = {k: tensors[k].detach().to("cpu").contiguous() for k in shard}
        save_file(part, os.path.join(out_dir, file_name), metadata={"format": "pt"})
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: file_name for file_name, shard in zip(names, shards, strict=True) for k in shard},
        }
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return names


def write_config(config: dict, quantization_config: dict | None, dtype: torch.dtype, out_dir: str) -> None:
    config = dict(config)
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    dtype_name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]  # the source's spelling
    for key in keys:
        config[key] = dtype_name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def copy_side_files(source_dir: str | None, tokenizer, hf_config, out_dir: str) -> None:
    """Tokenizer and generation files: copied from an HF folder; saved from the GGUF-built tokenizer otherwise."""
    if source_dir is not None:
        for name in _EXTRA_FILES:
            path = os.path.join(source_dir, name)
            if os.path.isfile(path):
                shutil.copy2(path, os.path.join(out_dir, name))
        return
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(out_dir)
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(hf_config).save_pretrained(out_dir)
