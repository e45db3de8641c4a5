"""Llama family (Llama 2/3/3.x, SmolLM2, Mistral, Qwen2/3 share these fields)."""

from __future__ import annotations

from lmforge.config import ModelConfig

from .builder import AutoModelConfigBuilder
from .default import DefaultModelConfigBuilder


class LlamaModelConfigBuilder(AutoModelConfigBuilder):
    @classmethod
    def condition(cls, hf_config) -> bool:
        return hf_config.model_type in ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "phi3")

    @classmethod
    def build(cls, hf_config, model_path: str | None = None, **kwargs) -> ModelConfig:
        config = DefaultModelConfigBuilder.build(hf_config, model_path)
        if hf_config.model_type in ("qwen2", "qwen3", "qwen3_moe") and not getattr(
            hf_config, "use_sliding_window", False
        ):
            config.sliding_window = None
        return config
