"""A dense copy of a quantized checkpoint (AWQ gemm, GPTQ v1, compressed-tensors float/int-quantized with
per-channel or per-tensor weight scales): `lmforge eval --dequantize` measures what the weight quantization
cost on any lmforge build, also one that cannot run the quantized layers. Activation quantization (FP8 / int8
W8A8's dynamic per-token step) is not part of a dense copy: its perplexity is the weight-only effect."""

from __future__ import annotations

import json
import os

import torch

from lmforge.quantize import writer
from lmforge.quantize.packing import AWQ_ORDER, unpack_cols, unpack_rows
from lmforge.weights.files import iter_weights


def _awq(parts: dict, bits: int, group_size: int) -> torch.Tensor:
    q = unpack_cols(parts["qweight"], bits, AWQ_ORDER)  # [K, N]
    zeros = unpack_cols(parts["qzeros"], bits, AWQ_ORDER)  # [K / G, N]
    g = q.shape[0] if group_size == -1 else group_size
    idx = torch.arange(q.shape[0]) // g
    return ((q.float() - zeros[idx].float()) * parts["scales"].float()[idx]).t()


def _gptq(parts: dict, bits: int) -> torch.Tensor:
    q = unpack_rows(parts["qweight"], bits)  # [K, N]
    zeros = (unpack_cols(parts["qzeros"], bits) + 1) & (2**bits - 1)  # v1 stores zero - 1
    idx = parts["g_idx"].long()
    return ((q.float() - zeros[idx].float()) * parts["scales"].float()[idx]).t()


def _compressed(parts: dict) -> torch.Tensor:
    scale = parts["weight_scale"].float()
    weight = parts["weight"].float()
    if "weight_zero_point" in parts:
        weight = weight - parts["weight_zero_point"].float()
    return weight * (scale.view(-1, 1) if scale.dim() == 2 or scale.numel() == weight.shape[0] else scale)


def dequantize_checkpoint(src: str, dst: str, dtype: torch.dtype = torch.float32) -> str:
    """Write the dense equivalent of the quantized HF folder `src` into `dst`; returns the format dequantized."""
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    qc = config.get("quantization_config")
    if not qc:
        raise ValueError(f"{src} is not quantized (its config.json has no quantization_config)")
    method = qc.get("quant_method")
    suffixes = {
        "awq": ("qweight", "qzeros", "scales"),
        "gptq": ("qweight", "qzeros", "scales", "g_idx"),
        "compressed-tensors": ("weight", "weight_scale", "weight_zero_point"),
    }.get(method)
    if suffixes is None:
        raise ValueError(f"{src}: cannot dequantize quant_method {method!r}; known: awq, gptq, compressed-tensors")
    if method == "compressed-tensors":
        if qc.get("format") not in ("float-quantized", "int-quantized", "naive-quantized"):
            raise ValueError(f"{src}: cannot dequantize compressed-tensors format {qc.get('format')!r}")
        for group in qc.get("config_groups", {}).values():
            if (group.get("weights") or {}).get("strategy") not in ("channel", "tensor"):
                raise ValueError(f"{src}: only per-channel / per-tensor compressed-tensors weights dequantize here")
    elif method == "gptq" and qc.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"{src}: GPTQ checkpoint_format {qc.get('checkpoint_format')!r} is not v1 'gptq'")
    elif method == "awq" and qc.get("version", "gemm") != "gemm":
        raise ValueError(f"{src}: AWQ version {qc.get('version')!r} is not 'gemm'")

    tensors: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in iter_weights(src, progress=False):
        prefix, _, suffix = name.rpartition(".")
        # compressed-tensors calls quantized and dense weights alike `weight`: the dtype tells them apart
        is_dense_weight = suffix == "weight" and t.dtype not in (torch.int8, torch.float8_e4m3fn)
        if suffix in suffixes and not is_dense_weight:
            pending.setdefault(prefix, {})[suffix] = t
        else:
            tensors[name] = t.to(dtype) if t.is_floating_point() else t
    for prefix, parts in pending.items():
        if method == "awq":
            w = _awq(parts, qc["bits"], qc["group_size"])
        elif method == "gptq":
            w = _gptq(parts, qc["bits"])
        else:
            if "weight" not in parts:  # a scale without a quantized weight: a dense layer's extra? refuse
                raise ValueError(f"{src}: {prefix} has {sorted(parts)} but no quantized weight")
            w = _compressed(parts)
        tensors[f"{prefix}.weight"] = w.to(dtype).contiguous()
    os.makedirs(dst, exist_ok=True)
    writer.save_safetensors(dict(sorted(tensors.items())), dst, 5 * 10**9)
    writer.write_config(config, None, dtype, dst)
    writer.copy_side_files(src, None, None, dst)
    return method if method != "compressed-tensors" else f"compressed-tensors:{qc['format']}"
