"""The quantized side of a linear layer: which checkpoint tensors a scheme has, how each takes its TP shard and
its merged part, and how they become the canonical form of the backend ops (QUANT_CONTRACT.md).

A linear layer built under a quant_config holds a `QuantState`. How it decides whether it is quantized:
`attach_quant_states(model)` (called by the model loader right after the model is built, so it covers seed-style
models built from our builders too) gives each layer its module name and, from `quant_config.scheme_for`, its
scheme, and registers the scheme's tensors as parameters that stay unallocated until a tensor arrives. The
checkpoint then decides: a layer that receives its scheme's tensors is quantized, one that receives a float
`weight` is dense (MoE routers and other modules that a GPTQ/AWQ config does not list stay dense this way); one
that receives both, or only some of its tensors, fails at load with the layer, the scheme and what is wrong.
`finish_loading(model)` then converts every quantized layer (process_weights_after_loading).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.nn.quant.config import LayerScheme
from lmforge.nn.quant.packing import awq_unpack, pack_int32, unpack_int32

N, K = "N", "K"


class QuantLoadError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One checkpoint tensor of a scheme. dims: per axis (N | K | None, ratio): N / ratio or K / ratio elements
    (ceil), None: one element, the same on every rank. per_part: one value per merged part ([parts])."""

    name: str
    dtype: torch.dtype  # int32 / int8 / float8: the checkpoint's must be exactly this; int64 / float: any int / float
    dims: tuple[tuple[str | None, int], ...] = ()
    per_part: bool = False
    optional: bool = False


def tensor_specs(s: LayerScheme, k_full: int) -> list[TensorSpec]:
    g = k_full if s.group_size == -1 else s.group_size
    grouped = (K, g) if s.group_size != -1 else (None, 1)
    i32, f32 = torch.int32, torch.float32
    if s.kind == "awq":
        return [
            TensorSpec("qweight", i32, ((K, 1), (N, 8))),
            TensorSpec("qzeros", i32, (grouped, (N, 8))),
            TensorSpec("scales", f32, (grouped, (N, 1))),
        ]
    if s.kind == "gguf":  # K holds `planes` codes per weight (lmforge/weights/gguf_pack.py)
        per_word, per_group = 8 // s.planes, 32 // s.planes
        return [
            TensorSpec("qweight", i32, ((K, per_word), (N, 1))),
            TensorSpec("scales", f32, ((K, per_group), (N, 1))),
            TensorSpec("mins", f32, ((K, per_group), (N, 1))),
        ]
    p = 32 // s.bits
    if s.kind == "gptq":
        return [
            TensorSpec("qweight", i32, ((K, p), (N, 1))),
            TensorSpec("qzeros", i32, (grouped, (N, p))),
            TensorSpec("scales", f32, (grouped, (N, 1))),
            TensorSpec("g_idx", torch.int64, ((K, 1),), per_part=True, optional=True),
        ]
    if s.kind == "ct_wna16":
        specs = [
            TensorSpec("weight_packed", i32, ((N, 1), (K, p))),
            TensorSpec("weight_scale", f32, ((N, 1), grouped)),
            TensorSpec("weight_shape", torch.int64, ((None, 2),), per_part=True),
        ]
        if not s.sym:
            specs.append(TensorSpec("weight_zero_point", i32, ((N, p), grouped)))
        if s.desc_act:
            specs.append(TensorSpec("weight_g_idx", torch.int64, ((K, 1),), per_part=True))
        return specs
    wdtype = torch.float8_e4m3fn if s.kind == "fp8" else torch.int8
    specs = [TensorSpec("weight", wdtype, ((N, 1), (K, 1)))]
    if s.block_size is not None:
        specs.append(TensorSpec(s.scale_name, f32, ((N, s.block_size[0]), (K, s.block_size[1]))))
    elif s.per_tensor_weight:
        specs.append(TensorSpec(s.scale_name, f32, per_part=True))
    else:
        specs.append(TensorSpec(s.scale_name, f32, ((N, 1), (None, 1))))
    if s.static_input:
        specs.append(TensorSpec("input_scale", f32, per_part=True))
    if s.input_zero_point:
        specs.append(TensorSpec("input_zero_point", f32, per_part=True))
    return specs


@dataclass(frozen=True, slots=True)
class Geometry:
    """A layer's sharding in features. out_parts: per merged part (dst offset, local size, src start, full size);
    in_part: (local size, src start, full size) of the in-features."""

    out_parts: tuple[tuple[int, int, int, int], ...]
    in_part: tuple[int, int, int]

    @property
    def n(self) -> int:
        return sum(p[1] for p in self.out_parts)

    @property
    def k(self) -> int:
        return self.in_part[0]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class QuantState:
    """Per-layer: scheme, prefix, which tensors arrived, and after processing the prepared op input."""

    def __init__(self, scheme: LayerScheme, prefix: str, geometry: Geometry, device, act_dtype):
        self.scheme, self.prefix, self.geo = scheme, prefix, geometry
        self.device, self.act_dtype = device, act_dtype
        self.specs = {s.name: s for s in tensor_specs(scheme, geometry.in_part[2])}
        self.loaded: set[str] = set()
        self.prepared: dict | None = None
        self.canonical: dict | None = None
        self.perm: torch.Tensor | None = None
        self._check_geometry()

    def error(self, what: str) -> QuantLoadError:
        return QuantLoadError(f"layer {self.prefix} ({self.scheme.fmt}): {what}")

    def _check_geometry(self) -> None:
        s, (k_local, _, k_full) = self.scheme, self.geo.in_part
        if s.group_size > 0 and k_local % s.group_size:
            raise self.error(
                f"group size {s.group_size} does not divide its {k_local} local in-features "
                f"({k_full} over the TP ranks): run it with a tensor-parallel size that keeps in_features / tp a "
                f"multiple of {s.group_size}, or re-quantize with a smaller group size"
            )
        if s.kind == "gguf" and k_local != k_full:
            raise self.error("GGUF weights are kept packed only without tensor parallelism over in-features")
        if s.desc_act and k_local != k_full:
            raise self.error(
                "act-order (desc_act / g_idx) on a row-parallel layer under tensor parallelism is not supported; "
                "use tp=1 or a checkpoint quantized without act-order"
            )
        if s.block_size is not None and k_local != k_full and k_local % s.block_size[1]:
            raise self.error(f"FP8 block {list(s.block_size)} does not divide its {k_local} local in-features")

    def shape_of(self, spec: TensorSpec) -> tuple[int, ...]:
        sizes = {N: self.geo.n, K: self.geo.k}
        dims = tuple(r if sym is None else _ceil(sizes[sym], r) for sym, r in spec.dims)
        return (len(self.geo.out_parts), *dims) if spec.per_part else dims

    def empty(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        return torch.zeros(self.shape_of(spec), dtype=spec.dtype, device=self.device)

    # --- loading ---------------------------------------------------------------------------------------------

    def load(self, dst: torch.Tensor, name: str, src: torch.Tensor, part: int | None) -> None:
        """Copy this rank's slice of checkpoint tensor `src` (one part, or all parts when part is None) into dst."""
        spec = self.specs[name]
        if spec.dtype in (torch.int32, torch.int8, torch.float8_e4m3fn) and src.dtype != spec.dtype:
            raise self.error(f"{name} has dtype {src.dtype}, expected {spec.dtype}")
        if not spec.dtype.is_floating_point and (src.is_floating_point() or src.dtype == torch.bool):
            raise self.error(f"{name} has dtype {src.dtype}, expected an integer tensor")
        parts = range(len(self.geo.out_parts)) if part is None else [part]
        if spec.per_part:
            for i in parts:
                if any(sym is not None for sym, _ in spec.dims):
                    self._load_part(dst[i], spec, src, i)
                    continue
                value = src.reshape(-1) if spec.dims else src.reshape(())
                if tuple(value.shape) != tuple(dst.shape[1:]):
                    raise self.error(f"{name} has shape {tuple(src.shape)}, expected {tuple(dst.shape[1:]) or '[1]'}")
                dst[i].copy_(value)
            self.loaded.add(name)
            return
        if part is None and len(self.geo.out_parts) > 1:  # a merged tensor: split it along N into its parts
            axis, ratio = self._axis(spec, N)
            fulls = [p[3] for p in self.geo.out_parts]
            if any(f % ratio for f in fulls):
                raise self.error(f"{name}: merged parts {fulls} are not multiples of {ratio}")
            for i, piece in enumerate(src.split([f // ratio for f in fulls], dim=axis)):
                self._load_part(dst, spec, piece, i)
        else:
            self._load_part(dst, spec, src, 0 if part is None else part)
        self.loaded.add(name)

    @staticmethod
    def _axis(spec: TensorSpec, sym: str) -> tuple[int | None, int]:
        for axis, (s, r) in enumerate(spec.dims):
            if s == sym:
                return axis, r
        return None, 1

    def _load_part(self, dst: torch.Tensor, spec: TensorSpec, src: torch.Tensor, part: int) -> None:
        if src.dim() != len(spec.dims):
            raise self.error(f"{spec.name} has shape {tuple(src.shape)}, expected {len(spec.dims)} dims")
        dst_off, size, src_start, full = self.geo.out_parts[part]
        k_size, k_start, k_full = self.geo.in_part
        whole_n = len(self.geo.out_parts) == 1 and size == full
        for sym, (off, sz, start, fl, whole) in (
            (N, (dst_off, size, src_start, full, whole_n)),
            (K, (0, k_size, k_start, k_full, k_size == k_full)),
        ):
            axis, r = self._axis(spec, sym)
            if axis is None:
                continue
            if src.shape[axis] != _ceil(fl, r):
                raise self.error(
                    f"{spec.name} has shape {tuple(src.shape)}: expected {_ceil(fl, r)} along dim {axis} "
                    f"({sym} = {fl}{f' / {r}' if r > 1 else ''})"
                )
            if whole:
                continue
            if off % r or sz % r or start % r:
                raise self.error(
                    f"{spec.name}: the {sym} slice [{start}, {start + sz}) of this rank or part is not a multiple of "
                    f"{r} (pack factor, group or block size); use a tensor-parallel size that splits it evenly"
                )
            src = src.narrow(axis, start // r, sz // r)
            dst = dst.narrow(axis, off // r, sz // r)
        for axis, (sym, _) in enumerate(spec.dims):
            if sym is None and src.shape[axis] != dst.shape[axis]:
                raise self.error(f"{spec.name} has shape {tuple(src.shape)}, expected {dst.shape[axis]} at dim {axis}")
        dst.copy_(src)

    def missing(self) -> list[str]:
        return [n for n, s in self.specs.items() if n not in self.loaded and not s.optional]

    # --- conversion to the canonical forms -------------------------------------------------------------------

    def process(self, tensors: dict[str, torch.Tensor], get_op) -> None:
        """tensors: name -> loaded local tensor. Sets canonical (the op's prepare arguments) and prepared."""
        if self.missing():
            raise self.error(
                f"the checkpoint has no {', '.join(self.missing())} for it (got {', '.join(sorted(self.loaded))}); "
                "the checkpoint is incomplete or does not match its quantization_config"
            )
        s, op = self.scheme, self.scheme.op
        canonical = getattr(self, f"_canonical_{s.kind}")(tensors)
        self.canonical = canonical
        try:
            self.prepared = get_op(f"{op}_prepare")(**canonical)
        except ValueError as e:  # a backend's own limits (a CUDA kernel's group sizes, ...)
            raise self.error(f"the backend cannot run it: {e}") from e

    def _group(self) -> int:
        return self.geo.k if self.scheme.group_size == -1 else self.scheme.group_size

    def _act_order(self, q_kn: torch.Tensor, g_idx: torch.Tensor | None) -> torch.Tensor:
        """q [K, N] values; sorts K by g_idx when it is not the plain k // G, remembering the permutation of x."""
        if g_idx is None:
            return q_kn
        if not all(torch.equal(g_idx[0], g) for g in g_idx[1:]):
            raise self.error("its merged parts have different act-order g_idx; they cannot share one input order")
        g, k = self._group(), q_kn.shape[0]
        first = self.geo.in_part[1] // self.scheme.group_size if self.scheme.group_size > 0 else 0
        g_idx = g_idx[0] - first  # a row-parallel rank holds the groups from its first one on
        plain = torch.arange(k, device=g_idx.device) // g
        if torch.equal(g_idx, plain):
            return q_kn
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], plain):
            raise self.error(f"g_idx does not assign exactly {g} in-features to each group")
        self.perm = perm
        return q_kn[perm]

    def _wna16(self, q_kn: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict:
        bits = self.scheme.bits
        return dict(
            qweight=pack_int32(q_kn, bits, dim=0),
            scales=scales.to(self.act_dtype),
            zeros=zeros.to(self.act_dtype),
            bits=bits,
            group_size=self._group(),
        )

    def _canonical_awq(self, t: dict) -> dict:
        return self._wna16(awq_unpack(t["qweight"]), t["scales"], awq_unpack(t["qzeros"]).float())

    def _canonical_gptq(self, t: dict) -> dict:
        bits = self.scheme.bits
        zeros = unpack_int32(t["qzeros"], bits, dim=1).float()
        if self.scheme.gptq_v1:  # GPTQ v1 stores zero - 1
            zeros = zeros + 1
        q = self._act_order(unpack_int32(t["qweight"], bits, dim=0), t.get("g_idx"))
        return self._wna16(q, t["scales"], zeros)

    def _canonical_ct_wna16(self, t: dict) -> dict:
        bits, (k_full) = self.scheme.bits, self.geo.in_part[2]
        for i, (_, _, _, full) in enumerate(self.geo.out_parts):
            shape = tuple(t["weight_shape"][i].tolist())
            if shape != (full, k_full):
                raise self.error(f"weight_shape {list(shape)} of part {i} does not match the layer ({full}, {k_full})")
        q = unpack_int32(t["weight_packed"], bits, dim=1).t()  # [K, N], stored with the +2**(bits-1) offset
        scales = t["weight_scale"].t()
        if self.scheme.sym:
            zeros = torch.full_like(scales, 2 ** (bits - 1), dtype=torch.float32)
        else:
            zeros = unpack_int32(t["weight_zero_point"], bits, dim=0).t().float()
        q = self._act_order(q.contiguous(), t.get("weight_g_idx"))
        return self._wna16(q, scales, zeros)

    def _canonical_gguf(self, t: dict) -> dict:
        # scales and mins stay float32 (GGUF's float16 products are exact there); the int4 kernel takes bf16
        # activations unless the model already computes in a half type
        compute = torch.bfloat16 if self.act_dtype == torch.float32 else None
        return dict(
            qweight=t["qweight"],
            scales=t["scales"].float(),
            zeros=None,
            mins=t["mins"].float(),
            bits=4,
            group_size=32,
            planes=self.scheme.planes,
            compute_dtype=compute,
        )

    def _per_part_to_channel(self, values: torch.Tensor) -> torch.Tensor:
        """[parts] -> [1] when there is one part, else [N, 1] (each part's rows get its value)."""
        if values.numel() == 1:
            return values.reshape(1)
        sizes = [p[1] for p in self.geo.out_parts]
        return values.repeat_interleave(torch.tensor(sizes, device=values.device)).reshape(-1, 1)

    def _weight_scale(self, t: dict) -> torch.Tensor:
        scale = t[self.scheme.scale_name]
        return self._per_part_to_channel(scale) if self.scheme.per_tensor_weight else scale

    def _input_scale(self, t: dict) -> torch.Tensor | None:
        return t["input_scale"].amax().reshape(1) if self.scheme.static_input else None

    def _canonical_fp8(self, t: dict) -> dict:
        return dict(
            weight=t["weight"],
            weight_scale=self._weight_scale(t),
            input_scale=self._input_scale(t),
            block_size=self.scheme.block_size,
        )

    def _canonical_int8(self, t: dict) -> dict:
        zp = None
        if self.scheme.input_zero_point:
            zp = t["input_zero_point"]
            if not torch.all(zp == zp[0]):
                raise self.error(f"its merged parts have different input zero points {zp.tolist()}")
            zp = zp[:1]
            if not torch.all(t["input_scale"] == t["input_scale"][0]):
                raise self.error("asymmetric static activations need one input_scale for all merged parts")
        return dict(
            weight=t["weight"],
            weight_scale=self._weight_scale(t),
            input_scale=self._input_scale(t),
            input_zero_point=zp,
        )
