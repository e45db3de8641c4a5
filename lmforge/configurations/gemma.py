"""Gemma, Gemma2 and Gemma3 (text): explicit head_dim, sliding window on some layers."""

from __future__ import annotations

from lmforge.config import ModelConfig

from .builder import AutoModelConfigBuilder


class GemmaModelConfigBuilder(AutoModelConfigBuilder):
    @classmethod
    def condition(cls, hf_config) -> bool:
        return hf_config.model_type in ("gemma", "gemma2", "gemma3_text")

    @classmethod
    def build(cls, hf_config, model_path: str | None = None, **kwargs) -> ModelConfig:
        return ModelConfig(
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=hf_config.num_key_value_heads,
            bos_token_id=hf_config.bos_token_id,
            eos_token_id=hf_config.eos_token_id,
            head_dim=hf_config.head_dim,
            vocab_size=hf_config.vocab_size,
            sliding_window=getattr(hf_config, "sliding_window", None),
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", None),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        )
