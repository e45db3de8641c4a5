"""GPTQ and AWQ are the real algorithms: GPTQ's Hessian compensation and AWQ's activation-aware scales lower the
output error against round-to-nearest at the same bits and group size, layer by layer and for a whole model
quantized by `quantize_model`; AWQ's folding leaves the float model's function unchanged."""

from __future__ import annotations

import pytest
import torch

from lmforge.quantize import awq as awq_lib
from lmforge.quantize.dequantize import dequantize_checkpoint
from lmforge.quantize.gptq import HessianAccumulator, gptq_quantize
from lmforge.quantize.qparams import QuantSpec, rtn_quantize


def _correlated_inputs(n=1024, k=128, seed=0):
    """Activations with correlated channels and a few large ones, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g) + 0.3 * torch.randn(n, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= 8
    return x


def test_hessian_accumulator_is_two_xtx_over_n():
    x = _correlated_inputs(300, 32)
    acc = HessianAccumulator(32, torch.device("cpu"))
    for chunk in (x[:100], x[100:250].view(3, 50, 32), x[250:]):
        acc.add(chunk)
    torch.testing.assert_close(acc.h, 2 * x.t() @ x / 300, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(4, 32, sym=True), QuantSpec(4, -1, sym=False), QuantSpec(8, 64)])
def test_gptq_lowers_layer_output_error_against_rtn(act_order, spec):
    x = _correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    h = 2 * x.t() @ x / x.shape[0]
    gptq = gptq_quantize(w, h, spec, act_order=act_order).dequantize()
    rtn = rtn_quantize(w, spec).dequantize()
    ref = x @ w.t()
    err_gptq, err_rtn = (x @ gptq.t() - ref).norm(), (x @ rtn.t() - ref).norm()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_awq_folding_keeps_the_float_layer(outlier_llama_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(outlier_llama_dir, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
        modules = dict(layer.named_modules())
        groups = awq_lib.scale_groups(layer)
        assert [g.prev for g in groups] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]  # GQA
        for g in groups:
            k = modules[g.linears[0]].in_features
            awq_lib.apply_scales(modules, g, torch.rand(k, generator=torch.Generator().manual_seed(3)) + 0.5)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_awq_refuses_a_layer_it_cannot_fold():
    with pytest.raises(ValueError, match="Llama-style decoder layers.*--method gptq"):
        awq_lib.scale_groups(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def _output_error(model_dir, quantized_dir, tmp_path) -> float:
    """Mean squared logit error of the (dequantized) quantized model against the dense one, on held-out text."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lmforge.quantize.calib import builtin_text, encode_prefix, token_blocks

    dense_dir = str(tmp_path / f"dense_{abs(hash(quantized_dir))}")
    dequantize_checkpoint(quantized_dir, dense_dir)
    ids = encode_prefix(AutoTokenizer.from_pretrained(model_dir), builtin_text("evaluation"), 8 * 64)
    blocks = token_blocks(ids, 8, 64)
    ref = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    got = LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return (ref(blocks).logits - got(blocks).logits).pow(2).mean().item()


def test_gptq_and_awq_beat_rtn_on_the_model(outlier_llama_dir, quantized, tmp_path):
    """Same model, bits, group size and calibration text; errors measured on the held-out evaluation text."""
    err = {
        "rtn_sym": _output_error(outlier_llama_dir, quantized("rtn"), tmp_path),
        "rtn_asym": _output_error(outlier_llama_dir, quantized("rtn", sym=False), tmp_path),
        "gptq": _output_error(outlier_llama_dir, quantized("gptq"), tmp_path),
        "awq": _output_error(outlier_llama_dir, quantized("awq"), tmp_path),
    }
    assert err["gptq"] < 0.9 * err["rtn_sym"], err  # both symmetric, GPTQ's v1 default
    assert err["awq"] < 0.9 * err["rtn_asym"], err  # both with zero points, AWQ's grid
