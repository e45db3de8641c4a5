"""FusedMoE, its CPU op and the router helpers, against plain per-token loops and HF transformers' routers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.backends.cpu.moe import fused_moe, fused_moe_dense, fused_moe_grouped
from lmforge.backends.registry import BuildContext, build_context
from lmforge.nn.moe import FusedMoE, grouped_topk, load_expert_weights, softmax_topk

E, H, I, T, K = 6, 16, 8, 11, 2  # noqa: E741


def _reference(hidden, gate_up, down, weights, ids, act):
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            gate, up = (gate_up[ids[t, k]] @ hidden[t]).chunk(2)
            g = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")
            out[t] += weights[t, k] * (down[ids[t, k]] @ (g * up))
    return out


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("impl", [fused_moe, fused_moe_grouped, fused_moe_dense])
def test_fused_moe_matches_per_token_loop(impl, act):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    gate_up = torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64)
    down = torch.randn(E, H, I, generator=g, dtype=torch.float64)
    weights, ids = softmax_topk(torch.randn(T, E, generator=g), K, renormalize=True)
    expected = _reference(hidden, gate_up, down, weights.double(), ids, act)
    torch.testing.assert_close(impl(hidden, gate_up, down, weights.double(), ids, act), expected)
    assert impl(hidden[:0], gate_up, down, weights[:0].double(), ids[:0], act).shape == (0, H)


def test_fused_moe_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unsupported MoE activation"):
        fused_moe(
            torch.zeros(1, H),
            torch.zeros(E, 2 * I, H),
            torch.zeros(E, H, I),
            torch.ones(1, 1),
            torch.zeros(1, 1, dtype=torch.long),
            "relu",
        )


def test_softmax_topk_matches_hf_mixtral_and_qwen3_moe_routers():
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    hidden = torch.randn(T, H)
    for norm in (True, False):
        cfg = Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K, norm_topk_prob=norm)
        router = Qwen3MoeTopKRouter(cfg)
        torch.nn.init.normal_(router.weight)
        _, hf_weights, hf_ids = router(hidden)
        weights, ids = softmax_topk(F.linear(hidden, router.weight), K, renormalize=norm)
        torch.testing.assert_close((weights, ids), (hf_weights, hf_ids))
    router = MixtralTopKRouter(MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=K))
    torch.nn.init.normal_(router.weight)
    _, hf_weights, hf_ids = router(hidden)
    torch.testing.assert_close(softmax_topk(F.linear(hidden, router.weight), K, True), (hf_weights, hf_ids))


def test_grouped_topk_matches_hf_deepseek_v3_router():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        hidden_size=H, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5
    )
    router = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(router.weight)
    router.e_score_correction_bias.normal_(std=0.1)
    hidden = torch.randn(32, H)
    _, hf_weights, hf_ids = router(hidden)
    weights, ids = grouped_topk(F.linear(hidden, router.weight), 3, 4, 2, router.e_score_correction_bias, True, 2.5)
    # HF leaves the top-k unsorted: compare per token as sets, weights in the same order
    order_hf, order = hf_ids.sort(dim=-1).indices, ids.sort(dim=-1).indices
    torch.testing.assert_close(ids.gather(1, order), hf_ids.gather(1, order_hf))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, order_hf))
    # only experts of the kept groups are chosen
    groups = ids // 2
    assert all(len(set(row.tolist())) <= 2 for row in groups)


def _expert_checkpoint(prefix: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ckpt = {}
    for e in range(E):
        ckpt[f"{prefix}.experts.{e}.w1.weight"] = torch.randn(I, H, generator=g)
        ckpt[f"{prefix}.experts.{e}.w3.weight"] = torch.randn(I, H, generator=g)
        ckpt[f"{prefix}.experts.{e}.w2.weight"] = torch.randn(H, I, generator=g)
    return ckpt


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = FusedMoE(H, I, E)


def test_per_expert_and_stacked_checkpoints_load_the_same():
    ckpt = _expert_checkpoint("moe")
    model = torch.nn.Module()
    model.moe = _Block()
    loaded: set[str] = set()
    rest = list(
        load_expert_weights(model, [*ckpt.items(), ("other.weight", torch.ones(1))], ("w1", "w3", "w2"), loaded)
    )
    assert [n for n, _ in rest] == ["other.weight"]
    assert loaded == {"moe.experts.gate_up_proj", "moe.experts.down_proj"}
    gate_up = torch.stack(
        [torch.cat([ckpt[f"moe.experts.{e}.w1.weight"], ckpt[f"moe.experts.{e}.w3.weight"]]) for e in range(E)]
    )
    down = torch.stack([ckpt[f"moe.experts.{e}.w2.weight"] for e in range(E)])
    torch.testing.assert_close(model.moe.experts.gate_up_proj.data, gate_up)
    torch.testing.assert_close(model.moe.experts.down_proj.data, down)
    stacked = FusedMoE(H, I, E)  # HF transformers 5 in-memory layout: one [E, 2I, H] and one [E, H, I] tensor
    stacked.weight_loader(stacked.gate_up_proj, gate_up)
    stacked.weight_loader(stacked.down_proj, down)
    torch.testing.assert_close(stacked.gate_up_proj.data, gate_up)
    torch.testing.assert_close(stacked.down_proj.data, down)


def test_tensor_parallel_rank_takes_its_slice_of_every_expert():
    ckpt = _expert_checkpoint("moe")
    with build_context(BuildContext(tp_rank=1, tp_size=2)):
        moe = FusedMoE(H, I, E)
    for e in range(E):
        for shard, name in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            param = moe.down_proj if shard == "down" else moe.gate_up_proj
            moe.weight_loader(param, ckpt[f"moe.experts.{e}.{name}.weight"], (e, shard))
    half = I // 2
    assert moe.gate_up_proj.shape == (E, 2 * half, H) and moe.down_proj.shape == (E, H, half)
    torch.testing.assert_close(moe.gate_up_proj.data[2, :half], ckpt["moe.experts.2.w1.weight"][half:])
    torch.testing.assert_close(moe.gate_up_proj.data[2, half:], ckpt["moe.experts.2.w3.weight"][half:])
    torch.testing.assert_close(moe.down_proj.data[2], ckpt["moe.experts.2.w2.weight"][:, half:])
