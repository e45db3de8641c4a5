"""Tiny GGUF files written the way llama.cpp's convert script writes them, for the weight-loading tests."""

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType

# hidden 64, 4 heads of 16 (2 KV heads), intermediate 128, vocab 256: every row is a multiple of 32 for Q4/Q8
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 128, 256, 2

# per layer, the GGUF storage type of each module; layer 1 keeps q/k in F32 so the un-permutation is exact there
LAYER_TYPES = [
    {
        "attn_q": Q.Q4_0,
        "attn_k": Q.Q8_0,
        "attn_v": Q.Q4_1,
        "attn_output": Q.Q5_0,
        "ffn_gate": Q.F16,
        "ffn_up": Q.BF16,
        "ffn_down": Q.Q5_1,
    },
    {
        "attn_q": Q.F32,
        "attn_k": Q.F32,
        "attn_v": Q.Q8_0,
        "attn_output": Q.Q4_0,
        "ffn_gate": Q.Q4_1,
        "ffn_up": Q.Q8_0,
        "ffn_down": Q.F16,
    },
]
HF_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What convert_hf_to_gguf.py does to HF q/k rows: [heads, 2, head_dim/2] -> [heads, head_dim/2, 2]."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def random_hf_weights(seed: int = 0, tied: bool = False) -> dict[str, torch.Tensor]:
    """HF-named float32 weights of the tiny llama."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "attn_q": (HEADS * HEAD_DIM, HIDDEN),
        "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output": (HIDDEN, HEADS * HEAD_DIM),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
        "attn_norm": (HIDDEN,),
        "ffn_norm": (HIDDEN,),
    }
    weights = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g)}
    for layer in range(LAYERS):
        for module, shape in shapes.items():
            weights[f"model.layers.{layer}.{HF_MODULES[module]}.weight"] = torch.randn(shape, generator=g)
    weights["model.norm.weight"] = torch.rand(HIDDEN, generator=g) + 0.5
    if not tied:
        weights["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g)
    return weights


def encode(tensor: torch.Tensor, qtype: Q) -> np.ndarray:
    """The bytes (or float array) GGUFWriter stores for `tensor` in type `qtype`."""
    array = tensor.numpy().astype(np.float32)
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def write_tiny_llama(
    path: str,
    weights: dict[str, torch.Tensor],
    arch: str = "llama",
    permute: bool = True,
    embed_type: Q = Q.Q8_0,
    extra_metadata=None,
    extra_tensors: dict[str, tuple[np.ndarray, Q]] | None = None,
    layer_types: list[dict[str, Q]] | None = None,
) -> dict[str, np.ndarray]:
    """Write `weights` as a GGUF file; returns {gguf_name: stored array} for exact-dequantization checks."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for add in extra_metadata or ():
        add(writer)

    stored = {}

    def put(name: str, tensor: torch.Tensor, qtype: Q) -> None:
        stored[name] = encode(tensor, qtype)
        writer.add_tensor(name, stored[name], raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)

    put("token_embd.weight", weights["model.embed_tokens.weight"], embed_type)
    for layer in range(LAYERS):
        for module, hf_module in HF_MODULES.items():
            tensor = weights[f"model.layers.{layer}.{hf_module}.weight"]
            if permute and module == "attn_q":
                tensor = llama_cpp_permute(tensor, HEADS)
            if permute and module == "attn_k":
                tensor = llama_cpp_permute(tensor, KV_HEADS)
            put(f"blk.{layer}.{module}.weight", tensor, (layer_types or LAYER_TYPES)[layer].get(module, Q.F32))
    put("output_norm.weight", weights["model.norm.weight"], Q.F32)
    if "lm_head.weight" in weights:
        put("output.weight", weights["lm_head.weight"], Q.F16)
    for name, (array, qtype) in (extra_tensors or {}).items():
        stored[name] = array
        writer.add_tensor(name, array, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored
