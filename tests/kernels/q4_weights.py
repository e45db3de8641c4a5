"""Random int4 weights in lmforge's CPU q4 layout, shared by the CPU kernel tests."""

from __future__ import annotations

import torch

from lmforge.kernels import cpu as cpu_kernels
from lmforge.nn.quant.packing import pack_int32


def random_q4(k: int, n: int, bits: int, half: bool, seed: int, **prepare_kw):
    """A q4_prepare layout of random 4-bit codes (bits 8: two planes that collapse into 8-bit ones, GGUF's Q8_0 / Q5
    form; half: float16-exact scales and mins), and the codes, scales and mins it holds as [N, K] float32 tensors
    (w = codes * scales + mins). prepare_kw goes to q4_prepare."""
    g = torch.Generator().manual_seed(seed)
    planes = 2 if bits == 8 else 1
    codes = torch.randint(0, 16, (planes * k, n), dtype=torch.int32, generator=g)
    s = torch.rand(k // 32, n, generator=g) * 0.1 + 0.01
    s = torch.cat([s, 16 * s]) if planes == 2 else s
    m = torch.randn(planes * k // 32, n, generator=g) * 0.1
    if half:
        s, m = s.half().float(), m.half().float()
    prepared = cpu_kernels.q4_prepare(pack_int32(codes, 4, 0), s, m, 32, planes, zeros=False, **prepare_kw)
    assert prepared["q4_bits"] == bits  # (8-bit: the summed mins may not be float16-exact, then float32)
    c = codes.float()
    if planes == 2:  # lo + 16 hi, with the first plane's scale; the mins add
        c, s, m = c[:k] + 16 * c[k:], s[: k // 32], m[: k // 32] + m[k // 32 :]
    expand = lambda t: t.repeat_interleave(32, 0).t()  # noqa: E731 ([K / 32, N] -> [N, K])
    return prepared, c.t(), expand(s), expand(m)
