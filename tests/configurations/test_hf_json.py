"""The config.json reader (lmforge.configurations.hf_json) against transformers' AutoConfig: for every family it
reads, every public attribute, the aliases, the ModelConfig the builders make, and the built model's parameter
shapes and buffers (rotary tables) must be the same as with AutoConfig's config."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig

from lmforge.backends.registry import BuildContext, build_context
from lmforge.check_env.parity import tiny_hf_config
from lmforge.configurations import AutoModelConfigBuilder
from lmforge.configurations.hf_defaults import FAMILIES, TRANSFORMERS_VERSION
from lmforge.configurations.hf_json import HFConfig, can_read, hf_config_from_dict, load_hf_config_json
from lmforge.model_inputs import StepContextManager
from lmforge.models.module_map import MODULE_MAP, resolve_model_class

_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "phi": "PhiForCausalLM",
    "cohere": "CohereForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "granite": "GraniteForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_LLAMA3["original_max_position_embeddings"] = 128
# variants saved by the HF config classes (save_pretrained writes only what differs from the class defaults)
_VARIANTS = [(t, "tiny", {}) for t in FAMILIES] + [
    ("llama", "llama3-rope", {"rope_parameters": {"rope_theta": 500000.0, **_LLAMA3}, "tie_word_embeddings": True}),
    ("llama", "yarn", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}),
    ("llama", "head_dim", {"head_dim": 32, "attention_bias": True, "mlp_bias": True}),
    ("mistral", "no-window", {"sliding_window": None}),
    ("qwen2", "window-off", {"use_sliding_window": False, "sliding_window": 4096, "layer_types": None}),
    ("qwen2", "window-on", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    ("qwen3", "window-on", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}),
    ("qwen3_moe", "mlp-only", {"mlp_only_layers": [0], "norm_topk_prob": False, "decoder_sparse_step": 1}),
    ("mixtral", "window", {"sliding_window": 16, "num_experts_per_tok": 1}),
    ("phi3", "longrope", {"rope_parameters": None}),  # filled in below (factors sized to the head)
    ("gemma", "gelu", {"hidden_act": "gelu", "hidden_activation": None}),
    ("gemma2", "exact-gelu", {"hidden_activation": "gelu", "final_logit_softcapping": 30.0}),
    ("gemma3_text", "pattern", {"layer_types": None, "rope_parameters": None}),
    ("gemma3_text", "bidirectional", {"use_bidirectional_attention": True, "sliding_window": 9}),
    ("deepseek_v3", "yarn", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0}}),
]
# raw config.json dicts as checkpoints of older transformers versions write them (legacy keys, fields omitted)
_RAW = {
    "llama-legacy-rope": {
        "model_type": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "max_length": 20,
    },
    "llama-llama3": {"model_type": "llama", "rope_theta": 500000.0, "rope_scaling": dict(_LLAMA3, factor=32.0)},
    "mistral-minimal": {"model_type": "mistral", "sliding_window": 4096, "torch_dtype": "float16"},
    "qwen2-legacy": {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 131072, "rope_theta": 1e6},
    "qwen2-sliding": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
    "qwen3_moe-minimal": {"model_type": "qwen3_moe", "rope_theta": 1e6, "sliding_window": None},
    "mixtral-minimal": {"model_type": "mixtral", "num_local_experts": 4},
    "phi3-su": {"model_type": "phi3", "rope_scaling": None, "original_max_position_embeddings": 128},
    "gemma-gelu": {"model_type": "gemma", "hidden_act": "gelu", "head_dim": 16},
    "gemma2-minimal": {"model_type": "gemma2", "query_pre_attn_scalar": 16, "head_dim": 16},
    "gemma3-legacy": {
        "model_type": "gemma3_text",
        "rope_theta": 1e6,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window_pattern": 2,
    },
    "deepseek-minimal": {"model_type": "deepseek_v3", "rope_scaling": {"type": "yarn", "factor": 40.0}},
    "phi-minimal": {"model_type": "phi", "rope_theta": 10000.0},
    "stablelm-minimal": {"model_type": "stablelm"},
    "gpt2-aliases": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4},
    "id2label": {"model_type": "llama", "id2label": {"0": "a", "1": "b", "2": "c"}},
    "llama-awq": {
        "model_type": "llama",
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True},
    },
}
_TINY_SIZES = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16
)


def _hf_variant(model_type: str, variant: str, overrides: dict):
    if model_type not in _ARCH:
        pytest.fail(f"add {model_type} to _ARCH in this test")
    overrides = dict(overrides)
    if (model_type, variant) == ("phi3", "longrope"):
        half = 8
        overrides["rope_parameters"] = {
            "rope_type": "longrope",
            "short_factor": [1.0] * half,
            "long_factor": [2.0] * half,
            "original_max_position_embeddings": 128,
        }
        overrides["original_max_position_embeddings"] = 128
    config = tiny_hf_config(model_type, **overrides)
    config.architectures = [_ARCH[model_type]]
    return config


def _raw_dict(raw: dict) -> dict:
    d = dict(raw)
    if d["model_type"] not in ("gpt2",):
        for key, value in _TINY_SIZES.items():
            d.setdefault(key, value)
        if d["model_type"] == "deepseek_v3":
            d.update(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, moe_intermediate_size=32)
            d.update(q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
            d.update(first_k_dense_replace=1, num_key_value_heads=4)
        if d["model_type"] in ("mixtral", "qwen3_moe"):
            d.update(num_experts_per_tok=2, num_local_experts=4, moe_intermediate_size=32, num_experts=4)
    d.setdefault("architectures", [_ARCH[d["model_type"]]])
    return d


_MISSING = object()


def _public(config) -> dict:
    return {k: v for k, v in vars(config).items() if not k.startswith("_") and k != "model_type"}


def _compare(hf, ours: HFConfig) -> None:
    assert isinstance(ours, HFConfig)
    assert ours.model_type == hf.model_type
    hf_attrs, our_attrs = _public(hf), _public(ours)
    assert sorted(our_attrs) == sorted(hf_attrs)
    for key, value in hf_attrs.items():
        assert our_attrs[key] == value, key
        assert type(our_attrs[key]) is type(value), key
    aliases = ["rope_scaling", "torch_dtype", "num_labels", "name_or_path", *FAMILIES[hf.model_type]["attribute_map"]]
    for alias in aliases:
        assert getattr(ours, alias, _MISSING) == getattr(hf, alias, _MISSING), alias
    assert ours.to_dict() == hf.to_dict()
    json.dumps(ours.to_dict())
    for missing in ("no_such_field", "rope_theta", "use_bidirectional_attention_x"):
        assert hasattr(ours, missing) == hasattr(hf, missing), missing


def _model_summary(hf_config) -> tuple[dict, dict]:
    model_config = AutoModelConfigBuilder.build(hf_config)
    fields = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config) if f.name != "hf_config"}
    if model_config.model_arch not in MODULE_MAP:
        return fields, {}
    model_cls = resolve_model_class(model_config.model_arch)
    ctx = BuildContext(device_type="cpu", device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(0)
    with build_context(ctx):
        model = model_cls(hf_config, StepContextManager(), dtype=torch.float32, device=torch.device("cpu"))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    shapes["tie_word_embeddings"] = bool(getattr(model, "tie_word_embeddings", False))
    state = {}
    for name, module in model.named_modules():
        for attr in ("sliding_window", "scale", "logit_softcapping", "top_k", "norm_topk_prob", "approximate"):
            value = getattr(getattr(module, "options", module), attr, None)
            if value is not None and not isinstance(value, (torch.Tensor, torch.nn.Module)):
                state[f"{name}.{attr}"] = value
    return fields, {"shapes": shapes, "state": state, "buffers": dict(model.named_buffers())}


def _assert_same_model(hf, ours) -> None:
    hf_fields, hf_model = _model_summary(hf)
    our_fields, our_model = _model_summary(ours)
    assert our_fields == hf_fields
    assert our_model.keys() == hf_model.keys()
    if hf_model:
        assert our_model["shapes"] == hf_model["shapes"]
        assert our_model["state"] == hf_model["state"]
        assert our_model["buffers"].keys() == hf_model["buffers"].keys()
        for name, buffer in hf_model["buffers"].items():
            torch.testing.assert_close(our_model["buffers"][name], buffer, rtol=0, atol=0, msg=name)


def test_defaults_table_is_the_installed_transformers():
    import transformers

    assert transformers.__version__ == TRANSFORMERS_VERSION, "regenerate with tools/gen_hf_config_defaults.py"
    for model_type, family in FAMILIES.items():
        cls = type(AutoConfig.for_model(model_type))
        defaults = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
            else:
                defaults[f.name] = None
        assert family["fields"] == defaults, model_type
        assert family["attribute_map"] == dict(cls.attribute_map), model_type


@pytest.mark.parametrize(("model_type", "variant", "overrides"), _VARIANTS, ids=[f"{t}-{v}" for t, v, _ in _VARIANTS])
def test_saved_config_matches_autoconfig(tmp_path, model_type, variant, overrides):
    _hf_variant(model_type, variant, overrides).save_pretrained(tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    ours = load_hf_config_json(str(tmp_path))
    _compare(hf, ours)
    _assert_same_model(hf, ours)


@pytest.mark.parametrize("name", sorted(_RAW))
def test_raw_config_json_matches_autoconfig(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(_raw_dict(_RAW[name])))
    hf = AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    ours = load_hf_config_json(str(tmp_path))
    _compare(hf, ours)
    _assert_same_model(hf, ours)


@pytest.mark.parametrize("name", sorted(_RAW))
def test_dict_matches_autoconfig_for_model(name):
    """The GGUF path: a config dict made from the file's metadata, as AutoConfig.for_model would take it."""
    d = _raw_dict(_RAW[name])
    hf = AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})
    _compare(hf, hf_config_from_dict(d))


def test_every_builtin_architecture_is_read_without_transformers():
    covered = set(_ARCH.values())
    assert set(MODULE_MAP) <= covered, f"families without a test here: {sorted(set(MODULE_MAP) - covered)}"
    for model_type, arch in _ARCH.items():
        if arch in MODULE_MAP:
            assert can_read({"model_type": model_type, "architectures": [arch]}), model_type


def test_what_needs_transformers_goes_to_autoconfig(tmp_path):
    assert not can_read({"model_type": "bert"})
    assert not can_read({"model_type": "llama", "auto_map": {"AutoConfig": "x.Config"}})
    assert not can_read({"model_type": "llama", "text_config": {"model_type": "llama"}})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}}))
    assert load_hf_config_json(str(tmp_path)) is None
    with pytest.raises(ValueError, match="bert"):
        hf_config_from_dict({"model_type": "bert"})


def test_a_transformers_4_install_goes_to_autoconfig(monkeypatch):
    from lmforge.configurations import hf_json

    monkeypatch.setattr(hf_json.importlib.metadata, "version", lambda name: "4.57.1")
    hf_json._same_transformers_generation.cache_clear()
    try:
        assert not can_read({"model_type": "llama"})
    finally:
        monkeypatch.undo()
        hf_json._same_transformers_generation.cache_clear()
    assert can_read({"model_type": "llama"})


def test_broken_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_hf_config_json(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_hf_config_json(str(tmp_path))
