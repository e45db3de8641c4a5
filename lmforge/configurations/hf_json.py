"""An HF config read from config.json (or a GGUF file's metadata) without importing transformers.

`import transformers` plus the AutoConfig chain cost seconds of every engine start (6.7 s of 7.6 s on an H200 box).
For the families in `hf_defaults.FAMILIES` this module does what the HF config class would: the class's field
defaults, its attribute_map aliases, its `__post_init__` normalisations (head_dim and num_key_value_heads defaults,
Qwen's sliding window only under use_sliding_window, layer_types, Gemma's hidden_act, partial_rotary_factor
defaults) and the rope standardisation (legacy rope_scaling / rope_theta into rope_parameters). Any other
model_type, remote code, a config with sub-configs, or a transformers 4 install goes through AutoConfig as before.
The defaults table is generated from one transformers 5 release (tools/gen_hf_config_defaults.py) and used with any
5.x; tests/configurations/test_hf_json.py holds it to the installed transformers and compares every attribute,
to_dict and the built model with AutoConfig's for each family.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import os
from typing import Any

from .hf_defaults import FAMILIES, TRANSFORMERS_VERSION

# keys HF pops from the kwargs of a config (generation settings belong to generation_config.json)
_GENERATION_KEYS = frozenset(
    "max_length min_length do_sample early_stopping num_beams temperature top_k top_p typical_p repetition_penalty "
    "length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences "
    "output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values "
    "exponential_decay_length_penalty suppress_tokens begin_suppress_tokens num_beam_groups diversity_penalty "
    "use_cache".split()
)
_LEGACY_LAYER_TYPES = {"sliding": "sliding_attention", "full": "full_attention", "attention": "full_attention"}
_SCALED_ROPE_TYPES = ("llama3", "yarn", "longrope")


class HFConfig:
    """Attribute access like a transformers PretrainedConfig: the normalised fields, the family's attribute_map
    aliases, `rope_scaling` (transformers 5's alias of rope_parameters) and `torch_dtype` (of dtype)."""

    def __init__(self, model_type: str, attrs: dict[str, Any], attribute_map: dict[str, str]):
        object.__setattr__(self, "_attribute_map", dict(attribute_map))
        object.__setattr__(self, "model_type", model_type)
        for key, value in attrs.items():
            setattr(self, key, value)

    def __getattr__(self, name: str) -> Any:  # only called when normal lookup fails
        aliases = {"rope_scaling": "rope_parameters", "torch_dtype": "dtype", **self._attribute_map}
        if name in aliases:
            return getattr(self, aliases[name])
        raise AttributeError(f"{self.model_type} config has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        name = {"rope_scaling": "rope_parameters", "torch_dtype": "dtype"}.get(name, name)
        object.__setattr__(self, self._attribute_map.get(name, name), value)

    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    @property
    def num_labels(self) -> int | None:
        return len(self.id2label) if self.id2label is not None else None

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> HFConfig:
        return self

    def to_dict(self) -> dict[str, Any]:
        """What PretrainedConfig.to_dict gives: JSON-ready (dtype as a string), with model_type and
        transformers_version (the version hf_defaults was generated from, which the tests hold to the installed)."""
        out = {k: _lists(copy.deepcopy(v)) for k, v in vars(self).items() if k != "_attribute_map"}
        out.pop("ignore_keys_at_rope_validation", None)
        out.update(model_type=self.model_type, transformers_version=TRANSFORMERS_VERSION, output_attentions=False)
        if self.model_type == "gemma3_text" and out.get("use_bidirectional_attention"):
            out["sliding_window"] = (out["sliding_window"] - 1) * 2  # undoes the post-init's exclusive bound
        if out.get("dtype") is not None and not isinstance(out["dtype"], (str, int)):
            out["dtype"] = str(out["dtype"]).removeprefix("torch.")
        return out

    def __repr__(self) -> str:
        return f"HFConfig({self.model_type}, {json.dumps(self.to_dict(), default=str)})"


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, tuple) else value


@functools.cache
def _same_transformers_generation() -> bool:
    """The table is transformers 5's dataclass configs; a transformers 4 install normalises differently (rope_scaling
    kept as is, other defaults), so there AutoConfig answers. Read from the package metadata, not by importing it."""
    try:
        installed = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return True
    return installed.split(".")[0] == TRANSFORMERS_VERSION.split(".")[0]


def can_read(config_dict: dict) -> bool:
    """Whether `config_dict` can be read here exactly; otherwise the caller uses AutoConfig."""
    family = FAMILIES.get(config_dict.get("model_type"))
    if family is None or "auto_map" in config_dict or not _same_transformers_generation():
        return False
    # sub-configs (text_config, vision_config, ...) are config objects in HF: leave them to transformers
    return not any(isinstance(v, dict) and "model_type" in v for v in config_dict.values())


def read_config_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        try:
            config_dict = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot read {path}: not valid JSON ({e})") from e
    if not isinstance(config_dict, dict):
        raise ValueError(f"cannot read {path}: expected a JSON object, got {type(config_dict).__name__}")
    return config_dict


def hf_config_from_dict(config_dict: dict, name_or_path: str = "") -> HFConfig:
    """The config that `AutoConfig.for_model(model_type, **rest)` would build (from_pretrained's, with the folder
    as name_or_path), for a model_type `can_read` accepts."""
    if not can_read(config_dict):
        raise ValueError(f"model_type {config_dict.get('model_type')!r} is not read without transformers")
    config_dict = copy.deepcopy(config_dict)
    model_type = config_dict.pop("model_type")
    family = FAMILIES[model_type]
    fields, attribute_map = family["fields"], family["attribute_map"]
    attrs = {name: copy.deepcopy(default) for name, default in fields.items()}
    kwargs = {}
    for key, value in config_dict.items():
        if key in fields:
            attrs[key] = value
        else:
            kwargs[key] = value
    config = HFConfig(model_type, attrs, attribute_map)
    if name_or_path:
        kwargs["name_or_path"] = name_or_path
    _POST_INIT.get(model_type, _post_init_default)(config, kwargs)
    _base_post_init(config, kwargs, family, model_type)
    return config


def load_hf_config_json(folder: str) -> HFConfig | None:
    """The folder's config.json read here, or None when it needs transformers (see `can_read`)."""
    config_dict = read_config_json(os.path.join(folder, "config.json"))
    return hf_config_from_dict(config_dict, folder) if can_read(config_dict) else None


# --- what each HF config class does in __post_init__ before the base class's -------------------------------------


def _kv_heads(c: HFConfig) -> None:
    if c.num_key_value_heads is None:
        c.num_key_value_heads = c.num_attention_heads


def _post_init_default(c: HFConfig, kwargs: dict) -> None:
    if "num_key_value_heads" in vars(c):
        _kv_heads(c)


def _llama(c: HFConfig, kwargs: dict) -> None:  # llama, mistral, granite's head_dim rule
    if c.head_dim is None:
        c.head_dim = c.hidden_size // c.num_attention_heads
    _kv_heads(c)


def _qwen(c: HFConfig, kwargs: dict) -> None:
    c.sliding_window = c.sliding_window if c.use_sliding_window else None
    _kv_heads(c)
    if c.layer_types is None:
        c.layer_types = [
            "sliding_attention" if c.sliding_window is not None and i >= c.max_window_layers else "full_attention"
            for i in range(c.num_hidden_layers)
        ]


def _qwen3_moe(c: HFConfig, kwargs: dict) -> None:
    c.sliding_window = c.sliding_window if c.use_sliding_window else None
    c.mlp_only_layers = [] if c.mlp_only_layers is None else c.mlp_only_layers


def _gemma(c: HFConfig, kwargs: dict) -> None:
    if c.hidden_act == "gelu":  # released configs say gelu but mean the tanh approximation (HF rewrites it)
        c.hidden_act = "gelu_pytorch_tanh"


def _gemma2(c: HFConfig, kwargs: dict) -> None:
    if c.layer_types is None:
        c.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(c.num_hidden_layers)]


def _gemma3_text(c: HFConfig, kwargs: dict) -> None:
    if c.use_bidirectional_attention:
        c.sliding_window = (c.sliding_window // 2) + 1
    pattern = kwargs.get("sliding_window_pattern", 6)
    object.__setattr__(c, "_sliding_window_pattern", pattern)
    if c.layer_types is None:
        c.layer_types = [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(c.num_hidden_layers)
        ]


def _deepseek_v3(c: HFConfig, kwargs: dict) -> None:
    _kv_heads(c)
    c.qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
    c.head_dim = c.qk_rope_head_dim


def _partial_rotary(default: float):
    def post_init(c: HFConfig, kwargs: dict) -> None:
        if "num_key_value_heads" in vars(c):
            _kv_heads(c)
        kwargs.setdefault("partial_rotary_factor", default)

    return post_init


_POST_INIT = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _qwen,
    "qwen3": _qwen,
    "qwen3_moe": _qwen3_moe,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "deepseek_v3": _deepseek_v3,
    "phi": _partial_rotary(0.5),
    "stablelm": _partial_rotary(0.25),
}


# --- PreTrainedConfig.__post_init__ ----------------------------------------------------------------------------------


def _base_post_init(c: HFConfig, kwargs: dict, family: dict, model_type: str) -> None:
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None and c.dtype is None:
        c.dtype = torch_dtype
    if isinstance(c.dtype, str):
        import torch

        c.dtype = getattr(torch, c.dtype)
    if c.id2label is None:
        num_labels = kwargs.get("num_labels", 2)
        c.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        c.label2id = {f"LABEL_{i}": i for i in range(num_labels)}
    else:
        c.id2label = {int(k): v for k, v in c.id2label.items()}
    kwargs.pop("num_labels", None)
    if "rope_parameters" in vars(c):
        if model_type == "gemma3_text":
            _gemma3_rope(c, kwargs, family)
        elif model_type == "phi3":
            _phi3_rope(c, kwargs)
        else:
            _convert_rope(c, kwargs, family)
    for key in _GENERATION_KEYS:
        kwargs.pop(key, None)
    object.__setattr__(c, "_name_or_path", str(kwargs.pop("name_or_path", "")))
    for key in ("_commit_hash", "output_attentions", "attn_implementation", "experts_implementation"):
        kwargs.pop(key, None)
    if "per_layer_config" in kwargs:
        raise ValueError("per_layer_config (heterogeneous layers) is read by transformers only")
    for key, value in kwargs.items():
        if key not in ("_attn_implementation_internal", "_experts_implementation_internal"):
            setattr(c, key, value)
    for key in ("layer_types", "mtp_layer_types"):
        if getattr(c, key, None) is not None:
            setattr(c, key, [_LEGACY_LAYER_TYPES.get(t, t) for t in getattr(c, key)])


def _nested_rope_keys(c: HFConfig, params: dict) -> list[str]:
    labels = getattr(c, "layer_types", None) or ()
    return [key for key in params if key in labels]


def _convert_rope(c: HFConfig, kwargs: dict, family: dict) -> None:
    c.rope_parameters = kwargs.pop("rope_scaling", None) or c.rope_parameters
    if c.rope_parameters is None:
        c.rope_parameters = {}
    rope_theta = kwargs.pop("rope_theta", vars(c).get("rope_theta", family["default_theta"]))
    partial = kwargs.pop("partial_rotary_factor", vars(c).get("partial_rotary_factor"))
    nested = [c.rope_parameters[k] for k in _nested_rope_keys(c, c.rope_parameters)] or [c.rope_parameters]
    for params in nested:
        if params is None:
            continue
        params.setdefault("rope_theta", rope_theta)
        if partial is not None:
            params.setdefault("partial_rotary_factor", partial)
    if partial is not None:
        ignore = vars(c).get("ignore_keys_at_rope_validation") or []
        object.__setattr__(c, "ignore_keys_at_rope_validation", set(ignore) | {"partial_rotary_factor"})
    _standardize_rope(c, family)


def _gemma3_rope(c: HFConfig, kwargs: dict, family: dict) -> None:
    rope_scaling = kwargs.pop("rope_scaling", None)
    if c.rope_parameters is None:
        c.rope_parameters = {"sliding_attention": {"rope_type": "default"}, "full_attention": {"rope_type": "default"}}
    if rope_scaling is not None:
        c.rope_parameters["full_attention"].update(rope_scaling)
    if c.rope_parameters.get("full_attention") is None:
        c.rope_parameters["full_attention"] = {"rope_type": "default"}
    theta = kwargs.pop("rope_theta", family["default_theta"]["global"])
    c.rope_parameters["full_attention"].setdefault("rope_theta", theta)
    if c.rope_parameters.get("sliding_attention") is None:
        c.rope_parameters["sliding_attention"] = {"rope_type": "default"}
    c.rope_parameters["sliding_attention"].setdefault(
        "rope_theta", kwargs.pop("rope_local_base_freq", family["default_theta"]["local"])
    )
    _standardize_rope(c, family)


def _phi3_rope(c: HFConfig, kwargs: dict) -> None:
    c.rope_parameters = kwargs.pop("rope_scaling", None) or c.rope_parameters
    if c.rope_parameters is None:
        c.rope_parameters = {}
    c.rope_parameters.setdefault("rope_theta", kwargs.pop("rope_theta", 10_000.0))
    c.rope_parameters.setdefault("partial_rotary_factor", kwargs.get("partial_rotary_factor", 1.0))
    _standardize_rope(c, FAMILIES["phi3"])
    if c.rope_parameters.get("rope_type") in ("su", "yarn"):
        c.rope_parameters["rope_type"] = "longrope"


def _standardize_rope(c: HFConfig, family: dict) -> None:
    rope_theta = vars(c).get("rope_theta")
    partial = vars(c).get("partial_rotary_factor")
    params = c.rope_parameters or {}
    nested = _nested_rope_keys(c, params)
    if not (params or rope_theta):
        return
    for p in [params[k] for k in nested] if nested else [params]:
        if p is None:
            continue
        p.setdefault("rope_type", p.get("type", "default"))
        p.setdefault("rope_theta", rope_theta)
        if partial is not None:
            p.setdefault("partial_rotary_factor", partial)
        if family["default_rope_type"] != "default" and p["rope_type"] == "default":
            p["rope_type"] = family["default_rope_type"]
        if p["rope_type"] in _SCALED_ROPE_TYPES:
            if not nested and "original_max_position_embeddings" in vars(c):
                p["original_max_position_embeddings"] = c.original_max_position_embeddings
            else:
                p.setdefault("original_max_position_embeddings", c.max_position_embeddings)
    c.rope_parameters = params
