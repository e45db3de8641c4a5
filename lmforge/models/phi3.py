"""Phi-3 and Phi-3.5/Phi-4-mini (Phi3ForCausalLM): Llama under its own name. Its checkpoints already store q/k/v as
one `qkv_proj` and gate/up as one `gate_up_proj`, which our merged parameters load whole (shard_id None; the
inherited packed_modules_mapping serves re-exports that split them). Rotary over part of each head
(partial_rotary_factor), LongRoPE scaling and the optional sliding window all come from the config through
Llama's rotary builder and attention."""

from __future__ import annotations

from lmforge.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    pass
