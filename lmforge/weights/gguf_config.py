"""An HF config built from GGUF metadata, so a lone .gguf file needs no config.json.

Feeds `AutoModelConfigBuilder` the same config an HF folder would (read by configurations.hf_json without importing
transformers for the families it knows, by AutoConfig otherwise); `gguf.py` also uses the family table here to know
which tensors llama.cpp transformed on the way in.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.weights.dequant import dequantize
from lmforge.weights.errors import WeightFileError
from lmforge.weights.gguf_file import GGUFFile


@dataclass(frozen=True, slots=True)
class GGUFFamily:
    model_type: str
    architecture: str  # HF class name, the MODULE_MAP key
    permute_qk: bool  # llama.cpp's convert script interleaves q/k rows for its rotary kernel; undo it on load
    norm_offset: float  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w, HF stores w


FAMILIES = {
    "llama": GGUFFamily("llama", "LlamaForCausalLM", permute_qk=True, norm_offset=0.0),  # Mistral converts as llama
    "qwen2": GGUFFamily("qwen2", "Qwen2ForCausalLM", permute_qk=False, norm_offset=0.0),
    "qwen3": GGUFFamily("qwen3", "Qwen3ForCausalLM", permute_qk=False, norm_offset=0.0),
    "qwen3moe": GGUFFamily("qwen3_moe", "Qwen3MoeForCausalLM", permute_qk=False, norm_offset=0.0),
    "gemma": GGUFFamily("gemma", "GemmaForCausalLM", permute_qk=False, norm_offset=1.0),
    "gemma2": GGUFFamily("gemma2", "Gemma2ForCausalLM", permute_qk=False, norm_offset=1.0),
    "gemma3": GGUFFamily("gemma3_text", "Gemma3ForCausalLM", permute_qk=False, norm_offset=1.0),
    "phi3": GGUFFamily("phi3", "Phi3ForCausalLM", permute_qk=False, norm_offset=0.0),
}
# Mixtral converts as "llama" too; only the expert count in the metadata tells the two apart
_MIXTRAL = GGUFFamily("mixtral", "MixtralForCausalLM", permute_qk=True, norm_offset=0.0)

# Gemma 2/3 27B scale queries by hidden/heads instead of head_dim; GGUF has no key for it, so llama.cpp keys it
# off the model size, which the layer count identifies.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gguf_family(file: GGUFFile) -> GGUFFamily:
    if file.architecture == "llama" and file.arch_value("expert_count"):
        return _MIXTRAL
    family = FAMILIES.get(file.architecture)
    if family is None:
        raise WeightFileError(
            f"GGUF file {file.path} holds a {file.architecture!r} model; lmforge reads GGUF architectures "
            f"{sorted(FAMILIES)}. Convert the original HF folder instead, or load that folder directly."
        )
    return family


def gguf_config_dict(file: GGUFFile) -> dict:
    """The kwargs of the HF config class for this file (model_type included)."""
    family = gguf_family(file)
    arch = file.architecture
    hidden_size = _int(file, "embedding_length")
    num_heads = _int(file, "attention.head_count")
    head_dim = _int(file, "attention.key_length", hidden_size // num_heads)
    config = {
        "model_type": family.model_type,
        "architectures": [family.architecture],
        "hidden_size": hidden_size,
        # MoE files may have no dense feed-forward size; the expert size then stands in for it
        "intermediate_size": _int(file, "feed_forward_length", file.arch_value("expert_feed_forward_length")),
        "num_hidden_layers": _int(file, "block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": _int(file, "attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float32_decimal(file.arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(file.arch_value("rope.freq_base", 10000.0)),
        "max_position_embeddings": _int(file, "context_length"),
        "vocab_size": _vocab_size(file),
        "tie_word_embeddings": "output.weight" not in file.tensors,
    }
    for name in ("bos", "eos", "padding"):
        token_id = file.metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config["pad_token_id" if name == "padding" else f"{name}_token_id"] = int(token_id)
    rope_scaling = _rope_scaling(file, config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    sliding_window = file.arch_value("attention.sliding_window")
    if sliding_window:
        config["sliding_window"] = int(sliding_window)

    if arch in ("gemma2", "gemma3"):
        is_27b = config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]
        config["query_pre_attn_scalar"] = hidden_size // num_heads if is_27b else head_dim
    if arch == "gemma2":
        config["attn_logit_softcapping"] = file.arch_value("attn_logit_softcapping")
        config["final_logit_softcapping"] = file.arch_value("final_logit_softcapping")
    if arch == "gemma3":
        config["rope_local_base_freq"] = 10000.0  # fixed in llama.cpp and HF; not in the metadata
        config["sliding_window_pattern"] = 6  # every 6th layer is global, likewise fixed
    if family.model_type == "mixtral":
        config["num_local_experts"] = _int(file, "expert_count")
        config["num_experts_per_tok"] = _int(file, "expert_used_count")
    if family.model_type == "qwen3_moe":
        config["num_experts"] = _int(file, "expert_count")
        config["num_experts_per_tok"] = _int(file, "expert_used_count")
        config["moe_intermediate_size"] = _int(file, "expert_feed_forward_length")
        # llama.cpp's qwen3moe graph always renormalises the top-k weights; newer files also say so in the metadata
        config["norm_topk_prob"] = bool(file.arch_value("expert_weights_norm", True))
        config["decoder_sparse_step"] = 1  # llama.cpp has no dense layers in this architecture
        config["mlp_only_layers"] = []
    if arch == "phi3":
        rotary_dim = _int(file, "rope.dimension_count", head_dim)
        config["partial_rotary_factor"] = rotary_dim / head_dim
        original = file.arch_value("rope.scaling.original_context_length")
        if original:
            config["original_max_position_embeddings"] = int(original)
    return config


def gguf_hf_config_from_file(file: GGUFFile, with_transformers: bool = False):
    """The HF config of the GGUF file's metadata: a configurations.hf_json.HFConfig, or transformers'
    PretrainedConfig for a family that module does not read or with_transformers."""
    from lmforge.configurations.hf_json import can_read, hf_config_from_dict

    config = gguf_config_dict(file)
    try:
        if can_read(config) and not with_transformers:
            return hf_config_from_dict(config)
        import transformers

        return transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    except (ValueError, KeyError, TypeError) as e:
        raise WeightFileError(f"GGUF file {file.path}: its metadata does not make a valid HF config ({e})") from e


def _int(file: GGUFFile, key: str, default: int | None = None) -> int:
    value = file.arch_value(key, default)
    if isinstance(value, list):  # per-layer arrays; the dense families here repeat one value
        if len(set(value)) != 1:
            raise WeightFileError(f"GGUF file {file.path}: per-layer {key} values {sorted(set(value))} differ")
        value = value[0]
    if value is None:
        raise WeightFileError(f"GGUF file {file.path} lacks the metadata key {file.architecture}.{key}")
    return int(value)


def _float32_decimal(value: float) -> float:
    """1e-5 stored as float32 reads back as 9.99999974e-06; recover the decimal the converter wrote."""
    return float(str(np.float32(value)))


def _vocab_size(file: GGUFFile) -> int:
    embedding = file.tensors.get("token_embd.weight")
    if embedding is not None:
        return embedding.shape[0]
    tokens = file.metadata.get("tokenizer.ggml.tokens")
    return len(tokens) if isinstance(tokens, Sequence) and not isinstance(tokens, str) else _int(file, "vocab_size")


def _rope_scaling(file: GGUFFile, config: dict) -> dict | None:
    if "rope_factors_long.weight" in file.tensors:  # Phi-3 LongRoPE keeps its per-dimension factors as tensors
        return {
            "rope_type": "longrope",
            "long_factor": _f32_tensor(file, "rope_factors_long.weight").tolist(),
            "short_factor": _f32_tensor(file, "rope_factors_short.weight").tolist(),
        }
    if "rope_freqs.weight" in file.tensors:  # Llama 3.1+: the convert script baked the llama3 scaling into a tensor
        return _llama3_rope_scaling(file, config)
    kind = file.arch_value("rope.scaling.type")
    if not kind or kind == "none":
        return None
    scaling = {"rope_type": str(kind), "factor": float(file.arch_value("rope.scaling.factor", 1.0))}
    original = file.arch_value("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _f32_tensor(file: GGUFFile, name: str) -> torch.Tensor:
    info = file.tensors[name]
    return dequantize(file.raw(info), info.ggml_type, info.shape, torch.float32)


def _llama3_rope_scaling(file: GGUFFile, config: dict) -> dict:
    """Recover HF's llama3 rope parameters from the `rope_freqs` divisors, checking they reproduce the tensor.

    Every Llama 3.x release uses low/high frequency factors 1 and 4 over an 8192-token original context; only
    the overall factor (8 or 32) varies, and it is the divisor of the lowest frequencies.
    """
    stored = _f32_tensor(file, "rope_freqs.weight").double()
    scaling = {
        "rope_type": "llama3",
        "factor": round(float(stored.max()), 4),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    head_dim = config["head_dim"]
    inv_freq = config["rope_theta"] ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    divisor = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    divisor = torch.where(wavelen < 8192 / 4.0, 1.0, torch.where(wavelen > 8192 / 1.0, scaling["factor"], divisor))
    if not torch.allclose(divisor, stored, rtol=1e-3):
        raise WeightFileError(
            f"GGUF file {file.path}: its rope_freqs tensor does not match llama3 rope scaling with factor "
            f"{scaling['factor']}; lmforge cannot rebuild this rope configuration."
        )
    return scaling
