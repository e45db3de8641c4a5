"""What a cuda-backend Triton kernel compiles to on a Hopper GPU, without one: registers, spills, shared memory and
the instruction mix of each loop of its SASS, one JSON line per kernel.

The kernel's own Python wrapper runs once on CPU tensors with the launch intercepted; the captured arguments become
the compile signature (pointers and integers divisible by 16 specialized as a launch would specialize them), and
Triton compiles for the target with the ptxas / cuobjdump it ships. So device time goes to timing, not to finding
out that a loop spills or that a load is 8 bytes wide. The Triton here may not be the GPU machine's (3.9 on the dev
machine, 3.6 on the H200 one): compare variants of a kernel within one version, and confirm a finding on the device.

    python tools/sass_report.py [w4gemv] [decode:int8:128] [decode:bf16:64] [scaled_mm:block:300] [--arch 90]
        [--keep DIR]   (also writes each kernel's .ttgir / .sass there)

Presets: w4gemv (int4 GEMV, llama-8b qkv, one row); decode:<bf16|int8|int4>:<head_dim> (decode attention, 4
sequences x 2,048 keys, 32 / 8 heads); scaled_mm:<block|channel>:<rows> (FP8 GEMM, llama-8b qkv).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.float8_e4m3fn: "fp8e4nv",
}
_MEMORY = ("LDG", "STG", "LDS", "STS", "LDSM", "LDGSTS", "LDL", "STL")


def capture(kernel, call) -> tuple[tuple, dict]:
    """The arguments of the launch `call()` makes of `kernel` (the launch itself does not happen)."""
    got: dict = {}
    original = kernel.run

    def run(*args, grid, warmup, **kwargs):
        got["args"], got["kwargs"] = args, kwargs

    kernel.run = run
    try:
        call()
    except Exception:  # the wrapper may go on to use outputs the skipped launch never wrote
        if "args" not in got:
            raise
    finally:
        kernel.run = original
    if "args" not in got:
        raise RuntimeError(f"{kernel.fn.__name__} was not launched")
    return got["args"], got["kwargs"]


def compile_for(kernel, args: tuple, kwargs: dict, arch: int):
    """triton.compile of `kernel` for sm_<arch> with the signature of one captured launch."""
    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    values = dict(zip([p.name for p in kernel.params], args, strict=False)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name], attrs[(i,)] = "*" + _TYPES[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            specialize = not p.do_not_specialize
            if specialize and v == 1:
                signature[p.name], constexprs[(i,)] = "constexpr", 1
            else:
                signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if specialize and v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{p.name}: cannot type a {type(v).__name__} argument")
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_of(cubin: bytes, path: str) -> tuple[str, str]:
    """(SASS listing, resource-usage line) of a cubin, by the cuobjdump Triton ships."""
    with open(path, "wb") as f:
        f.write(cubin)
    listing = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    return listing, usage.strip().splitlines()[-1].strip()


def loops(listing: str, min_len: int = 40) -> list[dict]:
    """Each backward branch's body of at least min_len instructions: its size, opcode counts, memory opcodes."""
    ins = []  # (address, opcode, whole instruction)
    for line in listing.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            words = m.group(2).split()
            ins.append((int(m.group(1), 16), words[1] if words[0].startswith("@") else words[0], m.group(2)))
    out = []
    for addr, op, text in ins:
        target = re.search(r"0x([0-9a-f]+)", text) if op.startswith("BRA") else None
        if target is None or int(target.group(1), 16) >= addr:
            continue
        start = int(target.group(1), 16)
        body = [o for a, o, _ in ins if start <= a <= addr]
        if len(body) < min_len:
            continue
        ops = collections.Counter(o.split(".")[0] for o in body)
        memory = collections.Counter(o for o in body if o.split(".")[0] in _MEMORY)
        out.append(dict(start=hex(start), instructions=len(body), ops=dict(ops.most_common(16)), memory=dict(memory)))
    return out


def _usage_fields(usage: str) -> dict:
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}


# --- presets: (kernel, call, constexpr overrides where CPU tensors switch a path), built from CPU tensors ----


def _w4gemv():
    from lmforge.kernels.cuda import quant_w4gemv as gv

    k, n = 4096, 6144
    x = torch.zeros(1, k, dtype=torch.bfloat16)
    packed = torch.zeros(n, k // 8, dtype=torch.int32)
    scales = torch.zeros(k // 128, n, dtype=torch.bfloat16)
    # CPU tensors select the unpack without inline PTX (the interpreter's path): the GPU takes the PTX one
    return gv._w4_gemv_kernel, lambda: gv.w4_gemv(x, packed, scales, scales.clone(), 128), {"ASM": True}


def _decode(fmt: str, head_dim: int):
    from lmforge.kernels.cuda import decode_attention as da

    seqs, block = 4, 64
    blocks = seqs * 32
    q = torch.zeros(seqs, 32, head_dim, dtype=torch.bfloat16)
    tables = torch.arange(blocks, dtype=torch.int32).view(seqs, 32)
    lens = torch.full((seqs,), 2048, dtype=torch.int32)
    kw = {}
    if fmt == "bf16":
        k = torch.zeros(blocks, block, 8, head_dim, dtype=torch.bfloat16)
    else:
        bits = {"int8": 8, "int4": 4}[fmt]
        k = torch.zeros(blocks, block, 8, head_dim * bits // 8, dtype=torch.uint8)
        sz = torch.zeros(blocks, block, 8, 2)
        kw = dict(k_scales_zeros=sz, v_scales_zeros=sz.clone(), quant_bits=bits)
    call = lambda: da.decode_attention(q, k, k.clone(), tables, lens, head_dim**-0.5, num_splits=4, **kw)  # noqa: E731
    return da._decode_split_kernel, call, {}


def _scaled_mm(mode: str, rows: int):
    from lmforge.kernels.cuda import quant_scaled_mm as sm

    k, n = 4096, 6144
    a = torch.zeros(rows, k, dtype=torch.float8_e4m3fn)
    b = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
    if mode == "block":
        scales = (torch.ones(rows, k // 128), torch.ones(n // 128, k // 128))
        call = lambda: sm.scaled_mm(a, b, *scales, torch.bfloat16, block_size=(128, 128))  # noqa: E731
    else:
        call = lambda: sm.scaled_mm(a, b, torch.ones(rows), torch.ones(n), torch.bfloat16)  # noqa: E731
    return sm._scaled_mm_kernel, call, {}


def preset(name: str):
    kind, *rest = name.split(":")
    if kind == "w4gemv" and not rest:
        return _w4gemv()
    if kind == "decode" and len(rest) == 2:
        return _decode(rest[0], int(rest[1]))
    if kind == "scaled_mm" and len(rest) == 2:
        return _scaled_mm(rest[0], int(rest[1]))
    raise SystemExit(f"unknown preset {name!r}; see --help")


def report(name: str, arch: int = 90, keep: str | None = None) -> dict:
    """One kernel's JSON record."""
    import tempfile

    from lmforge.kernels.cuda import decode_attention

    num_sms = decode_attention._num_sms
    decode_attention._num_sms = lambda device: 132  # the H200's SM count for the split heuristics (CPU tensors)
    try:
        kernel, call, overrides = preset(name)
        args, kwargs = capture(kernel, call)
        kwargs = kwargs | overrides
    finally:
        decode_attention._num_sms = num_sms
    compiled = compile_for(kernel, args, kwargs, arch)
    folder = keep or tempfile.mkdtemp(prefix="sass_report_")
    stem = os.path.join(folder, name.replace(":", "_"))
    listing, usage = sass_of(compiled.asm["cubin"], stem + ".cubin")
    if keep:
        with open(stem + ".sass", "w") as f:
            f.write(listing)
        with open(stem + ".ttgir", "w") as f:
            f.write(compiled.asm["ttgir"])
    return dict(
        kernel=kernel.fn.__name__,
        preset=name,
        arch=f"sm_{arch}",
        triton=triton.__version__,
        **_usage_fields(usage),
        loops=loops(listing),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("presets", nargs="*", default=["w4gemv", "decode:bf16:128", "decode:int8:128"])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--keep", help="folder for each kernel's .sass and .ttgir")
    args = p.parse_args()
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    for name in args.presets:
        print(json.dumps(report(name, args.arch, args.keep)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
