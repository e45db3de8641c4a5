import json
import os

import gguf
import numpy as np
import pytest
import torch

from lmforge.weights import WeightFileError, gguf_hf_config, gguf_tokenizer, iter_gguf_weights, iter_weights
from tests.conftest import CHATML, make_tiny_tokenizer
from tests.weights.tiny_gguf import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYER_TYPES,
    Q,
    llama_cpp_permute,
    random_hf_weights,
    write_tiny_llama,
)

# max |error| / max |weight| that each storage type may add
_TOLERANCE = {Q.Q4_0: 1 / 8, Q.Q4_1: 1 / 8, Q.Q5_0: 1 / 16, Q.Q5_1: 1 / 16, Q.Q8_0: 1 / 100, Q.F16: 1e-3, Q.BF16: 1e-2}


def _gguf_name(hf_name: str) -> tuple[str, Q]:
    """The GGUF tensor name and storage type that tiny_gguf uses for an HF weight name."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight", Q.Q8_0
    if hf_name == "lm_head.weight":
        return "output.weight", Q.F16
    if hf_name == "model.norm.weight":
        return "output_norm.weight", Q.F32
    layer, module = int(hf_name.split(".")[2]), hf_name.split(".")[-2]
    gguf_module = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }[module]
    return f"blk.{layer}.{gguf_module}.weight", LAYER_TYPES[layer].get(gguf_module, Q.F32)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    weights = random_hf_weights()
    stored = write_tiny_llama(path, weights)
    return path, weights, stored


def test_weights_round_trip_with_permutation_undone(tiny_llama):
    path, original, stored = tiny_llama
    loaded = dict(iter_gguf_weights(path, torch.float32))
    assert loaded.keys() == original.keys()
    for hf_name, tensor in loaded.items():
        gguf_name, qtype = _gguf_name(hf_name)
        assert tensor.shape == original[hf_name].shape and tensor.dtype == torch.float32, hf_name
        # exactly the gguf package's own dequantization of the stored bytes, rows back in HF order
        expected = torch.from_numpy(gguf.quants.dequantize(stored[gguf_name], qtype).copy()).reshape(tensor.shape)
        if ".q_proj." in hf_name or ".k_proj." in hf_name:
            heads = HEADS if ".q_proj." in hf_name else KV_HEADS
            grouped = expected.reshape(heads, HEAD_DIM // 2, 2, HIDDEN)
            expected = grouped.transpose(1, 2).reshape(tensor.shape)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=hf_name)
        error = (tensor - original[hf_name]).abs().max() / original[hf_name].abs().max()
        assert error <= _TOLERANCE.get(qtype, 0.0), (hf_name, qtype.name, float(error))
    # layer 1 stores q/k as F32, so the un-permutation must restore HF's rows bit for bit
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert torch.equal(loaded[name], original[name])
    assert not torch.equal(torch.from_numpy(stored["blk.1.attn_q.weight"]), original[name.replace("k_", "q_")])


def _rope_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * torch.cat([cos, cos], -1) + rotated * torch.cat([sin, sin], -1)


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def test_llama_cpp_permutation_is_the_rotary_layout_change():
    """The permutation the tests apply is the one that makes llama.cpp's interleaved rotary equal HF's
    rotate-half rotary, so undoing it is what HF-layout models need."""
    torch.manual_seed(0)
    weight, x = torch.randn(HEADS * HEAD_DIM, HIDDEN), torch.randn(5, HIDDEN)
    angles = torch.arange(5)[:, None] * 10000 ** -(torch.arange(HEAD_DIM // 2) / (HEAD_DIM // 2))
    cos, sin = angles.cos(), angles.sin()
    hf = _rope_rotate_half((x @ weight.T).view(5, HEADS, HEAD_DIM), cos[:, None], sin[:, None])
    llama_cpp = _rope_interleaved(
        (x @ llama_cpp_permute(weight, HEADS).T).view(5, HEADS, HEAD_DIM), cos[:, None], sin[:, None]
    )
    torch.testing.assert_close(llama_cpp_permute(hf.reshape(5, -1).T, HEADS).T.reshape(5, HEADS, HEAD_DIM), llama_cpp)


def test_dtype_and_iter_weights_routing(tiny_llama, tmp_path):
    path, _, _ = tiny_llama
    reference = dict(iter_gguf_weights(path, torch.float32))
    loaded = dict(iter_weights(path, dtype=torch.bfloat16, progress=False))
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    for name, tensor in loaded.items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(path, folder / "model.gguf")
    assert dict(iter_weights(str(folder), progress=False)).keys() == reference.keys()


def test_config_from_metadata(tiny_llama, tmp_path):
    config = gguf_hf_config(tiny_llama[0])
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert (config.vocab_size, config.max_position_embeddings, config.rms_norm_eps) == (256, 512, 1e-5)
    assert config.rope_parameters["rope_theta"] == 50000.0 and config.rope_parameters["rope_type"] == "default"
    assert (config.bos_token_id, config.eos_token_id, config.tie_word_embeddings) == (1, 2, False)

    tied = str(tmp_path / "tied.gguf")
    scaling = [lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), lambda w: w.add_rope_scaling_factor(4.0)]
    write_tiny_llama(tied, random_hf_weights(tied=True), extra_metadata=scaling)
    config = gguf_hf_config(tied)
    assert config.tie_word_embeddings is True
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    assert "lm_head.weight" not in dict(iter_gguf_weights(tied, torch.float32))


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    hf = LlamaConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        head_dim=HEAD_DIM,
        rope_theta=50000.0,
        rope_scaling={**scaling, "original_max_position_embeddings": 8192},
        max_position_embeddings=512,
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    plain = 50000.0 ** -(torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    rope_freqs = (plain / scaled).numpy().astype(np.float32)  # what convert_hf_to_gguf.py stores: the divisors
    path = str(tmp_path / "llama3.gguf")
    write_tiny_llama(path, random_hf_weights(), extra_tensors={"rope_freqs.weight": (rope_freqs, Q.F32)})
    config = gguf_hf_config(path)
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["factor"] == 8.0 and config.rope_parameters["high_freq_factor"] == 4.0
    assert "rope_freqs.weight" not in dict(iter_gguf_weights(path, torch.float32))


def test_gemma2_norm_offset_names_and_config(tmp_path):
    weights = random_hf_weights()
    stored_weights = {k: v + 1 if k.endswith("norm.weight") else v for k, v in weights.items()}  # convert adds 1
    path = str(tmp_path / "gemma2.gguf")
    metadata = [
        lambda w: w.add_key_length(HEAD_DIM),
        lambda w: w.add_attn_logit_softcapping(50.0),
        lambda w: w.add_final_logit_softcapping(30.0),
        lambda w: w.add_sliding_window(128),
    ]
    write_tiny_llama(path, stored_weights, arch="gemma2", permute=False, extra_metadata=metadata)
    loaded = dict(iter_gguf_weights(path, torch.float32))
    assert torch.equal(
        loaded["model.layers.1.self_attn.q_proj.weight"], weights["model.layers.1.self_attn.q_proj.weight"]
    )
    torch.testing.assert_close(loaded["model.norm.weight"], weights["model.norm.weight"])
    assert "model.layers.0.pre_feedforward_layernorm.weight" in loaded  # gemma2's ffn_norm
    config = gguf_hf_config(path)
    assert config.model_type == "gemma2" and config.architectures == ["Gemma2ForCausalLM"]
    assert (config.attn_logit_softcapping, config.final_logit_softcapping, config.sliding_window) == (50.0, 30.0, 128)
    assert config.query_pre_attn_scalar == HEAD_DIM


def test_qwen3_keeps_rows_and_maps_qk_norms(tmp_path):
    weights = random_hf_weights()
    path = str(tmp_path / "qwen3.gguf")
    norms = {
        f"blk.{i}.attn_{p}_norm.weight": (np.full(HEAD_DIM, 0.5, np.float32), Q.F32) for i in range(2) for p in "qk"
    }
    write_tiny_llama(path, weights, arch="qwen3", permute=False, extra_tensors=norms)
    loaded = dict(iter_gguf_weights(path, torch.float32))
    assert torch.equal(
        loaded["model.layers.1.self_attn.k_proj.weight"], weights["model.layers.1.self_attn.k_proj.weight"]
    )
    assert torch.equal(loaded["model.layers.0.self_attn.q_norm.weight"], torch.full((HEAD_DIM,), 0.5))
    assert gguf_hf_config(path).architectures == ["Qwen3ForCausalLM"]


def _moe_metadata(expert_ffn: int | None = None) -> list:
    metadata = [lambda w: w.add_expert_count(4), lambda w: w.add_expert_used_count(2)]
    if expert_ffn is not None:
        metadata.append(lambda w: w.add_expert_feed_forward_length(expert_ffn))
    return metadata


def _stacked_experts(ffn: int) -> dict[str, tuple[np.ndarray, Q]]:
    """llama.cpp's MoE tensors for layer 0: the router and one [E, out, in] tensor per projection."""
    rng = np.random.default_rng(0)
    gate, up = rng.standard_normal((4, ffn, HIDDEN), np.float32), rng.standard_normal((4, ffn, HIDDEN), np.float32)
    down = rng.standard_normal((4, HIDDEN, ffn), np.float32)
    return {
        "blk.0.ffn_gate_inp.weight": (rng.standard_normal((4, HIDDEN), np.float32), Q.F32),
        "blk.0.ffn_gate_exps.weight": (gguf.quants.quantize(gate, Q.Q8_0), Q.Q8_0),  # quantized as a whole stack
        "blk.0.ffn_up_exps.weight": (up, Q.F32),
        "blk.0.ffn_down_exps.weight": (down, Q.F32),
    }


def _expected(tensors: dict[str, tuple[np.ndarray, Q]], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    array, qtype = tensors[name]
    return torch.from_numpy(gguf.quants.dequantize(array, qtype).copy()).reshape(shape)


def test_mixtral_is_llama_with_experts_split_per_expert(tmp_path):
    weights = random_hf_weights()
    experts = _stacked_experts(32)
    # files from before llama.cpp stacked the experts hold one tensor per expert: blk.{i}.ffn_gate.{e}.weight
    legacy = {"blk.1.ffn_up.3.weight": (np.full((32, HIDDEN), 0.25, np.float32), Q.F32)}
    path = str(tmp_path / "mixtral.gguf")
    write_tiny_llama(path, weights, extra_metadata=_moe_metadata(), extra_tensors={**experts, **legacy})
    loaded = dict(iter_gguf_weights(path, torch.float32))
    prefix = "model.layers.0.block_sparse_moe"
    assert torch.equal(loaded[f"{prefix}.gate.weight"], torch.from_numpy(experts["blk.0.ffn_gate_inp.weight"][0]))
    for proj, gguf_proj in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
        name = f"blk.0.ffn_{gguf_proj}_exps.weight"
        stack = _expected(experts, name, (4, HIDDEN, 32) if proj == "w2" else (4, 32, HIDDEN))
        for e in range(4):
            assert torch.equal(loaded[f"{prefix}.experts.{e}.{proj}.weight"], stack[e]), (proj, e)
    assert torch.equal(loaded["model.layers.1.block_sparse_moe.experts.3.w3.weight"], torch.full((32, HIDDEN), 0.25))
    # still the llama architecture: q/k rows come back from llama.cpp's order
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(loaded[name], weights[name])
    config = gguf_hf_config(path)
    assert config.model_type == "mixtral" and config.architectures == ["MixtralForCausalLM"]
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)


def test_qwen3moe_experts_router_and_config(tmp_path):
    experts = _stacked_experts(32)
    path = str(tmp_path / "qwen3moe.gguf")
    metadata = _moe_metadata(expert_ffn=32)
    write_tiny_llama(
        path, random_hf_weights(), "qwen3moe", permute=False, extra_metadata=metadata, extra_tensors=experts
    )
    loaded = dict(iter_gguf_weights(path, torch.float32))
    assert loaded["model.layers.0.mlp.gate.weight"].shape == (4, HIDDEN)
    stack = _expected(experts, "blk.0.ffn_gate_exps.weight", (4, 32, HIDDEN))
    assert torch.equal(loaded["model.layers.0.mlp.experts.2.gate_proj.weight"], stack[2])
    expert_names = {f"model.layers.0.mlp.experts.{e}.{p}.weight" for e in range(4) for p in ("up_proj", "down_proj")}
    assert expert_names <= loaded.keys()
    config = gguf_hf_config(path)
    assert config.model_type == "qwen3_moe" and config.architectures == ["Qwen3MoeForCausalLM"]
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (4, 2, 32)
    assert config.norm_topk_prob is True and config.decoder_sparse_step == 1 and config.mlp_only_layers == []


def test_tokenizer_from_metadata_matches_hf(tmp_path, monkeypatch):
    """Built from the metadata, then from lmforge's cache (the same tokenizer); a rewritten file rebuilds it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    make_tiny_tokenizer(str(tmp_path))
    model = json.loads((tmp_path / "tokenizer.json").read_text())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    special = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    metadata = [
        lambda w: w.add_tokenizer_model("gpt2"),
        lambda w: w.add_tokenizer_pre("default"),
        lambda w: w.add_token_list(tokens),
        lambda w: w.add_token_types([3 if t in special else 1 for t in tokens]),
        lambda w: w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]]),
        lambda w: w.add_chat_template(CHATML),
    ]
    path = str(tmp_path / "tok.gguf")
    write_tiny_llama(path, random_hf_weights(), extra_metadata=metadata)
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    cached_entries = []
    for attempt in ("built", "cached", "rebuilt"):
        if attempt == "rebuilt":  # the file changes (size and time): its old entry no longer applies
            write_tiny_llama(path, random_hf_weights(), extra_metadata=[*metadata, lambda w: w.add_name("v2")])
        if attempt == "cached":  # from the cache: no rebuild from the metadata
            import lmforge.weights.gguf as gguf_module

            with monkeypatch.context() as m:
                m.setattr(gguf_module, "_build_gguf_tokenizer", lambda *a: pytest.fail("rebuilt despite the cache"))
                tokenizer = gguf_tokenizer(path)
        else:
            tokenizer = gguf_tokenizer(path)
        cached_entries.append(sorted(os.listdir(tmp_path / "cache" / "lmforge" / "tokenizers")))
        for text in ["The capital of France is Paris.", "héllo wörld 你好 🙂"]:
            assert tokenizer.encode(text) == reference(text).input_ids
            assert tokenizer.decode(tokenizer.encode(text)) == text
        assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
        assert tokenizer.chat_template == CHATML
        # built by transformers; read back from the cache by lmforge's FastTokenizer
        assert type(tokenizer).__name__ == ("FastTokenizer" if attempt == "cached" else "TokenizersBackend")
    assert len(cached_entries[0]) == 1 and cached_entries[1] == cached_entries[0]
    assert len(cached_entries[2]) == 2  # a new entry for the rewritten file


def test_unsupported_quant_type_fails_before_yielding(tmp_path):
    path = str(tmp_path / "q8_1.gguf")
    q8_1_bias = np.zeros(gguf.GGML_QUANT_SIZES[Q.Q8_1][1] * 2, dtype=np.uint8)  # 64 values in two blocks
    write_tiny_llama(path, random_hf_weights(), extra_tensors={"blk.0.attn_q.bias": (q8_1_bias, Q.Q8_1)})
    with pytest.raises(WeightFileError, match=r"Q8_1") as info:
        next(iter_gguf_weights(path, torch.float32))
    assert "q8_1.gguf" in str(info.value)


def test_unknown_tensor_name_is_named(tmp_path):
    path = str(tmp_path / "odd.gguf")
    write_tiny_llama(
        path, random_hf_weights(), extra_tensors={"blk.0.mystery.weight": (np.ones(32, np.float32), Q.F32)}
    )
    with pytest.raises(WeightFileError, match="blk.0.mystery.weight"):
        next(iter_gguf_weights(path, torch.float32))


def _damaged_copies(path: str, folder) -> dict[str, str]:
    data = open(path, "rb").read()
    variants = {
        "random.gguf": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "cut-in-data.gguf": data[: len(data) * 2 // 3],
        "cut-in-header.gguf": data[:300],
        "empty.gguf": b"",
        "bad-version.gguf": data[:4] + (99).to_bytes(4, "little") + data[8:],
    }
    out = {}
    for name, payload in variants.items():
        (folder / name).write_bytes(payload)
        out[name] = str(folder / name)
    return out


@pytest.mark.parametrize("reader", ["weights", "config", "tokenizer"])
def test_damaged_files_raise_weight_file_error(tiny_llama, tmp_path, reader):
    for name, path in _damaged_copies(tiny_llama[0], tmp_path).items():
        with pytest.raises(WeightFileError, match="corrupt or truncated") as info:
            if reader == "weights":
                next(iter(iter_weights(path, progress=False)))
            elif reader == "config":
                gguf_hf_config(path)
            else:
                gguf_tokenizer(path)
        assert name in str(info.value), str(info.value)


def test_unsupported_architecture(tmp_path):
    path = str(tmp_path / "bert.gguf")
    write_tiny_llama(path, random_hf_weights(), arch="bert", permute=False)
    with pytest.raises(WeightFileError, match="'bert'.*llama"):
        gguf_hf_config(path)


@pytest.mark.gpu
def test_weights_dequantize_on_cuda(tiny_llama):
    path = tiny_llama[0]
    on_cpu = dict(iter_gguf_weights(path, torch.bfloat16))
    for name, tensor in iter_gguf_weights(path, torch.bfloat16, device="cuda"):
        assert tensor.is_cuda and torch.equal(tensor.cpu(), on_cpu[name]), name
