"""Mistral (7B v0.1-v0.3, Nemo, Small, and every checkpoint with MistralForCausalLM): Llama's layout with
sliding-window attention, which the Llama model already takes from the config (an option of the Attention op;
None or 0 means full attention). Nothing else differs, so the class is Llama's under Mistral's name."""

from __future__ import annotations

from .llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
