"""Quantization formats of HF checkpoints, read from config.json's `quantization_config`.

`parse_quant_config(raw)` turns the dict into a `QuantConfig`; `QuantConfig.scheme_for(prefix, names)` gives the
`LayerScheme` of one linear layer (None: the layer stays dense) from its module name and the checkpoint names of
its parts. Unsupported settings fail here, before any weight is read, with the setting named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class QuantConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class LayerScheme:
    """What one layer's checkpoint tensors are. kind: 'awq' | 'gptq' | 'ct_wna16' | 'fp8' | 'int8' | 'gguf'.

    bits/group_size/sym/desc_act/gptq_v1 for the weight-only kinds (group_size -1: one group over all of K);
    block_size for block FP8; static_input for the W8A8 kinds (an input_scale tensor), input_zero_point for
    asymmetric static int8; scale_name is 'weight_scale' or HF fp8's 'weight_scale_inv'; planes: int4 planes per
    weight of a GGUF layer (lmforge/weights/gguf_pack.py)."""

    kind: str
    bits: int = 4
    group_size: int = -1
    sym: bool = True
    desc_act: bool = False
    gptq_v1: bool = True
    block_size: tuple[int, int] | None = None
    static_input: bool = False
    input_zero_point: bool = False
    scale_name: str = "weight_scale"
    per_tensor_weight: bool = False
    planes: int = 1
    fmt: str = ""  # the format's name for messages: 'awq', 'gptq', 'compressed-tensors pack-quantized', ...

    @property
    def op(self) -> str:
        return {"awq": "wna16", "gptq": "wna16", "ct_wna16": "wna16", "fp8": "fp8", "int8": "int8", "gguf": "wna16"}[
            self.kind
        ]


def _matches(pattern: str, name: str) -> bool:
    """compressed-tensors target / ignore: 're:<regex>' matches the module name; else the exact name or its last
    component (a class name such as 'Linear' matches every linear layer)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern in ("Linear", name) or name.endswith("." + pattern)


class QuantConfig:
    """Base: `method` is config.json's quant_method; subclasses decide per layer."""

    method = ""

    def __init__(self, raw: dict):
        self.raw = raw

    def scheme_for(self, prefix: str, names: list[str]) -> LayerScheme | None:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for `lmforge check_env`."""
        return self.method

    def expert_scheme_for(self, prefix: str, names: list[str]) -> LayerScheme | None:
        """The scheme of MoE experts (names: the checkpoint names of one expert's projections)."""
        return self.scheme_for(prefix, names)

    def _not_converted(self, names: list[str], key: str = "modules_to_not_convert") -> bool:
        skip = self.raw.get(key) or []
        return any(s in n for s in skip for n in names)


def _require(cond: bool, method: str, what: str) -> None:
    if not cond:
        raise QuantConfigError(f"unsupported {method} checkpoint: {what}")


class AWQConfig(QuantConfig):
    method = "awq"

    def __init__(self, raw: dict):
        super().__init__(raw)
        self.bits, self.group_size = int(raw.get("bits", raw.get("w_bit", 4))), int(raw.get("group_size", 128))
        version = str(raw.get("version", "gemm")).lower()
        _require(version == "gemm", "awq", f"version {version!r} (only AutoAWQ's 'gemm' layout is supported)")
        _require(self.bits == 4, "awq", f"bits={self.bits} (only 4-bit AWQ is supported)")
        _require(self.group_size > 0, "awq", f"group_size={self.group_size}")
        _require(raw.get("zero_point", True), "awq", "zero_point=false (the gemm layout always stores zero points)")

    def scheme_for(self, prefix, names):
        if self._not_converted(names):
            return None
        return LayerScheme("awq", self.bits, self.group_size, sym=False, fmt="awq")

    def describe(self):
        return f"awq (gemm): int{self.bits} weights, group {self.group_size}, zero points"


class GPTQConfig(QuantConfig):
    method = "gptq"

    def __init__(self, raw: dict):
        super().__init__(raw)
        self.bits, self.group_size = int(raw.get("bits", 4)), int(raw.get("group_size", 128))
        self.sym, self.desc_act = bool(raw.get("sym", True)), bool(raw.get("desc_act", False))
        fmt = str(raw.get("checkpoint_format", raw.get("format", "gptq"))).lower()
        _require(self.bits in (4, 8), "gptq", f"bits={self.bits} (supported: 4, 8)")
        _require(self.group_size == -1 or self.group_size > 0, "gptq", f"group_size={self.group_size}")
        _require(fmt in ("gptq", "gptq_v2"), "gptq", f"checkpoint_format {fmt!r} (supported: gptq, gptq_v2)")
        _require(not raw.get("lm_head", False), "gptq", "a quantized lm_head (lm_head: true)")
        self.v1 = fmt == "gptq"
        self.dynamic = raw.get("dynamic") or {}
        _require(not self.dynamic, "gptq", "per-module 'dynamic' overrides")

    def scheme_for(self, prefix, names):
        if self._not_converted(names):
            return None
        return LayerScheme(
            "gptq", self.bits, self.group_size, self.sym, self.desc_act, self.v1, fmt=f"gptq ({self.bits} bit)"
        )

    def describe(self):
        kind = "symmetric" if self.sym else "asymmetric"
        act = ", act-order" if self.desc_act else ""
        return f"gptq{'' if self.v1 else '_v2'}: int{self.bits} weights, group {self.group_size}, {kind}{act}"


class CompressedTensorsConfig(QuantConfig):
    method = "compressed-tensors"

    def __init__(self, raw: dict):
        super().__init__(raw)
        status = raw.get("quantization_status", "compressed")
        _require(status in ("compressed", "frozen"), "compressed-tensors", f"quantization_status {status!r}")
        _require(not raw.get("kv_cache_scheme"), "compressed-tensors", "kv_cache_scheme (a quantized KV cache)")
        sparsity = raw.get("sparsity_config") or {}
        _require(not sparsity or sparsity.get("format") in (None, "dense"), "compressed-tensors", "sparsity_config")
        _require(not raw.get("transform_config"), "compressed-tensors", "transform_config (rotations)")
        self.ignore = list(raw.get("ignore") or [])
        self.groups = []
        for name, group in (raw.get("config_groups") or {}).items():
            fmt = group.get("format") or raw.get("format")
            self.groups.append((name, list(group.get("targets") or []), self._scheme(name, group, fmt)))
        _require(bool(self.groups), "compressed-tensors", "no config_groups")

    @staticmethod
    def _scheme(name: str, group: dict, fmt: str) -> LayerScheme:
        w, a = group.get("weights") or {}, group.get("input_activations")
        where = f"config group {name!r} ({fmt})"
        _require(bool(w), "compressed-tensors", f"{where} without weights")
        _require(not group.get("output_activations"), "compressed-tensors", f"{where}: output_activations")
        bits, kind, strategy = int(w.get("num_bits", 0)), w.get("type"), w.get("strategy")
        _require(not w.get("dynamic", False), "compressed-tensors", f"{where}: dynamic weights")
        if fmt == "pack-quantized":
            _require(kind == "int" and bits in (4, 8), "compressed-tensors", f"{where}: {kind} {bits}-bit weights")
            _require(a is None, "compressed-tensors", f"{where}: activation quantization with packed int weights")
            _require(strategy in ("group", "channel"), "compressed-tensors", f"{where}: strategy {strategy!r}")
            group_size = int(w["group_size"]) if strategy == "group" else -1
            actorder = w.get("actorder")
            _require(actorder in (None, "group", "weight", "static", "dynamic"), "compressed-tensors", f"{where}")
            return LayerScheme(
                "ct_wna16",
                bits,
                group_size,
                sym=bool(w.get("symmetric", True)),
                desc_act=actorder == "group",
                fmt=f"compressed-tensors {fmt} int{bits}",
            )
        if fmt not in ("float-quantized", "int-quantized", "naive-quantized"):
            raise QuantConfigError(
                f"unsupported compressed-tensors checkpoint: {where}: format {fmt!r} (supported: pack-quantized, "
                "float-quantized, int-quantized)"
            )
        _require(bits == 8 and kind in ("float", "int"), "compressed-tensors", f"{where}: {kind} {bits}-bit weights")
        _require(w.get("symmetric", True), "compressed-tensors", f"{where}: asymmetric 8-bit weights")
        _require(strategy in ("tensor", "channel", "block"), "compressed-tensors", f"{where}: strategy {strategy!r}")
        block = tuple(w["block_structure"]) if strategy == "block" else None
        _require(block is None or kind == "float", "compressed-tensors", f"{where}: block int8 weights")
        static, zp = False, False
        if a is not None:
            _require(int(a.get("num_bits", 0)) == 8 and a.get("type") == kind, "compressed-tensors", where)
            if a.get("dynamic", False):
                want = "group" if block else "token"
                _require(a.get("strategy") == want, "compressed-tensors", f"{where}: dynamic {a.get('strategy')}")
                if block:
                    _require(int(a.get("group_size", block[1])) == block[1], "compressed-tensors", where)
            else:
                _require(a.get("strategy") == "tensor", "compressed-tensors", f"{where}: static {a.get('strategy')}")
                _require(block is None, "compressed-tensors", f"{where}: static activations with block weights")
                static = True
                zp = not a.get("symmetric", True)
                _require(not zp or kind == "int", "compressed-tensors", f"{where}: asymmetric fp8 activations")
        else:
            raise QuantConfigError(
                f"unsupported compressed-tensors checkpoint: {where}: 8-bit weights without activation quantization "
                "(W8A16) are not supported"
            )
        return LayerScheme(
            "fp8" if kind == "float" else "int8",
            8,
            block_size=block,
            static_input=static,
            input_zero_point=zp,
            per_tensor_weight=strategy == "tensor",
            fmt=f"compressed-tensors {fmt}",
        )

    def scheme_for(self, prefix, names):
        if any(_matches(p, n) for p in self.ignore for n in [prefix, *names]):
            return None
        found = {g: s for g, targets, s in self.groups if any(_matches(t, n) for t in targets for n in [*names])}
        if len(set(found.values())) > 1:
            raise QuantConfigError(
                f"layer {prefix}: its parts {names} fall in different compressed-tensors config groups "
                f"{sorted(found)}; lmforge needs one scheme per fused layer"
            )
        return next(iter(found.values()), None)

    def describe(self):
        groups = "; ".join(f"{name} ({', '.join(targets)}): {s.fmt}" for name, targets, s in self.groups)
        return f"compressed-tensors: {groups}; ignore {self.ignore}"


class FP8Config(QuantConfig):
    """HF transformers' fine-grained FP8 (`quant_method: fp8`): weight e4m3 + weight_scale_inv (a multiplier,
    despite the name), [ceil(N / bn), ceil(K / bk)] with `weight_block_size`, else one per tensor."""

    method = "fp8"

    def __init__(self, raw: dict):
        super().__init__(raw)
        block = raw.get("weight_block_size")
        self.block = tuple(int(b) for b in block) if block else None
        _require(self.block is None or len(self.block) == 2, "fp8", f"weight_block_size {block}")
        self.scheme = str(raw.get("activation_scheme", "dynamic"))
        _require(self.scheme in ("dynamic", "static"), "fp8", f"activation_scheme {self.scheme!r}")
        _require(self.block is None or self.scheme == "dynamic", "fp8", "static activations with block weights")
        fmt = str(raw.get("fmt", "e4m3"))
        _require(fmt == "e4m3", "fp8", f"fmt {fmt!r} (only e4m3)")

    def scheme_for(self, prefix, names):
        if self._not_converted(names):
            return None
        return LayerScheme(
            "fp8",
            8,
            block_size=self.block,
            static_input=self.scheme == "static",
            scale_name="weight_scale_inv",
            per_tensor_weight=self.block is None,
            fmt="fp8" + (f" (block {list(self.block)})" if self.block else ""),
        )

    def describe(self):
        weights = f"block {list(self.block)} scales" if self.block else "per-tensor scales"
        return f"fp8 (HF fine-grained): e4m3 weights with {weights}, {self.scheme} activations"


class GGUFConfig(QuantConfig):
    """GGUF weights kept packed on CPU (made by the model loader from the file, never read from a config.json):
    `types` maps each packed module (HF name, e.g. model.layers.0.self_attn.q_proj, or lm_head) to its GGUF type
    name; the loader packs exactly these (lmforge/weights/gguf.py: gguf_pack_plan), every other layer is dense."""

    method = "gguf"

    def __init__(self, types: dict[str, str], planes: dict[str, int]):
        super().__init__({"quant_method": "gguf"})
        self.types, self.planes = types, planes

    def scheme_for(self, prefix, names):
        if not names or any(n not in self.types for n in names):
            return None
        planes = {self.types[n]: self.planes[self.types[n]] for n in names}
        if len(set(planes.values())) != 1:
            raise QuantConfigError(f"layer {prefix}: its parts {names} pack into different int4 planes {planes}")
        fmt = "gguf " + "/".join(sorted(planes))
        return LayerScheme("gguf", 4, 32, sym=False, planes=next(iter(planes.values())), fmt=fmt)

    def expert_scheme_for(self, prefix, names):
        return None  # MoE experts are not packed (gguf_pack_plan leaves them out)

    def describe(self):
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        kinds = ", ".join(f"{t} x{n}" for t, n in sorted(counts.items()))
        return f"gguf kept packed as int4 planes of group 32: {kinds}"


_CONFIGS = {c.method: c for c in (AWQConfig, GPTQConfig, CompressedTensorsConfig, FP8Config)}


def parse_quant_config(raw) -> QuantConfig | None:
    """config.json's quantization_config (dict, HF config object or QuantConfig) -> QuantConfig, None if absent."""
    if raw is None or isinstance(raw, QuantConfig):
        return raw
    if not isinstance(raw, dict):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(vars(raw))
    method = str(raw.get("quant_method", "")).lower()
    if method not in _CONFIGS:
        raise QuantConfigError(
            f"unsupported quantization_config.quant_method {method!r}; lmforge loads: {', '.join(sorted(_CONFIGS))}"
        )
    return _CONFIGS[method](raw)
