"""The ops behind the model scaffold's options, against plain torch / HF: plain activations, LayerNorm with per-head
weights split by TP rank, and the per-head fused QKV layout loaded on each TP rank."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from lmforge.backends.registry import BuildContext, build_context
from lmforge.nn import LayerNorm, build_act, build_qkv_proj


@pytest.mark.parametrize("name", ["gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "silu", "relu", "relu2"])
def test_plain_activation_matches_hf(name):
    x = torch.randn(7, 33) * 3
    torch.testing.assert_close(build_act(name)(x), ACT2FN[name](x), atol=1e-6, rtol=1e-6)


def test_gated_activation_and_unknown_names():
    x = torch.randn(5, 16)
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(build_act("gelu_pytorch_tanh", gated=True)(x), F.gelu(gate, approximate="tanh") * up)
    with pytest.raises(ValueError, match="hidden_act 'swiglu2' is not supported"):
        build_act("swiglu2")
    with pytest.raises(ValueError, match="gated 'relu2' MLP"):
        build_act("relu2", gated=True)


def test_per_head_layer_norm_keeps_its_ranks_heads():
    heads, head_dim = 4, 8
    weight = torch.randn(heads, head_dim)
    x = torch.randn(3, heads, head_dim)
    ref = F.layer_norm(x, (head_dim,), None, None, 1e-5) * weight
    for rank in range(2):
        with build_context(BuildContext(tp_size=2, tp_rank=rank)):
            norm = LayerNorm((heads, head_dim), 1e-5, bias=False, shard=(2, rank))
        norm.weight.weight_loader(norm.weight, weight)
        local = slice(2 * rank, 2 * rank + 2)
        torch.testing.assert_close(norm(x[:, local]), ref[:, local])


def test_per_head_qkv_layout_loads_whole_heads_on_each_rank():
    hidden, heads, head_dim = 16, 4, 8
    # a GPT-NeoX style query_key_value: rows [heads, 3 (q, k, v), head_dim]
    fused = torch.randn(heads, 3, head_dim, hidden)
    bias = torch.randn(heads, 3, head_dim)
    x = torch.randn(5, hidden)
    q_ref, k_ref, v_ref = (torch.einsum("hdi,ti->thd", fused[:, i], x) + bias[:, i] for i in range(3))
    for rank in range(2):
        with build_context(BuildContext(tp_size=2, tp_rank=rank)):
            proj = build_qkv_proj(hidden, heads, heads, head_dim, bias=True, layout="per_head")
        proj.weight.weight_loader(proj.weight, fused.flatten(0, 2))
        proj.bias.weight_loader(proj.bias, bias.flatten())
        q, k, v = proj.split_qkv(proj(x))
        local = slice(2 * rank, 2 * rank + 2)
        for got, ref in ((q, q_ref), (k, k_ref), (v, v_ref)):
            torch.testing.assert_close(got, ref[:, local], atol=1e-5, rtol=1e-5)


def test_per_head_qkv_layout_refuses_grouped_kv_heads():
    with pytest.raises(ValueError, match="per_head qkv layout needs as many KV heads"):
        build_qkv_proj(16, 4, 2, 8, layout="per_head")
    with pytest.raises(ValueError, match="unknown qkv layout"):
        build_qkv_proj(16, 4, 4, 8, layout="kvq")


def test_a_size_that_does_not_split_over_tp_names_the_layer():
    from lmforge.check_env.parity import tiny_hf_config
    from lmforge.models.llama import LlamaForCausalLM

    with build_context(BuildContext(tp_size=3, tp_rank=0)):
        with pytest.raises(ValueError, match=r"^cannot build model\.layers\.0 \(LlamaDecoderLayer\): .*tp=3"):
            LlamaForCausalLM(tiny_hf_config("llama"), None)
