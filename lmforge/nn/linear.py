"""Linear layer builders. Each parameter carries a `weight_loader(param, loaded_weight, shard_id=None)`
that takes its own slice (TP rank, merged gate/up part, q/k/v part), so a model's load_weights
stays a name mapping. dtype/device/is_tp/quant_config default to the build context.

Under a quant_config (from the checkpoint's `quantization_config`) a layer is quantized or dense as its
checkpoint tensors decide, after the model loader gave it its module name (see lmforge/nn/quant/layer.py); a
quantized layer's parameters are the checkpoint's own tensors and its matmul is the backend's `<scheme>_linear`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from lmforge.backends.registry import current_build_context, get_op
from lmforge.nn.quant.linear import QuantLinearMixin, resolve_quant_config


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(f"weight shape {tuple(loaded_weight.shape)} does not fit parameter {tuple(param.shape)}")
    param.data.copy_(loaded_weight)


def _resolve(dtype, device, quant_config, is_tp) -> tuple[torch.dtype, torch.device, int, int, object]:
    ctx = current_build_context()
    tp_size, tp_rank = (ctx.tp_size, ctx.tp_rank) if is_tp else (1, 0)
    device = torch.device(device) if device is not None else ctx.device
    return dtype or ctx.dtype, device, tp_size, tp_rank, resolve_quant_config(quant_config)


def _divide(n: int, tp_size: int, what: str) -> int:
    if n % tp_size:
        raise ValueError(f"{what} ({n}) is not divisible by tp={tp_size}")
    return n // tp_size


class LinearBase(QuantLinearMixin, nn.Module):
    """y = x W^T + b over the local shard of W ([out_local, in_local]).

    Subclasses say how they shard in `geometry()` (used by quantized tensors) and in their dense weight_loader."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype,
        device,
        all_reduce: bool = False,
        quant_config=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if quant_config is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), False)
            self.weight.weight_loader = self.weight_loader
        else:
            self.init_quant(quant_config, dtype, device)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.all_reduce = all_reduce
        self.linear_op = get_op("linear")  # the cuda backend sends one-row inputs to its GEMV kernel

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded_weight)

    def geometry(self) -> tuple[tuple[tuple[int, int, int, int], ...], tuple[int, int, int]]:
        """(per merged part: (local offset, local size, start in the part's full tensor, full size), and the same
        (local size, start, full size) for the in-features), in features."""
        raise NotImplementedError

    def part_index(self, shard_id) -> int | None:
        return shard_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear_op(x, self.weight, self.bias) if self.quant is None else self.quant_forward(x)
        if self.all_reduce:
            dist.all_reduce(out, group=current_build_context().tp_group)
        return out


class ColwiseLinear(LinearBase):
    """Output features split across TP ranks; no communication."""

    def __init__(self, in_features, out_features, bias, dtype, device, tp_size, tp_rank, quant_config=None):
        self.tp_size, self.tp_rank = tp_size, tp_rank
        n = _divide(out_features, tp_size, "out_features")
        super().__init__(in_features, n, bias, dtype, device, quant_config=quant_config)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        default_weight_loader(param, loaded_weight.chunk(self.tp_size, 0)[self.tp_rank])

    def geometry(self):
        n = self.out_features
        return ((0, n, self.tp_rank * n, n * self.tp_size),), (self.in_features, 0, self.in_features)


class RowwiseLinear(LinearBase):
    """Input features split across TP ranks; partial outputs are all-reduced."""

    def __init__(self, in_features, out_features, bias, dtype, device, tp_size, tp_rank, quant_config=None):
        self.tp_size, self.tp_rank = tp_size, tp_rank
        k = _divide(in_features, tp_size, "in_features")
        super().__init__(k, out_features, bias, dtype, device, tp_size > 1, quant_config)

    def geometry(self):
        n, k = self.out_features, self.in_features
        return ((0, n, 0, n),), (k, self.tp_rank * k, k * self.tp_size)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if param is self.bias:  # added once, on rank 0, so the all-reduce sums it exactly once
            default_weight_loader(param, loaded_weight if self.tp_rank == 0 else torch.zeros_like(loaded_weight))
            return
        default_weight_loader(param, loaded_weight.chunk(self.tp_size, 1)[self.tp_rank])


class MergedColwiseLinear(LinearBase):
    """Several colwise projections stored as one matrix (gate_up_proj = [gate; up]).

    shard_id is the index of the part being loaded; a checkpoint that already stores the
    merged matrix (Phi-3) loads with shard_id=None.
    """

    def __init__(
        self, in_features, out_features: Sequence[int], bias, dtype, device, tp_size, tp_rank, quant_config=None
    ):
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.full_sizes = list(out_features)
        self.local_sizes = [_divide(n, tp_size, "out_features") for n in out_features]
        super().__init__(in_features, sum(self.local_sizes), bias, dtype, device, quant_config=quant_config)

    def _part_starts(self) -> list[int]:
        return [self.tp_rank * n for n in self.local_sizes]

    def geometry(self):
        offsets = [sum(self.local_sizes[:i]) for i in range(len(self.local_sizes))]
        parts = zip(offsets, self.local_sizes, self._part_starts(), self.full_sizes, strict=True)
        return tuple(parts), (self.in_features, 0, self.in_features)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if shard_id is None:
            for i, part in enumerate(loaded_weight.split(self.full_sizes, 0)):
                self.weight_loader(param, part, i)
            return
        offset = sum(self.local_sizes[:shard_id])
        size = self.local_sizes[shard_id]
        part = loaded_weight.chunk(self.tp_size, 0)[self.tp_rank]
        default_weight_loader(param.data.narrow(0, offset, size), part)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(self.local_sizes, dim=-1)


class QKVLinear(MergedColwiseLinear):
    """q, k and v projections in one matrix; shard ids 'q', 'k', 'v'. KV heads are replicated
    when there are fewer of them than TP ranks."""

    def __init__(
        self,
        in_features,
        num_q_heads,
        num_kv_heads,
        head_size,
        head_size_v,
        bias,
        dtype,
        device,
        tp_size,
        tp_rank,
        quant_config=None,
    ):
        self.num_q_heads = _divide(num_q_heads, tp_size, "num_attention_heads")
        kv_replicas = max(1, tp_size // num_kv_heads) if num_kv_heads < tp_size else 1
        self.kv_tp_size = tp_size // kv_replicas
        self.num_kv_heads = _divide(num_kv_heads, self.kv_tp_size, "num_key_value_heads")
        self.head_size, self.head_size_v = head_size, head_size_v
        self.kv_rank = tp_rank // kv_replicas
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.full_sizes = [num_q_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size_v]
        self.local_sizes = [
            self.num_q_heads * head_size,
            self.num_kv_heads * head_size,
            self.num_kv_heads * head_size_v,
        ]
        LinearBase.__init__(self, in_features, sum(self.local_sizes), bias, dtype, device, quant_config=quant_config)

    def _part_starts(self) -> list[int]:
        q, k, v = self.local_sizes
        return [self.tp_rank * q, self.kv_rank * k, self.kv_rank * v]

    def part_index(self, shard_id) -> int | None:
        return "qkv".index(shard_id) if isinstance(shard_id, str) else shard_id

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if shard_id is None:
            for sid, part in zip("qkv", loaded_weight.split(self.full_sizes, 0), strict=True):
                self.weight_loader(param, part, sid)
            return
        if isinstance(shard_id, int):
            shard_id = "qkv"[shard_id]
        idx = "qkv".index(shard_id)
        offset, size = sum(self.local_sizes[:idx]), self.local_sizes[idx]
        if shard_id == "q":
            part = loaded_weight.chunk(self.tp_size, 0)[self.tp_rank]
        else:
            part = loaded_weight.chunk(self.kv_tp_size, 0)[self.kv_rank]
        default_weight_loader(param.data.narrow(0, offset, size), part)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[num_tokens, q+k+v] -> q [T, heads, d], k [T, kv_heads, d], v [T, kv_heads, d_v] (local heads)."""
        q, k, v = qkv.split(self.local_sizes, dim=-1)
        return (
            q.unflatten(-1, (self.num_q_heads, self.head_size)),
            k.unflatten(-1, (self.num_kv_heads, self.head_size)),
            v.unflatten(-1, (self.num_kv_heads, self.head_size_v)),
        )


class PerHeadQKVLinear(QKVLinear):
    """QKVLinear for checkpoints that fuse q, k, v per head: rows [num_heads, 3, head_dim] (GPT-NeoX's
    query_key_value, Bloom). Loaded whole, the matrix is regrouped as [q; k; v]; each rank keeps whole heads."""

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if shard_id is None:  # [heads * 3 * head_dim, ...] -> [3 * heads * head_dim, ...]
            heads = self.full_sizes[0] // self.head_size
            loaded_weight = loaded_weight.unflatten(0, (heads, 3, self.head_size)).transpose(0, 1).flatten(0, 2)
        super().weight_loader(param, loaded_weight, shard_id)

    def _load_quant(self, name, param, loaded_weight, shard_id=None):
        if shard_id is None:  # quantized tensors fused per head would need the regrouping of every tensor kind
            raise self.quant.error("a quantized per-head fused qkv matrix is not supported; use a dense checkpoint")
        super()._load_quant(name, param, loaded_weight, shard_id)


def build_colwise_linear(
    in_features: int,
    out_features: int,
    bias: bool = False,
    dtype=None,
    device=None,
    quant_config=None,
    is_tp: bool = True,
) -> ColwiseLinear:
    dtype, device, tp_size, tp_rank, quant = _resolve(dtype, device, quant_config, is_tp)
    return ColwiseLinear(in_features, out_features, bias, dtype, device, tp_size, tp_rank, quant)


def build_rowwise_linear(
    in_features: int,
    out_features: int,
    bias: bool = False,
    dtype=None,
    device=None,
    quant_config=None,
    is_tp: bool = False,
) -> RowwiseLinear:
    """Row-parallel under TP when is_tp; replicated otherwise (the seed builds lm_head this way)."""
    dtype, device, tp_size, tp_rank, quant = _resolve(dtype, device, quant_config, is_tp)
    return RowwiseLinear(in_features, out_features, bias, dtype, device, tp_size, tp_rank, quant)


def build_merged_colwise_linear(
    in_features: int,
    all_out_features: Sequence[int],
    bias: bool = False,
    dtype=None,
    device=None,
    quant_config=None,
    is_tp: bool = True,
) -> MergedColwiseLinear:
    dtype, device, tp_size, tp_rank, quant = _resolve(dtype, device, quant_config, is_tp)
    return MergedColwiseLinear(in_features, all_out_features, bias, dtype, device, tp_size, tp_rank, quant)


def build_qkv_proj(
    in_features: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    head_size_v: int | None = None,
    bias: bool = False,
    dtype=None,
    device=None,
    quant_config=None,
    is_tp: bool = True,
    layout: str = "qkv",
) -> QKVLinear:
    """layout 'qkv': the checkpoint's fused matrix (if any) is [q; k; v]; 'per_head': [heads, 3, head_dim]."""
    dtype, device, tp_size, tp_rank, quant = _resolve(dtype, device, quant_config, is_tp)
    if layout not in ("qkv", "per_head"):
        raise ValueError(f"unknown qkv layout {layout!r}; known: 'qkv', 'per_head'")
    if layout == "per_head" and (num_kv_heads != num_q_heads or (head_size_v or head_size) != head_size):
        raise ValueError("the per_head qkv layout needs as many KV heads as query heads, of one head size")
    return (QKVLinear if layout == "qkv" else PerHeadQKVLinear)(
        in_features,
        num_q_heads,
        num_kv_heads,
        head_size,
        head_size_v or head_size,
        bias,
        dtype,
        device,
        tp_size,
        tp_rank,
        quant,
    )
