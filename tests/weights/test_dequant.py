import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from lmforge.weights.dequant import can_dequantize, dequantize

Q = GGMLQuantizationType
# byte offsets of each block's float16 scale/min fields; random bytes there could be inf/nan, so they get sane values
_HALF_FIELDS = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
    Q.Q2_K: [80, 82],
}


def _random_blocks(qtype: Q, num_blocks: int, rng: np.random.Generator) -> np.ndarray:
    type_size = GGML_QUANT_SIZES[qtype][1]
    if qtype in (Q.F32, Q.F16, Q.BF16):
        values = rng.standard_normal(num_blocks * 8).astype(np.float32)
        return quants.quantize(values, qtype).view(np.uint8).reshape(-1) if qtype != Q.F32 else values.view(np.uint8)
    blocks = rng.integers(0, 256, (num_blocks, type_size), dtype=np.uint8)
    for start in _HALF_FIELDS[qtype]:
        blocks[:, start : start + 2] = rng.uniform(-2, 2, (num_blocks, 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(-1)


@pytest.mark.parametrize(
    "qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.F16, Q.BF16, Q.F32]
)
def test_matches_gguf_reference(qtype):
    """Every bit pattern, not just what a quantizer emits: random blocks against gguf's numpy dequantizer
    (Q2_K has no kernel here and exercises the numpy fallback)."""
    raw = _random_blocks(qtype, 96, np.random.default_rng(int(qtype)))
    expected = torch.from_numpy(quants.dequantize(raw, qtype).astype(np.float32).reshape(-1))
    shape = (4, expected.numel() // 4)
    got = dequantize(torch.from_numpy(raw.copy()), qtype, shape, torch.float32)
    assert got.shape == shape
    torch.testing.assert_close(got.reshape(-1), expected, rtol=0, atol=0)
    assert dequantize(torch.from_numpy(raw.copy()), qtype, shape, torch.bfloat16).dtype == torch.bfloat16


def test_float_tensors_are_copies_not_views():
    raw = torch.arange(8, dtype=torch.float32).view(torch.uint8)
    out = dequantize(raw, Q.F32, (2, 4), torch.float32)
    raw.zero_()
    assert out.sum() == 28


def test_can_dequantize():
    assert can_dequantize(Q.Q4_1) and can_dequantize(Q.IQ4_NL) and can_dequantize(Q.BF16)
    assert not can_dequantize(Q.Q8_1)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.F16, Q.BF16]
)
def test_cuda_matches_cpu(qtype):
    raw = torch.from_numpy(_random_blocks(qtype, 1024, np.random.default_rng(1)).copy())
    shape = (8, raw.numel() // GGML_QUANT_SIZES[qtype][1] * GGML_QUANT_SIZES[qtype][0] // 8)
    on_gpu = dequantize(raw.cuda(), qtype, shape, torch.bfloat16)
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), dequantize(raw, qtype, shape, torch.bfloat16), rtol=0, atol=0)
