"""The model files load every weight format lmforge reads, checked by parity with HF transformers (fp32, CPU):
sharded safetensors with an index, PyTorch .bin, HF transformers 5's stacked experts, and GGUF files written
the way llama.cpp's convert script writes them (names, Gemma's stored 1 + w norms, Llama's q/k row order)."""

from __future__ import annotations

import glob
import json
import os
import random

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.check_env.parity import build_tiny_model, engine_vs_hf, tiny_hf_config
from lmforge.messages import PytorchEngineConfig
from tests.conftest import make_tiny_tokenizer

TOL = 1e-4


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (5, 17, 30)]


def _check(path: str, hf_model, vocab: int) -> None:
    config = PytorchEngineConfig(device_type="cpu", dtype="float32", block_size=4, num_cpu_blocks=128)
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add hand-off latency
    try:
        result = engine_vs_hf(path, _prompts(vocab), 4, hf_model=hf_model, backend_config=config)
    finally:
        torch.set_num_threads(num_threads)
    result.tolerance = TOL
    assert result.passed, result.table()


def test_sharded_safetensors_with_index_moe(tmp_path):
    hf = build_tiny_model(tiny_hf_config("qwen3_moe"))
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(glob.glob(str(tmp_path / "*.safetensors"))) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    _check(str(tmp_path), hf, hf.config.vocab_size)


def test_pytorch_bin_tied_embeddings(tmp_path):
    hf = build_tiny_model(tiny_hf_config("gemma2"))
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    os.remove(tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    _check(str(tmp_path), hf, hf.config.vocab_size)


def test_transformers5_stacked_experts(tmp_path):
    # HF transformers 5 keeps experts as [E, 2I, H] / [E, H, I] tensors in memory; a checkpoint saved from that
    # state dict (no conversion back to per-expert names) loads straight into FusedMoE
    hf = build_tiny_model(tiny_hf_config("qwen3_moe"))
    hf.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    _check(str(tmp_path), hf, hf.config.vocab_size)


# --- GGUF ------------------------------------------------------------------------------------------------

_GGUF_LAYER = {  # HF module -> llama.cpp tensor, per layer
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",  # the MoE router
}
_GEMMA_LAYER = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}  # fmt: skip


def _permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order for the llama architecture: rotate-half pairs become adjacent rows."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _add_stacked_experts(writer, layer: str, name: str, tensor: torch.Tensor) -> None:
    """HF transformers 5 holds the experts as [E, 2I, H] gate_up ([gate; up] per expert) and [E, H, I] down;
    llama.cpp stacks each projection on its own, [E, out, in] in torch order."""
    if name == "mlp.experts.down_proj":
        writer.add_tensor(f"blk.{layer}.ffn_down_exps.weight", tensor.numpy().astype(np.float32))
        return
    gate, up = tensor.chunk(2, dim=1)
    writer.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", gate.contiguous().numpy().astype(np.float32))
    writer.add_tensor(f"blk.{layer}.ffn_up_exps.weight", up.contiguous().numpy().astype(np.float32))


def _write_gguf(path: str, hf_model, arch: str, tokenizer_dir: str) -> None:
    c = hf_model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)  # Gemma 3 keeps one per layer type
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(c.sliding_window)
    if arch in ("llama", "qwen3moe") and c.model_type != "mistral":
        num_experts = c.num_local_experts if arch == "llama" else c.num_experts
        writer.add_expert_count(num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    if arch == "qwen3moe":
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    if arch == "phi3":
        writer.add_rope_dimension_count(head_dim)
    model = json.loads(open(os.path.join(tokenizer_dir, "tokenizer.json")).read())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])

    layer_names = {**_GGUF_LAYER, **(_GEMMA_LAYER if arch in ("gemma2", "gemma3") else {})}
    for name, tensor in hf_model.state_dict().items():
        tensor = tensor.float()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            tensor = tensor + 1  # llama.cpp stores Gemma's (1 + w)
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            if rest.startswith("mlp.experts."):
                _add_stacked_experts(writer, layer, rest, tensor)
                continue
            module, _, kind = rest.rpartition(".")
            if arch == "llama" and module == "self_attn.q_proj":
                tensor = _permute(tensor, c.num_attention_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                tensor = _permute(tensor, c.num_key_value_heads)
            gguf_name = f"blk.{layer}.{layer_names[module]}.{kind}"
        writer.add_tensor(gguf_name, tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


GGUF_CASES = {
    # (model_type, llama.cpp architecture, overrides): Mistral converts as "llama" (q/k rows permuted) and loads
    # as a Llama; GGUF has no per-layer window switch, so the windows stay off here
    "mistral": ("mistral", "llama", dict(sliding_window=None)),
    "qwen2": ("qwen2", "qwen2", dict(use_sliding_window=False, sliding_window=None, layer_types=None)),
    "qwen3": ("qwen3", "qwen3", {}),
    "gemma2": ("gemma2", "gemma2", {}),
    "phi3": ("phi3", "phi3", {}),
    # Mixtral converts as "llama" with an expert count; experts stacked per projection, q/k rows permuted
    "mixtral": ("mixtral", "llama", {}),
    "qwen3_moe": ("qwen3_moe", "qwen3moe", {}),
    "gemma": ("gemma", "gemma", dict(head_dim=16)),
    # GGUF fixes Gemma 3's pattern at 5 sliding layers then 1 global; 6 layers reach the global one
    "gemma3": ("gemma3_text", "gemma3", dict(num_hidden_layers=6, layer_types=None, sliding_window_pattern=6)),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf(case, tmp_path):
    model_type, arch, overrides = GGUF_CASES[case]
    make_tiny_tokenizer(str(tmp_path))
    vocab = len(json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"])
    hf = build_tiny_model(tiny_hf_config(model_type, vocab_size=vocab, pad_token_id=0, **overrides))
    path = str(tmp_path / f"tiny-{case}.gguf")
    _write_gguf(path, hf, arch, str(tmp_path))
    _check(path, hf, vocab)
