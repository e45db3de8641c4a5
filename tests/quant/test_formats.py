"""Every quantized format through the engine (paged cache, prefill + decode, tp=1 and tp=2 over gloo), against
the dequantized float32 HF model. Checkpoints come from the formats' reference code (tests/quant/writers.py):
compressed-tensors' compressor, AutoAWQ's and AutoGPTQ's packers; our HF FP8 writer is read back by HF
transformers' own FP8 loader (dequantize=True) for the reference.

Tolerance: weight-only formats dequantize exactly in fp32, so the logits agree to 1e-4 like dense parity; the
W8A8 formats are compared with an HF model whose linear inputs are fake-quantized the same way, to 1e-3 (one
activation rounding may land on the other side of a tie in either implementation). Under tp=2 a row-parallel
layer quantizes its activations per token over its own slice of the in-features (no all-reduce of the amax),
and the reference does the same."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from lmforge.check_env.parity import engine_vs_hf
from tests.models.conftest import cpu_config
from tests.quant import writers
from tests.quant.conftest import PROMPTS, add_activation_quant, fake_quant_activations, tiny_model


def _ct(scheme, kind=None, group=None):
    def make(model, path, tp=1):
        writers.write_compressed_tensors(model, path, scheme)
        ref = writers.load_compressed_tensors_reference(path)
        if kind:
            add_activation_quant(ref, path, kind, group, tp)
        return ref

    return make


def _own(write, **kw):
    def make(model, path, tp=1):
        write(model, path, **kw)
        return model.eval()

    return make


def _hf_fp8(model, path, tp=1):
    writers.write_hf_fp8(model, path, block=(16, 16))
    ref = writers.load_hf_fp8_reference(path, (16, 16))
    add_activation_quant(ref, path, "fp8", group=16)
    return ref


FORMATS = {
    "ct-w4a16": (_ct("w4a16"), 1e-4),
    "ct-w4a16-asym": (_ct("w4a16_asym"), 1e-4),
    "ct-fp8-static": (_ct("fp8_static", "fp8"), 1e-3),
    "ct-fp8-dynamic": (_ct("fp8_dynamic", "fp8"), 1e-3),
    "ct-fp8-block": (_ct("fp8_block", "fp8", group=16), 1e-3),
    "ct-int8-dynamic": (_ct("int8_dynamic", "int8"), 1e-3),
    "ct-int8-static": (_ct("int8_static", "int8"), 1e-3),
    "awq": (_own(writers.write_awq, group_size=32), 1e-4),
    "gptq-4bit-sym": (_own(writers.write_gptq, bits=4, group_size=32), 1e-4),
    "gptq-8bit-asym": (_own(writers.write_gptq, bits=8, group_size=32, sym=False), 1e-4),
    "gptq-4bit-channel": (_own(writers.write_gptq, bits=4, group_size=-1, sym=False), 1e-4),
    "hf-fp8-block": (_hf_fp8, 1e-3),
}
TP1_ONLY = {
    "gptq-4bit-act-order": (_own(writers.write_gptq, bits=4, group_size=16, desc_act=True), 1e-4),
    "gptq-v2-4bit-asym": (_own(writers.write_gptq, bits=4, group_size=32, sym=False, v2=True), 1e-4),
    "awq-group64": (_own(writers.write_awq, group_size=64), 1e-4),
}


def _check(fmt, make, tol, tmp_path, tp):
    path = str(tmp_path / fmt)
    ref = make(tiny_model("llama"), path, tp)
    result = engine_vs_hf(path, PROMPTS, 4, hf_model=ref, backend_config=cpu_config(tp=tp))
    result.tolerance = tol
    assert result.passed, result.table()


@pytest.mark.parametrize("fmt", list(FORMATS) + list(TP1_ONLY))
def test_format_matches_dequantized_reference(fmt, tmp_path):
    make, tol = {**FORMATS, **TP1_ONLY}[fmt]
    _check(fmt, make, tol, tmp_path, tp=1)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize(
    "fmt",
    ["ct-w4a16-asym", "ct-fp8-static", "ct-fp8-dynamic", "ct-int8-dynamic", "awq", "gptq-4bit-sym", "hf-fp8-block"],
)
def test_format_under_tp2(fmt, tmp_path):
    """One scheme per format (each TP engine starts a worker process: ~15 s on a busy 2-core host)."""
    make, tol = FORMATS[fmt]
    _check(fmt, make, tol, tmp_path, tp=2)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("fmt", ["int4"])  # the FP8 experts shard by the same geometry (tp=1 in test_families)
def test_quantized_experts_under_tp2(fmt, tmp_path):
    """Qwen3-MoE: each rank holds every expert with half of its intermediate size (16 of 32 channels)."""
    model = tiny_model("qwen3_moe")
    model.config._experts_implementation = "eager"
    path = str(tmp_path / fmt)
    if fmt == "int4":
        writers.write_gptq(model, path, bits=4, group_size=16, sym=False)
        result = engine_vs_hf(path, PROMPTS, 3, hf_model=model.eval(), backend_config=cpu_config(tp=2))
        result.tolerance = 1e-4
    else:
        storages = writers.write_hf_fp8(model, path, block=(16, 16))
        with fake_quant_activations(storages, "fp8", group=16):
            result = engine_vs_hf(path, PROMPTS, 3, hf_model=model.eval(), backend_config=cpu_config(tp=2))
        result.tolerance = 1e-3
    assert result.passed, result.table()
