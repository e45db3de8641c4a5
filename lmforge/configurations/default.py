"""Fallback builder: reads the field names most HF decoder configs share."""

from __future__ import annotations

from lmforge.config import ModelConfig

from .builder import AutoModelConfigBuilder


def _get(hf_config, *names, default=None):
    for name in names:
        value = getattr(hf_config, name, None)
        if value is not None:
            return value
    return default


class DefaultModelConfigBuilder(AutoModelConfigBuilder):
    is_default = True

    @classmethod
    def condition(cls, hf_config) -> bool:
        return True

    @classmethod
    def build(cls, hf_config, model_path: str | None = None, **kwargs) -> ModelConfig:
        hidden = _get(hf_config, "hidden_size", "n_embd", "d_model")
        heads = _get(hf_config, "num_attention_heads", "n_head", "num_heads")
        layers = _get(hf_config, "num_hidden_layers", "n_layer", "num_layers")
        missing = [
            n
            for n, v in (
                ("hidden_size", hidden),
                ("num_attention_heads", heads),
                ("num_hidden_layers", layers),
                ("vocab_size", getattr(hf_config, "vocab_size", None)),
            )
            if v is None
        ]
        if missing:
            raise ValueError(
                f"config of model_type {getattr(hf_config, 'model_type', None)!r} lacks {missing}; "
                "write an AutoModelConfigBuilder subclass that knows its field names"
            )
        head_dim = _get(hf_config, "head_dim", default=hidden // heads)
        sliding = getattr(hf_config, "sliding_window", None) if getattr(hf_config, "use_sliding_window", True) else None
        return ModelConfig(
            hidden_size=hidden,
            num_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=_get(hf_config, "num_key_value_heads", "num_kv_heads", default=heads),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_id=getattr(hf_config, "eos_token_id", None),
            head_dim=head_dim,
            vocab_size=hf_config.vocab_size,
            sliding_window=sliding,
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", None),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )
