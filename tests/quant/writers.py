"""Quantized checkpoints of tiny random HF models, written with the formats' reference code where one exists
(compressed-tensors' own compressor, AutoAWQ's packer, AutoGPTQ's packer), plus the dequantized float32 HF model
that the engine is compared against.

Each writer takes an HF model (fp32, random weights), quantizes its linear layers round-to-nearest (the
quantization algorithm does not matter here; the format does), puts the dequantized weights back into the model
(so it becomes the reference) and saves the checkpoint with its `quantization_config`.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from tests.quant.reference_libs import awq_gemm, gptq_quant_linear

FP8 = torch.float8_e4m3fn


def _skip(name: str) -> bool:
    """Modules every format leaves dense: lm_head and the MoE routers."""
    return name == "lm_head" or name.endswith(".gate") or "embed" in name


def quantize_rtn(w: torch.Tensor, bits: int, group: int, sym: bool):
    """w [N, K] -> (q [N, K] in [0, 2**bits), scale [N, K/G] fp16-representable, zero [N, K/G] integer)."""
    n, k = w.shape
    g = k if group == -1 else group
    wg = w.float().reshape(n, k // g, g)
    maxq = 2**bits - 1
    if sym:
        scale = (wg.abs().amax(-1) * 2 / maxq).clamp(min=1e-5)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / maxq).clamp(min=1e-5)
        zero = torch.round(-lo / scale.half().float()).clamp(0, maxq)
    scale = scale.half().float()
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, maxq).reshape(n, k)
    return q.to(torch.int32), scale, zero


def _linears(model, conv1d: bool = False):
    """(name, weight) of every quantizable weight: nn.Linear's [N, K], HF 5's stacked experts [E, out, in] and,
    with conv1d, GPT-2's Conv1D layers ([K, N]: AutoGPTQ quantizes them transposed)."""
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not _skip(name):
            yield name, module.weight
        elif conv1d and isinstance(module, Conv1D):
            yield name, module.weight
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            yield name, p


def _expert_names(model) -> tuple[str, str, str]:
    from lmforge.models.module_map import resolve_model_class

    cls = resolve_model_class(type(model).__name__)
    return cls.expert_proj_names or ("gate_proj", "up_proj", "down_proj")


def _write(model, path: str, quantize_one, quant_config: dict) -> set[int]:
    """quantize_one(w [N, K]) -> ({suffix: tensor}, dequantized [N, K]); the rest of the state dict is saved as
    is. Stacked experts become per-expert tensors. Returns the storages (data_ptr) of the model's quantized
    weights, for `fake_quant_activations`."""
    storages = set()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    from transformers.pytorch_utils import Conv1D

    gate, up, down = _expert_names(model)
    conv1d = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    for name, weight in list(_linears(model, conv1d=quant_config["quant_method"] == "gptq")):
        if name in conv1d:  # [K, N]
            tensors, deq = quantize_one(weight.data.t())
            del state[f"{name}.weight"]
            state.update({f"{name}.{s}": t for s, t in tensors.items()})
            weight.data.copy_(deq.t())
            storages.add(weight.untyped_storage().data_ptr())
            continue
        if weight.dim() == 2:
            tensors, deq = quantize_one(weight.data)
            del state[f"{name}.weight"]
            state.update({f"{name}.{s}": t for s, t in tensors.items()})
            weight.data.copy_(deq)
            storages.add(weight.untyped_storage().data_ptr())
            continue
        prefix, kind = name.rsplit(".", 1)  # model.layers.L.mlp.experts, gate_up_proj | down_proj
        del state[name]
        for e in range(weight.shape[0]):
            parts = [(gate, weight.data[e].chunk(2)[0]), (up, weight.data[e].chunk(2)[1])]
            parts = parts if kind == "gate_up_proj" else [(down, weight.data[e])]
            deqs = []
            for proj, w in parts:
                tensors, deq = quantize_one(w)
                state.update({f"{prefix}.{e}.{proj}.{s}": t for s, t in tensors.items()})
                deqs.append(deq)
            weight.data[e].copy_(torch.cat(deqs))
        storages.add(weight.untyped_storage().data_ptr())
    model.config.quantization_config = quant_config
    model.save_pretrained(path)  # config.json (and a dense model.safetensors we replace)
    for f in os.listdir(path):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(path, f))
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quant_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return storages


def write_awq(model, path: str, group_size: int = 32) -> set[int]:
    """AutoAWQ gemm: qweight [K, N/8] / qzeros [K/G, N/8] in AWQ's nibble order, packed by WQLinear_GEMM.from_linear;
    the reference weight is AutoAWQ's own dequantize_gemm of what it packed."""
    gemm = awq_gemm()

    def one(w):
        q, scale, zero = quantize_rtn(w, 4, group_size, sym=False)
        g = group_size
        deq = (q.float() - zero.repeat_interleave(g, 1)) * scale.repeat_interleave(g, 1)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(deq)
        packed = gemm.WQLinear_GEMM.from_linear(lin, 4, g, scales=scale.t().contiguous(), zeros=zero.t().contiguous())
        ref = gemm.dequantize_gemm(packed.qweight, packed.qzeros, packed.scales.float(), 4, g).t()  # fp32: exact
        return {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}, ref

    cfg = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    return _write(model, path, one, cfg)


def write_gptq(
    model, path: str, bits: int = 4, group_size: int = 32, sym: bool = True, desc_act: bool = False, v2: bool = False
) -> set[int]:
    """GPTQ v1 (AutoGPTQ 0.7.1's QuantLinear.pack, qzeros stored minus 1); the reference weight is that module's
    own torch dequantization (its forward on the identity). desc_act: a random act-order g_idx. v2: the
    `gptq_v2` checkpoint format (GPTQModel's), whose qzeros hold the zero points themselves."""
    from lmforge.nn.quant.packing import pack_int32, unpack_int32

    quant_linear = gptq_quant_linear()

    def one(w):
        n, k = w.shape
        g = k if group_size == -1 else group_size
        # act-order follows the input's Hessian, so projections of one input (q/k/v, gate/up) share it
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)) if desc_act else torch.arange(k)
        q, scale, zero = quantize_rtn(w[:, perm], bits, group_size, sym)  # groups over the act-order columns
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = torch.arange(k, dtype=torch.int32) // g
        deq = torch.empty_like(w)
        deq[:, perm] = (q.float() - zero.repeat_interleave(g, 1)) * scale.repeat_interleave(g, 1)
        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.data.copy_(deq)
        layer = quant_linear(bits, group_size, k, n, False)
        layer.pack(lin, scale, zero, g_idx)
        with torch.no_grad():
            layer.scales = layer.scales.float()
            ref = layer(torch.eye(k)).t()
        qzeros = layer.qzeros
        if v2:
            qzeros = pack_int32((unpack_int32(qzeros, bits, 1) + 1) & (2**bits - 1), bits, 1)
        return {
            "qweight": layer.qweight,
            "qzeros": qzeros,
            "scales": layer.scales.half(),
            "g_idx": layer.g_idx.to(torch.int32),
        }, ref

    cfg = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "desc_act": desc_act,
        "checkpoint_format": "gptq_v2" if v2 else "gptq",
    }
    return _write(model, path, one, cfg)


def write_hf_fp8(model, path: str, block: tuple[int, int] = (16, 16)) -> set[int]:
    """HF fine-grained FP8: weight e4m3 [N, K], weight_scale_inv [ceil(N/bn), ceil(K/bk)] (a multiplier)."""
    bn, bk = block

    def one(w):
        n, k = w.shape
        pad = torch.nn.functional.pad(w.float(), (0, (-k) % bk, 0, (-n) % bn))
        blocks = pad.unflatten(0, (-1, bn)).unflatten(2, (-1, bk))  # [N/bn, bn, K/bk, bk]
        scale = (blocks.abs().amax((1, 3)) / 448.0).clamp(min=1e-12)
        full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        q = (w.float() / full).clamp(-448, 448).to(FP8)
        return {"weight": q, "weight_scale_inv": scale}, q.float() * full

    cfg = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block), "fmt": "e4m3"}
    return _write(model, path, one, cfg)


# --- compressed-tensors: its own compressor writes the checkpoint ---------------------------------------------

CT_PRESETS = {  # name -> (compressed-tensors preset, format)
    "w4a16": ("W4A16", "pack-quantized"),
    "w4a16_asym": ("W4A16_ASYM", "pack-quantized"),
    "fp8_static": ("FP8", "float-quantized"),
    "fp8_dynamic": ("FP8_DYNAMIC", "float-quantized"),
    "fp8_block": ("FP8_BLOCK", "float-quantized"),
    "int8_dynamic": ("W8A8", "int-quantized"),
    "int8_static": ("INT8", "int-quantized"),
}


def write_compressed_tensors(model, path: str, scheme: str, group_size: int = 32, block=(16, 16), calib=None) -> dict:
    """compressed-tensors' apply_quantization_config + ModelCompressor.compress_model write the checkpoint
    (scales from each weight's min/max with compressed-tensors' calculate_qparams; static input scales from one
    calibration batch). Returns {module name: input QuantizationArgs or None}; `model` is left untouched."""
    import copy

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    preset, fmt = CT_PRESETS[scheme]
    m = copy.deepcopy(model)
    qs = preset_name_to_scheme(preset, ["Linear"])
    if qs.weights.strategy == "group":
        qs.weights.group_size = group_size
    if qs.weights.strategy == "block":
        qs.weights.block_structure = list(block)
        qs.input_activations.group_size = block[1]
    amax = {}
    hooks = [
        mod.register_forward_hook(lambda mod, inp, out, n=n: amax.__setitem__(n, inp[0].abs().amax()))
        for n, mod in m.named_modules()
        if isinstance(mod, torch.nn.Linear)
    ]
    with torch.no_grad():
        m(calib if calib is not None else torch.arange(3, 35).reshape(1, -1) % m.config.vocab_size)
    for h in hooks:
        h.remove()
    apply_quantization_config(m, QuantizationConfig(config_groups={"group_0": qs}, ignore=["lm_head", "re:.*gate$"]))
    acts = {}
    for name, mod in m.named_modules():
        if not hasattr(mod, "weight_scale"):
            continue
        w, a = mod.weight.data, qs.weights
        n, k = w.shape
        if a.strategy == "group":
            v = w.view(n, k // a.group_size, a.group_size)
            lo, hi = v.amin(-1), v.amax(-1)
        elif a.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        elif a.strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        else:
            bn, bk = a.block_structure
            v = w.view(n // bn, bn, k // bk, bk)
            lo, hi = v.amin((1, 3)), v.amax((1, 3))
        scale, zp = calculate_qparams(lo, hi, a)
        mod.weight_scale.data.copy_(scale)
        if hasattr(mod, "weight_zero_point"):
            mod.weight_zero_point.data.copy_(zp)
        if hasattr(mod, "input_scale"):
            ia = qs.input_activations
            scale, zp = calculate_qparams(-amax[name].reshape(1), amax[name].reshape(1), ia)
            mod.input_scale.data.copy_(scale)
            mod.input_zero_point.data.copy_(zp)
        acts[name] = qs.input_activations
        mod.quantization_status = QuantizationStatus.CALIBRATION
    compressor = ModelCompressor.from_pretrained_model(m, quantization_format=fmt)
    compressor.compress_model(m)
    m.save_pretrained(path)
    compressor.update_config(path)
    return acts


def load_compressed_tensors_reference(path: str):
    """HF transformers' own loading of the checkpoint, decompressed to float32 by compressed-tensors."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)
    ).eval()


def load_hf_fp8_reference(path: str, block=(16, 16)):
    """HF transformers' own reading of a fine-grained FP8 checkpoint, dequantized to float32 on load."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import FineGrainedFP8Config

    config = FineGrainedFP8Config(dequantize=True, weight_block_size=tuple(block))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config).eval()


def write_ct_per_expert(model, path: str, scheme: str, group_size: int = 16) -> set[int]:
    """compressed-tensors tensors for every linear layer *and* every MoE expert (compressed-tensors' model
    compressor only reaches nn.Linear modules, and HF 5 stacks experts), packed with compressed-tensors' own
    pack_to_int32 and scaled with its calculate_qparams. scheme: 'w4a16' (int4, symmetric, group) or
    'fp8_dynamic' (per-channel e4m3 weights, dynamic per-token activations)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    if scheme == "w4a16":
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
        group = {"format": "pack-quantized", "input_activations": None, "weights": args.model_dump(mode="json")}
    else:
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
        act = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
        group = {"format": "float-quantized", "input_activations": act.model_dump(mode="json")}
        group["weights"] = args.model_dump(mode="json")

    def one(w):
        n, k = w.shape
        if scheme == "w4a16":
            wg = w.float().reshape(n, k // group_size, group_size)
            scale, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
            full = scale.repeat_interleave(group_size, 1)
            q = torch.clamp(torch.round(w / full), -8, 7)
            tensors = {
                "weight_packed": pack_to_int32(q.to(torch.int8), 4),
                "weight_scale": scale,
                "weight_shape": torch.tensor([n, k]),
            }
            return tensors, q * full
        scale, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
        q = (w / scale).clamp(-448, 448).to(FP8)
        return {"weight": q, "weight_scale": scale}, q.float() * scale

    group["targets"] = ["Linear"]
    cfg = {
        "quant_method": "compressed-tensors",
        "format": group["format"],
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head", "re:.*gate$"],
    }
    return _write(model, path, one, cfg)
