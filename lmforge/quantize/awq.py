"""AWQ (Lin et al., 2023), as AutoAWQ applies it to one decoder layer: per input channel, a scale
s = mean|x|^a / mean|w|^(1-a) (normalised) chosen over a grid of a to minimise the error of the block's output
once its weights are quantized; W * s is what gets quantized and 1/s is folded into the op that feeds the group
(the RMSNorm before q/k/v and gate/up, v_proj before o_proj, up_proj before down_proj), so the float model is
unchanged. Then, optionally, each weight group's clipping range is searched on the same objective.

The caller (quantize/layerwise.py) captures the layer's calibration inputs and quantizes with RTN afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.quantize.qparams import QuantSpec, fake_quantize

_LLAMA_NAMES = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(slots=True)
class ScaleGroup:
    prev: str  # the module whose output feeds the group: an RMSNorm or a Linear
    linears: list[str]  # the linears sharing that input
    inspect: str  # the module whose output measures the error: the attention, the MLP, or the linear itself


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """AutoAWQ's scaling groups of a Llama-style decoder layer (Llama, Mistral, Qwen2, Qwen3, SmolLM, ...)."""
    modules = dict(layer.named_modules())
    missing = [n for n in _LLAMA_NAMES if n not in modules]
    if missing or "gemma" in type(layer).__name__.lower():
        why = f"lacks {', '.join(missing)}" if missing else "its norms scale by 1 + w"
        raise ValueError(
            f"AWQ's scale folding knows Llama-style decoder layers ({', '.join(_LLAMA_NAMES)}, with RMSNorms that "
            f"multiply by their weight); {type(layer).__name__} differs ({why}). Use --method gptq, which needs no "
            "folding."
        )
    groups = [ScaleGroup("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn")]
    # v_proj -> o_proj only when each o_proj input is one v_proj output (no grouped-query head sharing)
    if modules["self_attn.v_proj"].weight.shape[0] == modules["self_attn.o_proj"].weight.shape[1]:
        groups.append(ScaleGroup("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"))
    groups.append(ScaleGroup("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp"))
    groups.append(ScaleGroup("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj"))
    return groups


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def search_scales(
    modules: dict[str, nn.Module],
    group: ScaleGroup,
    inputs: list[torch.Tensor],
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    spec: QuantSpec,
    n_grid: int = 20,
    stat_inputs: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The best per-input-channel scale [K] for `group`, given its input rows (one tensor per calibration
    sample) on which each grid point's output error is measured; mean|x| comes from `stat_inputs` (default: the
    same). `run(module, x)` calls the inspected module (the attention needs the layer's extra arguments)."""
    linears = [modules[n] for n in group.linears]
    inspect = modules[group.inspect]
    k = linears[0].weight.shape[1]
    x_mean = torch.cat([x.reshape(-1, k) for x in stat_inputs or inputs]).abs().float().mean(0)
    w = torch.cat([m.weight for m in linears]).float()
    g = spec.group_len(k)
    w_norm = w.abs().reshape(-1, g)
    w_mean = (w_norm / w_norm.amax(dim=1, keepdim=True).clamp(min=1e-8)).reshape(w.shape).mean(0)
    reference = [_first(run(inspect, x)).float() for x in inputs]
    originals = [m.weight.detach().clone() for m in linears]
    best_err, best_scales = float("inf"), None
    try:
        for step in range(n_grid):
            ratio = step / n_grid
            scales = (x_mean.pow(ratio) / w_mean.pow(1 - ratio).clamp(min=1e-4)).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for m, w0 in zip(linears, originals, strict=True):
                m.weight.copy_((fake_quantize(w0.float() * scales, spec) / scales).to(w0.dtype))
            err = sum(
                (_first(run(inspect, x)).float() - ref).pow(2).sum().item()
                for x, ref in zip(inputs, reference, strict=True)
            )
            if err < best_err:
                best_err, best_scales = err, scales.clone()
    finally:
        for m, w0 in zip(linears, originals, strict=True):
            m.weight.copy_(w0)
    if best_scales is None:  # every grid point gave NaN: the layer's activations are broken, not the search
        raise RuntimeError(f"AWQ: no finite output error for {group.linears}; the calibration activations hold NaN/inf")
    return best_scales


@torch.no_grad()
def apply_scales(modules: dict[str, nn.Module], group: ScaleGroup, scales: torch.Tensor) -> None:
    """Fold 1/s into `group.prev` (a norm's weight, or a linear's output rows and bias) and s into the linears'
    input columns: the layer computes the same function, but the quantized weights are W * s."""
    prev = modules[group.prev]
    s = scales.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    for name in group.linears:
        weight = modules[name].weight
        weight.mul_(s.view(1, -1).to(weight.dtype))


@torch.no_grad()
def search_clip(
    weight: torch.Tensor, inputs: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5
) -> torch.Tensor:
    """Per (output channel, group) clip value `[N, num_groups, 1]`: the shrink of max|w| (down to 1 - max_shrink)
    whose quantized group best reproduces the group's partial dot products on `inputs [T, K]`."""
    n, k = weight.shape
    g = spec.group_len(k)
    x = inputs.float().reshape(-1, k // g, g)  # [T, groups, G]
    best = torch.empty(n, k // g, 1, device=weight.device)
    chunk = 64
    for o in range(0, n, chunk):
        w = weight[o : o + chunk].float().reshape(-1, k // g, g)  # [n, groups, G]
        reference = torch.einsum("tgj,ngj->ntg", x, w)
        org_max = w.abs().amax(dim=-1, keepdim=True)
        min_err = torch.full(org_max.shape, float("inf"), device=w.device)
        best_max = org_max.clone()
        for step in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - step / n_grid)
            clipped = torch.maximum(torch.minimum(w, max_val), -max_val)
            qw = fake_quantize(clipped.reshape(-1, k), spec).reshape(w.shape)
            err = (torch.einsum("tgj,ngj->ntg", x, qw) - reference).pow(2).mean(dim=1).unsqueeze(-1)  # [n, groups, 1]
            better = err < min_err
            min_err[better], best_max[better] = err[better], max_val[better]
        best[o : o + chunk] = best_max
    return best


@torch.no_grad()
def apply_clip(weight: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> None:
    n, k = weight.shape
    g = spec.group_len(k)
    w = weight.view(n, k // g, g)
    m = max_val.to(weight.dtype)
    w.copy_(torch.maximum(torch.minimum(w, m), -m))
