"""GGUF blocks kept packed on CPU: the int4 planes against gguf's own dequantize, and the packed matmul against
the dequantized float32 reference."""

import gguf
import numpy as np
import pytest
import torch

from lmforge.backends.cpu.quant import dequantize_wna16, wna16_linear, wna16_prepare
from lmforge.weights.gguf_pack import PLANES, int4_planes, pack_gptq_order, unpack_pairs

Q = gguf.GGMLQuantizationType
# byte offsets of each type's float16 fields (d, and dmin/m where it has one)
_HALVES = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2)}


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random stored bytes of a [rows, cols] tensor: every bit pattern of the codes and sub-block scales, with
    finite float16 scales (of both signs for the mins)."""
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for i, offset in enumerate(_HALVES[qtype]):
        values = rng.uniform(0.01, 0.1, size=len(blocks)) * (1 if i == 0 else rng.choice([-1, 1], len(blocks)))
        blocks[:, offset : offset + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(PLANES), ids=lambda t: t.name)
def test_int4_planes_reproduce_gguf_dequantize_exactly(qtype, cpu_kernel_mode):
    """Both ways of reordering ggml's nibbles (the CPU kernels' one pass, torch's 64-bit-word ops) are exact."""
    rows, cols = 16, 512
    stored = random_blocks(qtype, rows, cols)
    reference = torch.from_numpy(gguf.quants.dequantize(stored, qtype)).reshape(rows, cols)
    pairs, scales, mins = int4_planes(torch.from_numpy(stored).flatten(), qtype, (rows, cols))
    planes = PLANES[qtype]
    assert pairs.shape == (rows, planes * cols // 2) and pairs.dtype == torch.uint8
    codes = unpack_pairs(pairs)
    groups = torch.arange(planes * cols) // 32
    w = codes.float() * scales[:, groups] + mins[:, groups]
    torch.testing.assert_close(w.view(rows, planes, cols).sum(1), reference, rtol=0, atol=0)


@pytest.mark.parametrize("qtype", list(PLANES), ids=lambda t: t.name)
def test_packed_matmul_matches_the_dequantized_float32_reference(qtype, cpu_kernel_mode):
    n, k = 48, 256
    stored = random_blocks(qtype, n, k, seed=1)
    w = torch.from_numpy(gguf.quants.dequantize(stored, qtype)).reshape(n, k)
    pairs, scales, mins = int4_planes(torch.from_numpy(stored).flatten(), qtype, (n, k))
    canonical = dict(
        qweight=pack_gptq_order(pairs),
        scales=scales.t().contiguous(),
        zeros=None,
        mins=mins.t().contiguous(),
        bits=4,
        group_size=32,
        planes=PLANES[qtype],
        compute_dtype=torch.bfloat16,
    )
    torch.testing.assert_close(dequantize_wna16(**canonical), w, rtol=0, atol=0)  # the canonical form is exact
    prepared = wna16_prepare(**canonical)
    bias = torch.randn(n)
    # lmforge's kernel keeps float32 activations; torch's int4 kernel runs bf16 activations and bf16 group scales
    # and offsets (~2^-8 of the output's scale)
    assert ("q4" if cpu_kernel_mode == "kernels" else "int4pack") in prepared
    if cpu_kernel_mode == "kernels":  # two planes (5- and 8-bit types) run as one byte code per weight
        assert prepared["q4_bits"] == (8 if PLANES[qtype] == 2 else 4)
    atol = 1e-5 if cpu_kernel_mode == "kernels" else 1e-2
    for rows in (1, 3, 4, 5, 9, 33):  # the kernel's register path (<= 4 rows), its row-buffer path, their mixes
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        y = wna16_linear(x, prepared, bias)
        assert y.dtype == torch.float32
        expected = x @ w.t() + bias
        torch.testing.assert_close(y, expected, rtol=0, atol=atol * float(expected.abs().max()))
    reference = wna16_linear(x, wna16_prepare(**canonical, reference=True), bias)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)


# every linear layer packable: one-plane (Q4_0, Q4_1) and two-plane (Q5_0, Q5_1, Q8_0) types, q/k/v and gate/up
# merged with equal plane counts
PACKED_TYPES = [
    {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q4_0, "attn_output": Q.Q8_0, "ffn_gate": Q.Q5_0,
     "ffn_up": Q.Q5_1, "ffn_down": Q.Q8_0},
    {"attn_q": Q.Q8_0, "attn_k": Q.Q5_0, "attn_v": Q.Q5_1, "attn_output": Q.Q4_1, "ffn_gate": Q.Q4_0,
     "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0},
]  # fmt: skip


def _tokenizer(folder) -> list:
    """GGUF metadata of the tests' tiny byte-level BPE tokenizer (the engine builds a tokenizer at start-up)."""
    import json

    from tests.conftest import make_tiny_tokenizer

    make_tiny_tokenizer(str(folder))
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    return [
        lambda w: w.add_tokenizer_model("gpt2"),
        lambda w: w.add_token_list(tokens),
        lambda w: w.add_token_types([1] * len(tokens)),
        lambda w: w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]]),
    ]


def _packed_layers(engine) -> dict[str, str]:
    return {
        name: m.quant.scheme.fmt
        for name, m in engine.model.named_modules()
        if getattr(m, "quant", None) is not None and ("int4pack" in m.quant.prepared or "q4" in m.quant.prepared)
    }


@pytest.mark.parametrize(
    "case", ["all_packed_tied", "mixed_types"]
)  # mixed: F16/BF16/F32 layers and q/k/v parts of different plane counts stay dense
def test_engine_on_packed_gguf_matches_hf_on_the_dequantized_file(case, tmp_path, cpu_kernel_mode):
    from transformers import AutoModelForCausalLM

    from lmforge.check_env.parity import engine_vs_hf
    from lmforge.messages import PytorchEngineConfig
    from tests.weights.tiny_gguf import random_hf_weights, write_tiny_llama

    tied = case == "all_packed_tied"
    path = str(tmp_path / "tiny.gguf")
    # a model's scale, not randn's, except q/k: peaked attention, so that q/k rows in the wrong order would show
    weights = {k: v * (0.5 if "q_proj" in k or "k_proj" in k else 0.1) for k, v in random_hf_weights(tied=tied).items()}
    write_tiny_llama(path, weights, layer_types=PACKED_TYPES if tied else None, extra_metadata=_tokenizer(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    # a float32 KV cache: this test checks the packed weights, to float32 rounding (dtype auto's float16 cache would
    # add its own ~2^-11 relative rounding of every key and value; tests/models/test_default_model.py runs that)
    cfg = PytorchEngineConfig(
        device_type="cpu", dtype="auto", block_size=4, num_cpu_blocks=128, kv_cache_dtype="float32"
    )
    from lmforge.engine.engine import Engine

    engine = Engine(path, cfg)
    try:
        packed = _packed_layers(engine)
        if tied:
            assert len(packed) == 2 * 4 + 1 and "lm_head" in packed  # qkv, o, gate_up, down per layer; lm_head
        else:  # layer 0: o (Q5_0), down (Q5_1); layer 1: o (Q4_0); the rest is dense
            want = {
                "model.layers.0.self_attn.o_proj",
                "model.layers.0.mlp.down_proj",
                "model.layers.1.self_attn.o_proj",
            }
            assert set(packed) == want
        prompts = [[5, 17, 3, 9, 44, 100, 7], [250, 1, 2, 3]]
        res = engine_vs_hf(path, prompts, 4, hf_model=hf, engine=engine)
    finally:
        engine.close()
    with torch.no_grad():
        scale = max(float(hf(torch.tensor([prompts[0]])).logits.abs().max()), 1.0)
    print(f"packed GGUF vs HF: max |logit diff| {res.max_abs_diff:.3g}, logit scale {scale:.3g}")
    # lmforge's kernels: float32 throughout. torch's int4 kernel: bf16 activations in the packed matmuls (~2^-8
    # relative each): measured 2e-3 / 4e-4 at a logit scale of ~1, 1.2e-2 with the q/k rows in llama.cpp's order
    tolerance = 1e-4 if cpu_kernel_mode == "kernels" else 6e-3
    assert res.max_abs_diff < tolerance * scale, res.table()


def test_packed_tensors_of_the_loader_are_its_dequantized_weights_exactly(tmp_path):
    """iter_gguf_weights with gguf_pack_plan's plan: every packed module's canonical tensors dequantize to the very
    weight the dense path yields (q/k rows un-permuted, merged parts, the tied lm_head from token_embd)."""
    from lmforge.models.base import CausalLM
    from lmforge.weights.gguf import gguf_pack_plan, iter_gguf_weights
    from tests.weights.tiny_gguf import random_hf_weights, write_tiny_llama

    path = str(tmp_path / "tiny.gguf")
    write_tiny_llama(path, random_hf_weights(tied=True), layer_types=PACKED_TYPES)
    plan, dense = gguf_pack_plan(path, CausalLM.packed_modules_mapping, tie_word_embeddings=True)
    assert len(plan) == 2 * 7 + 1 and not dense and plan["lm_head"] == "Q8_0"
    reference = dict(iter_gguf_weights(path, torch.float32))
    reference["lm_head.weight"] = reference["model.embed_tokens.weight"]
    packed = dict(iter_gguf_weights(path, torch.float32, packed=plan))
    assert "model.embed_tokens.weight" in packed  # the embedding itself stays dense for the lookup
    for module, type_name in plan.items():
        assert f"{module}.weight" not in packed
        w = dequantize_wna16(
            packed[f"{module}.qweight"],
            packed[f"{module}.scales"],
            None,
            4,
            32,
            mins=packed[f"{module}.mins"],
            planes=PLANES[Q[type_name]],
        )
        torch.testing.assert_close(w, reference[f"{module}.weight"], rtol=0, atol=0, msg=module)


def test_merged_parts_of_different_plane_counts_stay_dense(tmp_path):
    from lmforge.models.base import CausalLM
    from lmforge.weights.gguf import gguf_pack_plan
    from tests.weights.tiny_gguf import random_hf_weights, write_tiny_llama

    path = str(tmp_path / "mixed.gguf")
    write_tiny_llama(path, random_hf_weights())  # tiny_gguf.LAYER_TYPES: a mixed-type file
    plan, dense = gguf_pack_plan(path, CausalLM.packed_modules_mapping, tie_word_embeddings=False)
    # layer 0: q Q4_0 (1 plane), k Q8_0 (2), v Q4_1 (1): qkv dense; layer 1: gate Q4_1 + up Q8_0 dense; F16 lm_head
    assert plan == {
        "model.layers.0.self_attn.o_proj": "Q5_0",
        "model.layers.0.mlp.down_proj": "Q5_1",
        "model.layers.1.self_attn.o_proj": "Q4_0",
    }
    assert dense["model.layers.0.self_attn.k_proj"] == "Q8_0" and dense["lm_head"] == "F16"
