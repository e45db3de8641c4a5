"""Quantized checkpoints on the CUDA backend (the Triton / cuBLAS quant kernels, CUDA graphs for decode) in
bfloat16, against the dequantized HF model in bfloat16 on the same GPU. The tiny Llama here has hidden 256 so
that the kernels' usual group and block sizes (128) apply.

Tolerances as the bf16 family parity (tests/models/test_gpu_parity.py): max |logit diff| <= 0.05 for weight-only
int4 (both sides compute with the same dequantized weights, rounded to bf16); 0.1 for W8A8, where bf16 rounding
moves some activations across a quantization step (the FP8 MoE case, where a router's top-k amplifies that, is
compared with HF's fp32 forward instead: within twice HF's own bf16 forward's distance from it). Greedy tokens
agree for the first 3 steps except at an HF near-tie (logit margin < 0.05)."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.check_env.parity import engine_vs_hf
from lmforge.messages import PytorchEngineConfig
from tests.quant import writers
from tests.quant.conftest import PROMPTS, add_activation_quant, tiny_model

pytestmark = pytest.mark.gpu

SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def _ct(scheme, kind=None, group=None):
    def make(model, path):
        writers.write_compressed_tensors(model, path, scheme, group_size=128, block=(128, 128))
        ref = writers.load_compressed_tensors_reference(path)
        if kind:
            add_activation_quant(ref, path, kind, group)
        return ref

    return make


def _own(write, **kw):
    def make(model, path):
        write(model, path, **kw)
        return model

    return make


def _hf_fp8(model, path):
    writers.write_hf_fp8(model, path, block=(128, 128))
    ref = writers.load_hf_fp8_reference(path, (128, 128))
    add_activation_quant(ref, path, "fp8", group=128)
    return ref


FORMATS = {
    "gptq-int4": (_own(writers.write_gptq, bits=4, group_size=128), 0.05),
    "awq-int4": (_own(writers.write_awq, group_size=128), 0.05),
    "ct-w4a16": (_ct("w4a16"), 0.05),
    "ct-fp8-dynamic": (_ct("fp8_dynamic", "fp8"), 0.1),
    "ct-fp8-static": (_ct("fp8_static", "fp8"), 0.1),
    "ct-int8-dynamic": (_ct("int8_dynamic", "int8"), 0.1),
    "hf-fp8-block": (_hf_fp8, 0.1),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_llama_bf16_cuda(fmt, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    make, tol = FORMATS[fmt]
    path = str(tmp_path / fmt)
    ref = make(tiny_model("llama", **SIZES), path).to("cuda", torch.bfloat16).eval()
    config = PytorchEngineConfig(device_type="cuda", dtype="bfloat16", block_size=16, num_gpu_blocks=64)
    result = engine_vs_hf(path, PROMPTS, 4, hf_model=ref, backend_config=config)
    assert result.max_abs_diff <= tol, result.table()
    for engine, hf, margin in zip(result.engine_tokens, result.hf_tokens, result.divergence_margins, strict=True):
        assert engine[:3] == hf[:3] or (margin is not None and margin < 0.05), result.table()


# Qwen3-MoE with experts of the kernels' usual group / block size (hidden 256, moe_intermediate 256, FP8 block 128,
# int4 group 128): the experts run in the grouped quantized-MoE kernel, decode inside CUDA graphs
MOE_SIZES = dict(
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
)


def _prefill_gap(ref_bf16, ref_fp32, quantized: set[str]) -> float:
    """max |logit| difference at the last prompt position between two copies of one HF model, each fake-quantizing
    the inputs of its quantized weights (`quantized`: parameter names) to FP8 in groups of 128."""
    from tests.quant.conftest import fake_quant_activations

    storages = {
        p.untyped_storage().data_ptr() for m in (ref_bf16, ref_fp32) for n, p in m.named_parameters() if n in quantized
    }
    gap = 0.0
    with fake_quant_activations(storages, "fp8", group=128), torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt], device="cuda")
            a, b = (m(ids).logits[0, -1].float() for m in (ref_bf16, ref_fp32))
            gap = max(gap, (a - b).abs().max().item())
    return gap


# open (H200, 2026-12-02): lmforge's bf16 prefill logits lie 0.193 from HF's fp32 forward where HF's own bf16 forward
# lies 0.080. Found so far (.dev bisect, per module and per prompt): with fp32 activations the batched prefill (26 rows,
# 64-row FP8 MMA tiles) was 3e-2 - 1.7e-1 off and one prompt (5 rows, mma.sync tiles) 1e-7: Hopper's FP8 MMA sums in
# reduced precision; LMFORGE_FP8_PRECISE_ACCUM=1 (kernels/cuda/quant_common.py) makes the fp32 case exact (4e-7) but
# leaves bf16 at 0.185 (2.3x HF's own bf16 distance): that remainder is not explained yet
FP8_MOE_OPEN = pytest.mark.xfail(reason="FP8 MoE 2.4x HF's bf16 distance from fp32 (cause open)", strict=False)


@pytest.mark.parametrize("fmt", [pytest.param("hf-fp8-block", marks=FP8_MOE_OPEN), "gptq-int4"])
def test_quantized_qwen3_moe_bf16_cuda(fmt, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from tests.quant.conftest import fake_quant_activations

    model = tiny_model("qwen3_moe", **MOE_SIZES)
    model.config._experts_implementation = "eager"  # HF 5's per-expert F.linear, which the FP8 reference patches
    path = str(tmp_path / fmt)
    if fmt == "gptq-int4":
        writers.write_gptq(model, path, bits=4, group_size=128)
        quantized, tol = set(), 0.05
    else:
        storages = writers.write_hf_fp8(model, path, block=(128, 128))
        quantized = {n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() in storages}
        tol = 0.1
    config = PytorchEngineConfig(device_type="cuda", dtype="bfloat16", block_size=16, num_gpu_blocks=64)
    if not quantized:
        result = engine_vs_hf(path, PROMPTS, 4, hf_model=model.to("cuda", torch.bfloat16).eval(), backend_config=config)
    else:
        # FP8 activations (3 mantissa bits) amplify bf16 rounding: a value near a rounding step of e4m3 flips with
        # the rounding of what feeds it, and a router's top-k may flip with it. So lmforge (bf16) is compared with
        # HF's fp32 forward through the same activation quantization, and may lie up to twice as far from it as
        # HF's own bf16 forward does (`noise`, at the last prompt position)
        ref32 = copy.deepcopy(model).to("cuda").eval()
        ref = model.to("cuda", torch.bfloat16).eval()
        noise = _prefill_gap(ref, ref32, quantized)
        print(f"HF bf16 vs HF fp32 (same activation quantization), last prompt position: {noise:.3e}")
        params = dict(ref32.named_parameters())
        with fake_quant_activations({params[n].untyped_storage().data_ptr() for n in quantized}, "fp8", group=128):
            result = engine_vs_hf(path, PROMPTS, 4, hf_model=ref32, backend_config=config)
        tol = max(tol, 2 * noise)
    assert result.max_abs_diff <= tol, result.table()
    for engine, hf, margin in zip(result.engine_tokens, result.hf_tokens, result.divergence_margins, strict=True):
        assert engine[:3] == hf[:3] or (margin is not None and margin < 0.05), result.table()
