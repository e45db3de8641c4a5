"""The quantized half of FusedMoE (lmforge/nn/moe.py): quantized experts, decided like linear layers (the
checkpoint's tensors decide; see lmforge/nn/quant/layer.py).

Each expert's gate/up is a merged colwise layer ([I, I] over TP) and its down a row-parallel one (K = I over TP),
so one QuantState per side describes every expert; the checkpoint tensors are stacked [E, ...] while loading and,
after it, each expert goes through the scheme's `<op>_prepare`, and the backend's `fused_moe_quantized_prepare`
turns the lists of prepared experts into the layer's experts for `fused_moe_quantized` (the CPU reference runs
`<op>_linear` per routed group of tokens; CUDA stacks them [E, ...] for its grouped Triton kernel).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lmforge.backends.registry import current_build_context, get_op
from lmforge.nn.quant.layer import Geometry, QuantLoadError, QuantState
from lmforge.nn.quant.linear import resolve_quant_config

_QUANT_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.int8)


def _placeholder(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(1, dtype=dtype, device=device).expand(*shape), requires_grad=False)


class QuantExpertsMixin:
    quant_config = None
    quant_w13: QuantState | None = None
    quant_w2: QuantState | None = None

    def init_quant_experts(self, dtype, device) -> bool:
        """Under a quant_config: placeholders for the dense stacked weights; returns whether it set them."""
        quant_config = resolve_quant_config(None)
        if quant_config is None:
            return False
        self.quant_config = quant_config
        self._act_dtype, self._device = dtype, torch.device(device)
        self._device_type = current_build_context().device_type
        e, i, h = self.num_experts, self.intermediate_size, self.hidden_size
        self._placeholders = {
            "gate_up_proj": _placeholder((e, 2 * i, h), dtype, self._device),
            "down_proj": _placeholder((e, h, i), dtype, self._device),
        }
        for name, param in self._placeholders.items():
            param.weight_loader = partial(self._load_dense_stacked, name)
            self.register_parameter(name, param)
        self._dense_loaded = False
        self._expert_loaded: set[tuple[str, str, int, int]] = set()
        self._prepared: dict | None = None
        return True

    def attach_quant_experts(self, prefix: str) -> None:
        self.quant_prefix = prefix
        scheme = self.quant_config.expert_scheme_for(prefix, [prefix])
        if scheme is None:
            return
        i_local, r, h = self.intermediate_size, self.tp_rank, self.hidden_size
        i_full = i_local * self.tp_size
        gate_up = Geometry(((0, i_local, r * i_local, i_full), (i_local, i_local, r * i_local, i_full)), (h, 0, h))
        down = Geometry(((0, h, 0, h),), (i_local, r * i_local, i_full))
        self.quant_w13 = QuantState(scheme, f"{prefix} gate/up", gate_up, self._device, self._act_dtype)
        self.quant_w2 = QuantState(scheme, f"{prefix} down", down, self._device, self._act_dtype)
        for tag, state in (("w13", self.quant_w13), ("w2", self.quant_w2)):
            for name, spec in state.specs.items():
                param = _placeholder((self.num_experts, *state.shape_of(spec)), spec.dtype, self._device)
                self._placeholders[f"{tag}_{name}"] = param
                self.register_parameter(f"{tag}_{name}", param)

    def _materialize(self, name: str, data_fn) -> nn.Parameter:
        if self._parameters.get(name) is self._placeholders.get(name):
            old = self._placeholders[name]
            param = nn.Parameter(data_fn(old), requires_grad=False)
            param.weight_loader = getattr(old, "weight_loader", None)
            self.register_parameter(name, param)
        return self._parameters[name]

    def _dense(self, name: str) -> nn.Parameter:
        if self.quant_w13 is not None and (self.quant_w13.loaded or self.quant_w2.loaded):
            raise self.quant_w13.error("got both dense and quantized expert weights")
        self._dense_loaded = True
        return self._materialize(name, lambda old: torch.empty(old.shape, dtype=old.dtype, device=self._device))

    def _load_dense_stacked(self, name: str, param, loaded_weight: torch.Tensor, shard_id=None) -> None:
        self.weight_loader(self._dense(name), loaded_weight, shard_id)

    def load_quant_expert_tensor(self, expert: int, shard: str, tensor_name: str, tensor: torch.Tensor) -> str | None:
        quantized = self.quant_w13 is not None
        if tensor_name == "weight" and not (quantized and tensor.dtype in _QUANT_WEIGHT_DTYPES):
            if tensor.dtype in _QUANT_WEIGHT_DTYPES:
                raise QuantLoadError(f"experts {self.quant_prefix}: a {tensor.dtype} weight for dense experts")
            name = "down_proj" if shard == "down" else "gate_up_proj"
            self.weight_loader(self._dense(name), tensor, (expert, shard))
            return name
        if not quantized:
            return None
        state, tag, part = (self.quant_w2, "w2", 0) if shard == "down" else (self.quant_w13, "w13", shard == "up")
        if tensor_name not in state.specs:
            return None
        if self._dense_loaded:
            raise state.error("got both dense and quantized expert weights")
        param = self._materialize(
            f"{tag}_{tensor_name}", lambda old: torch.zeros(old.shape, dtype=old.dtype, device=self._device)
        )
        state.load(param.data[expert], tensor_name, tensor, int(part))
        self._expert_loaded.add((tag, tensor_name, expert, int(part)))
        return f"{tag}_{tensor_name}"

    def process_weights_after_loading(self) -> None:
        if self.quant_w13 is None or self._prepared is not None:
            return
        states = (("w13", self.quant_w13, 2), ("w2", self.quant_w2, 1))
        if not (self.quant_w13.loaded or self.quant_w2.loaded):  # dense experts
            for name in [n for n in self._placeholders if n.startswith("w")]:
                del self._parameters[name]
            self.quant_w13 = self.quant_w2 = None
            return
        prepared = []
        for tag, state, num_parts in states:
            for name, spec in state.specs.items():
                got = {(e, p) for t, n, e, p in self._expert_loaded if t == tag and n == name}
                want = {(e, p) for e in range(self.num_experts) for p in range(num_parts)}
                if not spec.optional and got != want:
                    missing = sorted(want - got)[:4]
                    raise state.error(f"the checkpoint has no {name} for experts (expert, part) {missing}...")
            per_expert = []
            for e in range(self.num_experts):
                tensors = {n: self._parameters[f"{tag}_{n}"].data[e] for n in state.loaded}
                state.process(tensors, partial(get_op, device_type=self._device_type))
                if state.perm is not None:
                    raise state.error("act-order (g_idx) experts are not supported")
                per_expert.append(state.prepared)
            prepared.append(per_expert)
        for name in self._placeholders:
            self._parameters.pop(name, None)
        prepare = get_op("fused_moe_quantized_prepare", self._device_type)
        self._prepared = prepare(prepared[0], prepared[1], self.quant_w13.scheme.op)

    def quant_experts_forward(self, hidden_states, topk_weights, topk_ids) -> torch.Tensor:
        if self._prepared is None:
            raise RuntimeError(f"experts {self.quant_prefix} were not processed after loading")
        op = get_op("fused_moe_quantized", self._device_type)
        return op(hidden_states, self._prepared, topk_weights, topk_ids, self.activation)
