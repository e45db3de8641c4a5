"""Recorded kernel calls replayed from C (lmforge/kernels/cpu/program.c, KernelProgram.replay): the same outputs, bit
for bit, as the Python loop over the same calls (integers, pointers, None pointers and float arguments passed through
the 64-bit slots), and a program with a function program.c does not know replays from Python."""

from __future__ import annotations

import ctypes

import pytest
import torch

from lmforge.kernels import cpu as cpu_kernels
from lmforge.nn.quant.packing import pack_int32


@pytest.fixture(autouse=True)
def _kernels_built():
    if not cpu_kernels.available():
        pytest.fail("the CPU kernels did not build on this machine (a C compiler is part of the test setup)")


def _record(x, residual, weight, prepared, q, k, cos, sin):
    program = cpu_kernels.KernelProgram(cpu_kernels.Arena())
    with cpu_kernels.recording(program):
        normed, added = cpu_kernels.rms_norm(x, weight, 1e-5, residual, 0.5)  # two float arguments, a residual
        plain = cpu_kernels.rms_norm(x, weight, 1e-6, None, 0.0)  # None pointers
        y = cpu_kernels.q4_linear(normed, prepared)
        q_out, k_out = cpu_kernels.apply_rotary(q, k, cos, sin)
        act = cpu_kernels.silu_and_mul(y)
    return program, [normed, added, plain, y, q_out, k_out, act]


def test_program_kernel_replay_from_c_equals_the_python_loop():
    g = torch.Generator().manual_seed(0)
    rows, dim = 7, 64
    x, residual = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    weight = torch.randn(dim, generator=g)
    codes = torch.randint(0, 16, (dim, 96), dtype=torch.int32, generator=g)
    scales = torch.rand(dim // 32, 96, generator=g) * 0.1 + 0.01
    mins = torch.randn(dim // 32, 96, generator=g) * 0.1
    prepared = cpu_kernels.q4_prepare(pack_int32(codes, 4, 0), scales, mins, 32, 1, zeros=False)
    q, k = torch.randn(rows, 4, 32, generator=g), torch.randn(rows, 2, 32, generator=g)
    cos, sin = torch.randn(rows, 32, generator=g), torch.randn(rows, 32, generator=g)
    program, outs = _record(x, residual, weight, prepared, q, k, cos, sin)
    first = [t.clone() for t in outs]
    for t in outs:
        t.fill_(float("nan"))
    program.replay(torch.get_num_threads())
    assert program._compiled is not None  # ran through program.c
    from_c = [t.clone() for t in outs]
    for t in outs:
        t.fill_(float("nan"))
    for fn, args in program.calls:  # the Python loop over the same calls
        fn(*args, torch.get_num_threads())
    for a, b, c in zip(first, from_c, outs, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_program_kernel_with_an_unknown_function_replays_from_python():
    calls = []
    proto = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_int)
    fn = proto(lambda value, nt: calls.append((value, nt)))
    program = cpu_kernels.KernelProgram()
    program.calls.append((fn, (ctypes.c_int64(5),)))
    program.replay(2)
    assert program._compiled is None and calls == [(5, 2)]
