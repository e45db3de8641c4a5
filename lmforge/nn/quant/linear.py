"""The quantized half of LinearBase (lmforge/nn/linear.py), as a mixin so the dense classes keep their shape.

Life of a layer built under a quant_config: `init_quant` gives it a placeholder `weight` (one element broadcast
to [out, in]: right shape, dtype and device for code that inspects it while the model is built, no memory);
`attach_quant(prefix, names)` (from `attach_quant_states`, right after the model is built) picks its scheme and
registers the scheme's tensors as placeholders too; the first tensor that arrives for a name allocates it;
`process_weights_after_loading` turns what arrived into the backend op's prepared input, or leaves the dense
weight it got.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lmforge.backends.registry import current_build_context, get_op
from lmforge.nn.quant.config import QuantConfig, parse_quant_config
from lmforge.nn.quant.layer import Geometry, QuantLoadError, QuantState

_QUANT_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.int8)


def resolve_quant_config(quant_config) -> QuantConfig | None:
    """The builder's quant_config argument, else the build context's, parsed (None: dense)."""
    if quant_config is None:
        quant_config = current_build_context().quant_config
    return parse_quant_config(quant_config)


def _placeholder(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(1, dtype=dtype, device=device).expand(*shape), requires_grad=False)


class QuantLinearMixin:
    quant_config: QuantConfig | None = None
    quant: QuantState | None = None

    def init_quant(self, quant_config: QuantConfig, dtype, device) -> None:
        self.quant_config = quant_config
        self._act_dtype, self._device = dtype, torch.device(device)
        self._device_type = current_build_context().device_type
        self._placeholders: dict[str, nn.Parameter] = {}
        self._dense_loaded = False
        self._dense_cache: torch.Tensor | None = None
        self.weight = self._add_placeholder("weight", (self.out_features, self.in_features), dtype)
        self.weight.weight_loader = self._load_weight_or_quant

    def _add_placeholder(self, name: str, shape, dtype) -> nn.Parameter:
        param = _placeholder(shape, dtype, self._device)
        self._placeholders[name] = param
        return param

    def _is_placeholder(self, name: str) -> bool:
        return name in self._placeholders and self._parameters.get(name) is self._placeholders[name]

    # --- before loading --------------------------------------------------------------------------------------

    def attach_quant(self, prefix: str, names: list[str]) -> None:
        """prefix: this module's name in the model; names: the checkpoint names of its parts (q_proj, k_proj, ...)."""
        self.quant_prefix = prefix
        scheme = self.quant_config.scheme_for(prefix, names)
        if scheme is None:
            return  # dense by the config; the weight still allocates when it arrives
        out_parts, in_part = self.geometry()
        self.quant = QuantState(scheme, prefix, Geometry(out_parts, in_part), self._device, self._act_dtype)
        for name, spec in self.quant.specs.items():
            if name == "weight":
                continue
            param = self._add_placeholder(name, self.quant.shape_of(spec), spec.dtype)
            param.weight_loader = partial(self._load_quant, name)
            self.register_parameter(name, param)

    # --- loading ---------------------------------------------------------------------------------------------

    def _materialize(self, name: str, quantized: bool) -> nn.Parameter:
        if self._is_placeholder(name):
            old = self._placeholders[name]
            if quantized:
                data = self.quant.empty(name)
            else:
                data = torch.empty(old.shape, dtype=old.dtype, device=self._device)
            param = nn.Parameter(data, requires_grad=False)
            param.weight_loader = old.weight_loader
            self.register_parameter(name, param)
        return self._parameters[name]

    def _load_quant(self, name: str, param, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if self._dense_loaded:
            raise self._mixed_error(name)
        dst = self._materialize(name, quantized=True)
        self.quant.load(dst.data, name, loaded_weight, self.part_index(shard_id))

    def _load_weight_or_quant(self, param, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if self.quant is not None and loaded_weight.dtype in _QUANT_WEIGHT_DTYPES:
            self._load_quant("weight", param, loaded_weight, shard_id)
            return
        if loaded_weight.dtype in _QUANT_WEIGHT_DTYPES or not loaded_weight.is_floating_point():
            raise QuantLoadError(
                f"layer {getattr(self, 'quant_prefix', '?')}: got a {loaded_weight.dtype} weight, but its "
                f"quantization_config ({self.quant_config.method}) makes it a dense layer here"
            )
        if self.quant is not None and self.quant.loaded:
            raise self._mixed_error("weight")
        self._dense_loaded = True
        self.weight_loader(self._materialize("weight", quantized=False), loaded_weight, shard_id)

    def _mixed_error(self, name: str) -> QuantLoadError:
        return self.quant.error(
            f"got both a dense float weight and quantized tensors ({name}); a fused layer's parts must be all "
            "quantized or all dense"
        )

    # --- after loading ---------------------------------------------------------------------------------------

    def process_weights_after_loading(self) -> None:
        q = self.quant
        if q is None or q.prepared is not None:  # dense, or done already
            return
        if not q.loaded:  # dense: drop the quantized placeholders, keep whatever weight it has
            for name in list(self._placeholders):
                if name != "weight" and self._is_placeholder(name):
                    del self._parameters[name]
            self.quant = None
            return
        tensors = {name: self._parameters[name].data for name in q.loaded}
        q.process(tensors, partial(get_op, device_type=self._device_type))
        for name in [*q.specs, "weight"]:  # the prepared op input replaces the checkpoint tensors
            self._parameters.pop(name, None)

    def quant_forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quant
        if q.prepared is None:
            raise RuntimeError(f"layer {q.prefix} was not processed after loading (process_weights_after_loading)")
        x2 = x.reshape(-1, x.shape[-1])
        if q.perm is not None:  # act-order: the weight's in-features were sorted by group at load
            x2 = x2[:, q.perm]
        y = get_op(f"{q.scheme.op}_linear", self._device_type)(x2, q.prepared, self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] in the activation dtype (computed once), for model code that reads
        `.weight` directly (DeepSeek's MLA absorbs kv_b_proj's weight)."""
        if self._dense_cache is None:
            q = self.quant
            c = q.canonical
            cpu = partial(get_op, device_type="cpu")
            if q.scheme.op == "wna16":
                w = cpu("wna16_dequantize")(**c)
                if q.perm is not None:  # back to the checkpoint's order of in-features
                    w = w[:, torch.argsort(q.perm)]
            elif q.scheme.op == "fp8":
                w = cpu("fp8_dequantize")(c["weight"], c["weight_scale"], c["block_size"])
            else:
                w = cpu("int8_dequantize")(c["weight"], c["weight_scale"])
            self._dense_cache = w.to(self._act_dtype)
        return self._dense_cache

    def __getattr__(self, name: str):
        if name == "weight" and self.__dict__.get("quant") is not None and self.__dict__["quant"].prepared is not None:
            return self.dense_weight()
        return super().__getattr__(name)


def checkpoint_names(model: nn.Module, prefix: str) -> list[str]:
    """The checkpoint names of a module's parts: packed_modules_mapping turns `...qkv_proj` into q/k/v_proj."""
    mapping = getattr(model, "packed_modules_mapping", None) or {}
    parent, _, last = prefix.rpartition(".")
    if last in mapping:
        return [f"{parent}.{part}" if parent else part for part in mapping[last]]
    return [prefix]


def attach_quant_states(model: nn.Module) -> int:
    """Give every linear layer built under a quant_config its module name and scheme; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantLinearMixin) and module.quant_config is not None:
            module.attach_quant(name, checkpoint_names(model, name))
            count += 1
        elif hasattr(module, "attach_quant_experts") and getattr(module, "quant_config", None) is not None:
            module.attach_quant_experts(name)
            count += 1
    return count


def finish_loading(model: nn.Module) -> None:
    """Call process_weights_after_loading() on every module that has it (after all weights are loaded)."""
    for module in model.modules():
        fn = getattr(module, "process_weights_after_loading", None)
        if callable(fn):
            fn()
