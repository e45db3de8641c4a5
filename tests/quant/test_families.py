"""Every built-in family (dense and MoE) loads an int4 (GPTQ, AutoGPTQ's packer) and an FP8 (HF fine-grained,
block 16x16) checkpoint of itself through its unchanged model file, and matches the dequantized HF model:
1e-4 for int4 (exact fp32 dequantization), 1e-3 for FP8, whose reference fake-quantizes every quantized
matmul's input per token and 16-channel group as the scheme does (MoE experts included)."""

from __future__ import annotations

import pytest

from lmforge.check_env.parity import engine_vs_hf
from lmforge.models.module_map import MODULE_MAP
from tests.models.conftest import cpu_config
from tests.quant import writers
from tests.quant.conftest import PROMPTS, fake_quant_activations, tiny_model

FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "PhiForCausalLM": "phi",
    "CohereForCausalLM": "cohere",
    "GPT2LMHeadModel": "gpt2",
    "GraniteForCausalLM": "granite",
    "StableLmForCausalLM": "stablelm",
    "Olmo2ForCausalLM": "olmo2",
}


def test_every_registered_family_is_covered():
    assert set(FAMILIES) == set(MODULE_MAP)


# AutoGPTQ packs qzeros in whole 32-column blocks: DeepSeek's kv_a_proj (kv_lora_rank + rope dim, 576 in the real
# model) must be a multiple of 32 here too
OVERRIDES = {"deepseek_v3": dict(qk_rope_head_dim=32, head_dim=32)}


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
@pytest.mark.parametrize("family", sorted(set(FAMILIES.values())))
def test_family_loads_quantized_checkpoint(family, fmt, tmp_path):
    if family == "gpt2" and fmt == "fp8":
        pytest.skip("HF's FP8 leaves GPT-2's Conv1D layers dense: there are no FP8 GPT-2 checkpoints to load")
    model = tiny_model(family, **OVERRIDES.get(family, {}))
    model.config._experts_implementation = "eager"  # HF 5's per-expert F.linear, which the FP8 reference patches
    path = str(tmp_path / f"{family}-{fmt}")
    if fmt == "int4":
        writers.write_gptq(model, path, bits=4, group_size=32)
        result = engine_vs_hf(path, PROMPTS, 3, hf_model=model.eval(), backend_config=cpu_config())
        result.tolerance = 1e-4
    else:
        storages = writers.write_hf_fp8(model, path, block=(16, 16))
        # DeepSeek's MLA reads kv_b_proj's (dequantized) weight and absorbs it: no activation is quantized there
        storages -= {
            m.kv_b_proj.weight.untyped_storage().data_ptr() for m in model.modules() if hasattr(m, "kv_b_proj")
        }
        with fake_quant_activations(storages, "fp8", group=16):
            result = engine_vs_hf(path, PROMPTS, 3, hf_model=model.eval(), backend_config=cpu_config())
        result.tolerance = 1e-3
    assert result.passed, result.table()


@pytest.mark.parametrize("scheme", ["w4a16", "fp8_dynamic"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_moe_family_loads_compressed_tensors_experts(family, scheme, tmp_path):
    """compressed-tensors int4 / FP8 experts (packed with compressed-tensors' own helpers)."""
    model = tiny_model(family)
    model.config._experts_implementation = "eager"
    path = str(tmp_path / f"{family}-{scheme}")
    storages = writers.write_ct_per_expert(model, path, scheme)
    if scheme == "w4a16":
        result = engine_vs_hf(path, PROMPTS, 3, hf_model=model.eval(), backend_config=cpu_config())
        result.tolerance = 1e-4
    else:
        storages -= {
            m.kv_b_proj.weight.untyped_storage().data_ptr() for m in model.modules() if hasattr(m, "kv_b_proj")
        }
        with fake_quant_activations(storages, "fp8"):
            result = engine_vs_hf(path, PROMPTS, 3, hf_model=model.eval(), backend_config=cpu_config())
        result.tolerance = 1e-3
    assert result.passed, result.table()
