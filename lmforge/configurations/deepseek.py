"""DeepSeek-V3 (and Kimi-K2, which reuses its model_type): multi-head latent attention caches one compressed
latent per token instead of per-head keys and values, so the KV cache is a single cache per layer with one
"head" of kv_lora_rank + qk_rope_head_dim channels whose first kv_lora_rank channels serve as the values."""

from __future__ import annotations

from lmforge.config import ModelConfig

from .builder import AutoModelConfigBuilder


class DeepseekV3ModelConfigBuilder(AutoModelConfigBuilder):
    @classmethod
    def condition(cls, hf_config) -> bool:
        return hf_config.model_type == "deepseek_v3"

    @classmethod
    def build(cls, hf_config, model_path: str | None = None, **kwargs) -> ModelConfig:
        latent_dim = hf_config.kv_lora_rank + hf_config.qk_rope_head_dim
        return ModelConfig(
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=1,
            bos_token_id=hf_config.bos_token_id,
            eos_token_id=hf_config.eos_token_id,
            head_dim=latent_dim,
            vocab_size=hf_config.vocab_size,
            k_head_dim=latent_dim,
            v_head_dim=hf_config.kv_lora_rank,
            num_kv_caches=1,
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", None),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )
