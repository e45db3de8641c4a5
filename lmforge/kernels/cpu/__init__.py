"""lmforge's own CPU kernels: int4 linear on float32 activations (kernels.c: a row layout for batch 1; q4_cols.c: a
column layout for 5-255 rows on AVX-512), fused RMSNorm + residual, rotary, SiLU-and-mul (pointwise.c) and paged
attention over a float32 or float16 KV cache (attention.c), for a decode step of a few ops per layer; temperature
sampling (sampling.c); recorded steps replayed from C (program.c).

The C files are compiled into one library on first use with the machine's C compiler for this very CPU (`-O3
-march=native -fopenmp`, about a second) into `~/.cache/lmforge/cpu-kernels/<hash>.so` ($XDG_CACHE_HOME; the hash covers
the sources, the compiler, its flags and the CPU's flags) and loaded with ctypes. With no compiler, a failed build, or
LMFORGE_CPU_KERNELS=0, `available()` is False and the backends run their plain-torch code (the reference these kernels
are tested against: tests/kernels/test_cpu_kernels.py). LMFORGE_CPU_KERNELS_CFLAGS adds compiler flags: the tests build
the AVX2 and plain-C variants on an AVX-512 machine that way. Every wrapper here checks what it is given and returns
None for what the C code does not handle, so a caller falls back to torch. Every per-step call goes through
`recording._call`, so a decode step can be recorded and replayed (engine/cpu_graph.py)."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from . import recording as _recording_module
from .recording import Arena, KernelProgram, _call, _empty, recording  # noqa: F401 (Arena, KernelProgram, recording: for callers)

logger = logging.getLogger(__name__)

_SOURCE_NAMES = ("kernels.c", "q4_cols.c", "pointwise.c", "attention.c", "q4_int8.c", "sampling.c", "program.c")
_SOURCES = [Path(__file__).with_name(name) for name in _SOURCE_NAMES]
_HEADERS = [Path(__file__).with_name(name) for name in ("simd.h", "q4.h")]  # in the cache key, not on the command line
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_C = ctypes.c_int
_SIGNATURES = {
    "lmf_simd_width": (ctypes.c_int, []),
    "lmf_run_program": (ctypes.c_int64, [_P, _P, _I, _C]),
    "lmf_q4_linear": (None, [_P, _I, _I, _P, _C, _P, _P, _C, _P, _I, _C, _P, _I, _C]),
    "lmf_q8_available": (ctypes.c_int, []),
    "lmf_q4_linear_q8": (None, [_P, _I, _I, _P, _C, _P, _P, _C, _P, _I, _P, _I, _C]),
    "lmf_q4_cols_available": (ctypes.c_int, []),
    "lmf_q4_cols": (None, [_P, _C, _I, _I, _P, _C]),
    "lmf_q4_linear_cols": (None, [_P, _I, _I, _P, _C, _P, _P, _C, _P, _I, _P, _I, _C]),
    "lmf_q4_dequantize": (None, [_P, _C, _P, _P, _C, _I, _I, _C, _P, _C]),
    "lmf_rms_norm": (None, [_P, _P, _P, _P, _P, _I, _I, _I, _I, _F, _F, _C]),
    "lmf_rope": (None, [_P, _I, _I, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _C]),
    "lmf_silu_and_mul": (None, [_P, _I, _I, _I, _P, _C]),
    "lmf_ggml_pairs": (None, [_P, _I, _I, _I, _P, _C]),
    "lmf_q4_repack": (None, [_P, _I, _I, _C, _P, _C]),
    "lmf_sample_temperature": (None, [_P, _I, _I, _I, _P, _P, _P, _C]),
    "lmf_embedding": (None, [_P, _I, _P, _I, _I, _P, _C]),
    "lmf_cos_sin": (None, [_P, _P, _I, _I, _F, _F, _P, _P, _C]),
    "lmf_paged_attention": (
        None,
        [
            _P,
            _I,
            _P,
            _I,
            _P,
            _I,
            _P,
            _I,
            _P,
            _P,
            _P,
            _I,
            _I,
            _I,
            _I,
            _I,
            _I,
            _I,
            _I,
            _F,
            _I,
            _I,
            _P,
            _P,
            _I,
            _P,
            _I,
            _P,
            _C,
            _C,
        ],
    ),  # fmt: skip
}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    from lmforge.engine.startup import lmforge_cache_dir

    return Path(lmforge_cache_dir()) / "cpu-kernels"


def _build() -> ctypes.CDLL | None:
    if os.environ.get("LMFORGE_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        logger.info("CPU kernels off (LMFORGE_CPU_KERNELS=0): plain torch ops")
        return None
    cc = _compiler()
    if cc is None:
        logger.info("no C compiler found (cc, gcc, clang or $CC): CPU kernels off, plain torch ops")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    source = b"\0".join(path.read_bytes() for path in _SOURCES + _HEADERS)
    flags = _FLAGS + os.environ.get("LMFORGE_CPU_KERNELS_CFLAGS", "").split()  # e.g. -mno-avx512f, for tests
    key = hashlib.sha256(b"\0".join([source, cc.encode(), version.encode(), " ".join(flags).encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]  # fmt: skip
    path = _cache_dir() / f"lmforge_cpu_{key}.so"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                out = Path(tmp) / path.name
                proc = subprocess.run(
                    [cc, *flags, *map(str, _SOURCES), "-o", str(out), "-lm"],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                if proc.returncode != 0:
                    logger.warning("CPU kernels did not compile (%s): plain torch ops\n%s", cc, proc.stderr[-2000:])
                    return None
                os.replace(out, path)  # atomic: a concurrent process sees the whole library or none
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("CPU kernels not built (%s): plain torch ops", e)
            return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        logger.warning("CPU kernels did not load (%s): plain torch ops", e)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    logger.info("CPU kernels: %s (%d-lane float32 SIMD)", path.name, lib.lmf_simd_width())
    _recording_module.set_library(lib)
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first call; None when off or unbuildable (then torch ops run)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _build()
                _tried = True
    return _lib


def available() -> bool:
    return library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32_rows(t: torch.Tensor) -> bool:
    """A float32 CPU tensor whose last dim is contiguous (rows may be strided)."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1


# ---- int4 linear --------------------------------------------------------------------------------------------


def q4_prepare(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    planes: int,
    zeros: bool,
    int8_activations: bool = False,
) -> dict | None:
    """The canonical wna16 tensors (QUANT_CONTRACT.md: qweight int32 [P * K / 8, N], scales and zeros, or mins,
    [P * K / G, N]) -> the q4 layout of kernels.c (or its one-byte-code form for two planes whose scales differ by
    16, as GGUF's 5- and 8-bit types pack); None when the kernels are off or the shape does not fit.
    int8_activations: q4_linear may round x to int8 per 32 values from Q8_MIN_ROWS rows on (q4_int8.c), where the
    layer's shape and the build allow it ("q4_int8" says whether it will)."""
    lib = library()
    kp, n = qweight.shape[0] * 8, qweight.shape[1]
    if lib is None or qweight.device.type != "cpu" or group_size % 32 or kp % (32 * planes) or kp % group_size:
        return None
    # [N, P*K / 2] bytes of two codes each, low nibble first (the canonical words' bytes)
    pairs = qweight.t().contiguous().view(torch.uint8)
    rep = group_size // 32
    s = scales.float().t().repeat_interleave(rep, dim=1).contiguous()  # [N, P*K/32]
    o = offsets.float().t().repeat_interleave(rep, dim=1)
    mins = (-o * s if zeros else o).contiguous()  # w = (q - z) * s = q * s - z * s
    k = kp // planes
    nb = k // 32
    # GGUF's 5- and 8-bit types: w = (lo * s + m0) + (hi * 16s + m1) = (lo + 16 hi) * s + (m0 + m1), one byte code
    # per weight: half the arithmetic of two int4 planes over the same bytes
    collapse = planes == 2 and torch.equal(s[:, nb:], 16 * s[:, :nb])
    bits = 8 if collapse else 4
    codes = torch.empty(n, k if collapse else kp // 2, dtype=torch.uint8)
    lib.lmf_q4_repack(pairs.data_ptr(), n, kp, bits, codes.data_ptr(), torch.get_num_threads())
    if collapse:
        s, mins, planes = s[:, :nb].contiguous(), (mins[:, :nb] + mins[:, nb:]).contiguous(), 1
    # float16 scales and mins where that is exact (GGUF stores Q4_0/Q4_1/Q8_0's so): Q4_1 then holds 0.625 bytes a
    # weight instead of 0.75
    s16, m16 = s.half(), mins.half()
    half = bool(torch.equal(s16.float(), s) and torch.equal(m16.float(), mins))
    if half:
        s, mins = s16, m16
    # the int8 path takes one plane of K a multiple of 64 (at most 32K) in a build with its vector code
    int8 = int8_activations and planes == 1 and k % 64 == 0 and k <= 32 * 1024 and bool(lib.lmf_q8_available())
    prepared = {"q4": codes, "q4_bits": bits, "q4_scales": s, "q4_mins": mins, "q4_half": half, "k": k, "n": n,
                "planes": planes, "q4_int8": int8}  # fmt: skip
    if planes == 1 and n % 32 == 0 and lib.lmf_q4_cols_available():
        # the column layout for Q4_COLS_MIN_ROWS .. Q4_COLS_MAX_ROWS rows (kernels.c, lmf_q4_linear_cols): the codes
        # a second time (the batch-1 kernel reads the row layout), and the scales and mins as [N / 32, K / 32, 32]
        cols = torch.empty_like(codes)
        lib.lmf_q4_cols(codes.data_ptr(), bits, n, k, cols.data_ptr(), torch.get_num_threads())
        tiled = lambda t: t.view(n // 32, 32, -1).transpose(1, 2).contiguous()  # noqa: E731
        prepared.update(q4_cols=cols, q4_cols_scales=tiled(s), q4_cols_mins=tiled(mins))
    return prepared


def ggml_pairs(nibble_bytes: torch.Tensor) -> torch.Tensor | None:
    """gguf_pack._pairs in C: chunks [..., L] of ggml nibble bytes (byte j: value j low, value L + j high) ->
    [..., L] bytes of the values in order, two per byte; None when the kernels are off."""
    lib = library()
    if lib is None:
        return None
    # chunks read in place when they are evenly strided rows (a column slice of the GGUF blocks)
    src = nibble_bytes if nibble_bytes.stride(-1) == 1 else nibble_bytes.contiguous()
    rows = src.reshape(-1, src.shape[-1])  # keeps the unit last stride (a view, or a contiguous copy)
    out = torch.empty(rows.shape, dtype=torch.uint8)
    lib.lmf_ggml_pairs(rows.data_ptr(), rows.shape[0], rows.shape[1], rows.stride(0), out.data_ptr(),
                       torch.get_num_threads())  # fmt: skip
    return out.view(nibble_bytes.shape)


# from this many activation rows on (a prefill), dequantizing the weight once and running torch's dense GEMM is
# faster than the row kernel (2-core AVX-512 Xeon, 576 x 3072: 32 rows 3.5 ms row kernel vs 1.7 + 4.0 ms
# dequantize + GEMM; 128 rows 12.4 vs 1.1 + 5.5 ms)
Q4_GEMM_MIN_ROWS = 64
# AVX-512 builds, layers with a column layout (q4_prepare): Q4_COLS_MIN_ROWS <= rows < Q4_COLS_MAX_ROWS run
# lmf_q4_linear_cols instead of the dot4x4 tiles and of dequantize + GEMM (2-core Xeon, best of 7: 1.1-1.5x the
# tiles at 21-63 rows, 1.05-1.6x dequantize + MKL at 64-128 rows; MKL is 5-25% ahead from 512 rows on)
Q4_COLS_MIN_ROWS = 5
Q4_COLS_MAX_ROWS = 256
# Opt-in (LMFORGE_CPU_INT8_ACTIVATIONS=1, GGUF weights only): from this many rows on (decode batches, prefills) x is
# rounded to int8 per 32-value block and the dot products are integer ones (q4_int8.c, llama.cpp's Q4 x Q8 scheme).
# 1.3-2x faster than the float32 kernels at 32 rows and 1.1-3x faster than dequantize + GEMM at 64-512 rows, but it
# moves the embedded model's logits by ~1 (HF's first-token margin on the chat prompt is 0.08: the answer changes),
# so it is off by default; fewer rows (the batch-1 decode) never take it.
Q8_MIN_ROWS = 4
INT8_ACTIVATIONS_ENV = "LMFORGE_CPU_INT8_ACTIVATIONS"


def q4_dequantize(prepared: dict) -> torch.Tensor:
    """The float32 weight [N, K] (planes summed) of a q4_prepare layout."""
    n, k = prepared["n"], prepared["k"]
    w = torch.empty(n, k, dtype=torch.float32)
    library().lmf_q4_dequantize(
        _ptr(prepared["q4"]), prepared["q4_bits"], _ptr(prepared["q4_scales"]), _ptr(prepared["q4_mins"]),
        int(prepared["q4_half"]), n, k,
        prepared["planes"], _ptr(w), torch.get_num_threads(),
    )  # fmt: skip
    return w


def q4_linear(x: torch.Tensor, prepared: dict, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., K] float32 -> [..., N] float32; None for what the kernel does not take (then torch runs).
    Called ~120 times a decode step: the checks are few and the weights' pointers are read once."""
    n, k = prepared["n"], prepared["k"]
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != k:
        return None
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,)):
        return None
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    q8 = m >= Q8_MIN_ROWS and prepared["q4_int8"]
    cols = not q8 and Q4_COLS_MIN_ROWS <= m < Q4_COLS_MAX_ROWS and "q4_cols" in prepared
    if m >= Q4_GEMM_MIN_ROWS and not (q8 or cols):
        return torch.nn.functional.linear(x, q4_dequantize(prepared), bias)
    weights = prepared.get("_ptrs")
    if weights is None:  # (codes, bits, scales, mins, half): the prepared tensors live as long as the layer
        weights = prepared["_ptrs"] = (_ptr(prepared["q4"]), prepared["q4_bits"], _ptr(prepared["q4_scales"]),
                                       _ptr(prepared["q4_mins"]), int(prepared["q4_half"]))  # fmt: skip
    y = _empty(m, n)
    bias = None if bias is None else bias.contiguous()
    if cols:
        col_ptrs = prepared.get("_cols_ptrs")
        if col_ptrs is None:
            col_ptrs = prepared["_cols_ptrs"] = (_ptr(prepared["q4_cols"]), prepared["q4_bits"],
                                             _ptr(prepared["q4_cols_scales"]), _ptr(prepared["q4_cols_mins"]),
                                             int(prepared["q4_half"]))  # fmt: skip
        _call(_lib.lmf_q4_linear_cols, x2.data_ptr(), m, k, *col_ptrs, _ptr(bias), n, y.data_ptr(), n,
              torch.get_num_threads())  # fmt: skip
        return y if x2 is x else y.view(*x.shape[:-1], n)
    if q8:
        _call(_lib.lmf_q4_linear_q8, x2.data_ptr(), m, k, *weights, _ptr(bias), n, y.data_ptr(), n,
              torch.get_num_threads())  # fmt: skip
        return y if x2 is x else y.view(*x.shape[:-1], n)
    _call(_lib.lmf_q4_linear, x2.data_ptr(), m, k, *weights, _ptr(bias), n, prepared["planes"], y.data_ptr(), n,
          torch.get_num_threads())  # fmt: skip
    return y if x2 is x else y.view(*x.shape[:-1], n)


# ---- elementwise ----------------------------------------------------------------------------------------------


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, weight_offset: float
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    lib = library()
    if lib is None or x.dim() < 1 or not _f32_rows(x) or weight.dtype != torch.float32 or not weight.is_contiguous():
        return None
    dim = x.shape[-1]
    if weight.shape != (dim,) or (residual is not None and (residual.shape != x.shape or not _f32_rows(residual))):
        return None
    x2 = x.reshape(-1, dim)  # a view for row-strided 2-D inputs (the usual case); a copy otherwise
    r2 = None if residual is None else residual.reshape(-1, dim)
    out = _empty(x2.shape)
    res_out = None if residual is None else _empty(x2.shape)
    _call(
        lib.lmf_rms_norm,
        _ptr(x2), _ptr(r2), _ptr(weight), _ptr(out), _ptr(res_out), x2.shape[0], dim, x2.stride(0),
        0 if r2 is None else r2.stride(0), eps, weight_offset, torch.get_num_threads(),
    )  # fmt: skip
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


def _tokens_heads(t: torch.Tensor) -> bool:
    # [T, H, D] with heads packed in a row: head stride D, token stride anything
    return t.dim() == 3 and _f32_rows(t) and t.stride(1) == t.shape[2]


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    lib = library()
    if lib is None or not (_tokens_heads(q) and _tokens_heads(k)) or q.shape[0] != k.shape[0]:
        return None
    t, hq, d = q.shape
    rot = cos.shape[-1]
    if k.shape[2] != d or rot > d or rot % 2 or cos.shape != (t, rot) or sin.shape != (t, rot):
        return None
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    q_out, k_out = _empty(q.shape), _empty(k.shape)
    _call(
        lib.lmf_rope,
        _ptr(q), q.stride(0), hq, _ptr(k), k.stride(0), k.shape[1], t, d, rot, _ptr(cos), _ptr(sin), _ptr(q_out),
        _ptr(k_out), torch.get_num_threads(),
    )  # fmt: skip
    return q_out, k_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    lib = library()
    if lib is None or not _f32_rows(x) or x.shape[-1] % 2:
        return None
    x2 = x.reshape(-1, x.shape[-1])
    d = x.shape[-1] // 2
    out = _empty(x2.shape[0], d)
    _call(lib.lmf_silu_and_mul, _ptr(x2), x2.shape[0], d, x2.stride(0), _ptr(out), torch.get_num_threads())
    return out.view(*x.shape[:-1], d)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """Rows of a float32 table [V, D] (rows contiguous) for int64 ids [...] -> [..., D]; None otherwise."""
    lib = library()
    if lib is None or ids.dtype != torch.int64 or ids.device.type != "cpu" or not ids.is_contiguous():
        return None
    if weight.dim() != 2 or not _f32_rows(weight):
        return None
    n, dim = ids.numel(), weight.shape[1]
    out = _empty(n, dim)
    _call(lib.lmf_embedding, _ptr(weight), weight.stride(0), _ptr(ids), n, dim, _ptr(out), torch.get_num_threads())
    return out.view(*ids.shape, dim)


def sample_temperature(logits: torch.Tensor, temperatures: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """One token per row of float32 logits [rows, vocab] (rows may be strided) from softmax(logits / temperature),
    by inverse CDF at u [rows] float64 in [0, 1); int64 [rows], -1 where a row needs the torch draw (a NaN or +inf
    in it, or nothing finite). None when the kernels are off or the inputs do not fit."""
    lib = library()
    if lib is None or logits.dim() != 2 or not _f32_rows(logits) or logits.shape[1] == 0:
        return None
    rows = logits.shape[0]
    temps = temperatures.to(torch.float32).contiguous()
    u = u.to(torch.float64).contiguous().view(-1)
    if temps.shape != (rows,) or u.shape != (rows,) or temps.device.type != "cpu" or u.device.type != "cpu":
        return None
    out = torch.empty(rows, dtype=torch.int64)
    lib.lmf_sample_temperature(_ptr(logits), rows, logits.shape[1], logits.stride(0), _ptr(temps), _ptr(u), _ptr(out),
                               torch.get_num_threads())  # fmt: skip
    return out


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, position_scale: float, attention_scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """int64 positions [T], float32 inv_freq [half] -> (cos, sin) [T, 2 * half] float32; None otherwise."""
    lib = library()
    if lib is None or position_ids.dtype != torch.int64 or position_ids.dim() != 1 or not position_ids.is_contiguous():
        return None
    if inv_freq.dtype != torch.float32 or inv_freq.dim() != 1 or not inv_freq.is_contiguous():
        return None
    if position_ids.device.type != "cpu" or inv_freq.device.type != "cpu":
        return None
    t, half = position_ids.shape[0], inv_freq.shape[0]
    cos, sin = _empty(t, 2 * half), _empty(t, 2 * half)
    _call(lib.lmf_cos_sin, _ptr(position_ids), _ptr(inv_freq), t, half, position_scale, attention_scaling, _ptr(cos),
          _ptr(sin), torch.get_num_threads())  # fmt: skip
    return cos, sin


# ---- paged attention ------------------------------------------------------------------------------------------


def _cache_rows(cache: torch.Tensor) -> bool:
    # [num_blocks, block_size, heads, dim] of float32 or float16: slots evenly strided, heads packed
    return (
        cache.dim() == 4
        and cache.dtype in (torch.float32, torch.float16)
        and cache.device.type == "cpu"
        and cache.stride(-1) == 1
        and cache.stride(2) == cache.shape[3]
        and cache.stride(0) == cache.shape[1] * cache.stride(1)
    )


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta,
    scale: float,
    sliding_window: int | None,
    v_head_dim: int | None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Attention of float32 queries to their sequence's cached keys (causal, optional window) in a float32 or float16
    cache (read as float32); None for what the kernel does not take (a quantized, bfloat16 or float8 cache;
    softcapping is the caller's check). Given this step's float32 key and value [T, kv_heads, d], they are written
    to meta.slot_mapping's slots first, as fill_kv_cache does (into a float16 cache: rounded, clamped to +-65504)."""
    lib = library()
    if lib is None or not isinstance(k_cache, torch.Tensor) or not isinstance(v_cache, torch.Tensor):
        return None
    if not (_tokens_heads(query) and _cache_rows(k_cache) and _cache_rows(v_cache)):
        return None
    if k_cache.dtype != v_cache.dtype:
        return None
    t, hq, d = query.shape
    hk, dk = k_cache.shape[2], k_cache.shape[3]
    dv = v_head_dim or v_cache.shape[3]
    if dk != d or hq % hk or hq // hk > 64 or v_cache.shape[3] < dv or v_cache.shape[2] != hk:
        return None
    tables, q_start, q_lens, kv_lens = (
        meta.block_tables, meta.q_start_loc, meta.q_seqlens, meta.kv_seqlens
    )  # fmt: skip
    if any(x.dtype != torch.int32 or x.device.type != "cpu" for x in (tables, q_start, q_lens, kv_lens)):
        return None
    # locals: a temporary's memory must outlive the call that reads its pointer
    tables = tables if tables.stride(-1) == 1 else tables.contiguous()
    q_start, q_lens, kv_lens = q_start.contiguous(), q_lens.contiguous(), kv_lens.contiguous()
    slots = None
    if key is not None:
        slots = meta.slot_mapping
        if (
            value is None
            or v_cache is k_cache
            or not (_tokens_heads(key) and _tokens_heads(value))
            or key.shape != (t, hk, d)
            or value.shape != (t, hk, dv)
            or slots.dtype != torch.int64
            or slots.shape != (t,)
        ):
            return None
        slots = slots.contiguous()
    out = _empty(t, hq, dv)
    _call(
        lib.lmf_paged_attention,
        _ptr(query), query.stride(0), _ptr(k_cache), k_cache.stride(1), _ptr(v_cache), v_cache.stride(1),
        _ptr(tables), tables.stride(0), _ptr(q_start), _ptr(q_lens), _ptr(kv_lens), meta.num_seqs, t, hq, hk, d,
        dv, v_cache.shape[3], meta.block_size, scale, sliding_window or 0, meta.max_kv_seqlen, _ptr(out), _ptr(key),
        0 if key is None else key.stride(0), _ptr(value), 0 if value is None else value.stride(0), _ptr(slots),
        int(k_cache.dtype == torch.float16), torch.get_num_threads(),
    )  # fmt: skip
    return out
