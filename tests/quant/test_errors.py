"""Bad quantized checkpoints fail at load with the layer, the scheme and what to do, never silently."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.engine.model_loader import build_model
from lmforge.model_inputs import StepContextManager
from lmforge.model_source import load_model_source
from lmforge.nn.quant import QuantConfigError, QuantLoadError, parse_quant_config
from tests.quant import writers
from tests.quant.conftest import tiny_model


def _build(path: str, tp_rank: int = 0, tp_size: int = 1, load: bool = True):
    source = load_model_source(path, with_tokenizer=False)
    cpu = torch.device("cpu")
    return build_model(source, torch.float32, cpu, StepContextManager(), None, tp_rank, tp_size, None, load=load)


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gptq") / "model")
    writers.write_gptq(tiny_model("llama"), path, bits=4, group_size=32)
    return path


def _edit(src: str, dst: str, tensors=None, config=None) -> str:
    """A copy of checkpoint src with its tensors / quantization_config changed by the given functions."""
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if config:
        config(cfg["quantization_config"])
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    state = load_file(os.path.join(src, "model.safetensors"))
    if tensors:
        tensors(state)
    save_file(state, os.path.join(dst, "model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'.*awq, compressed-tensors, fp8, gptq"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version 'gemv'"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "'marlin'"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "e5m2"),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "nvfp4-pack-quantized",
                "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float"}}},
            },
            "format 'nvfp4-pack-quantized'",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "kv_cache_scheme": {"num_bits": 8, "type": "float"},
                "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}},
            },
            "kv_cache_scheme",
        ),
    ],
)
def test_unsupported_schemes_are_refused(raw, match):
    with pytest.raises(QuantConfigError, match=match):
        parse_quant_config(raw)


def test_group_size_that_does_not_divide_a_tp_shard(tmp_path):
    path = str(tmp_path / "model")
    writers.write_gptq(tiny_model("llama"), path, bits=4, group_size=64)
    _build(path, load=False)  # fine at tp=1
    # o_proj has 64 in-features: 32 per rank under tp=2
    with pytest.raises(QuantLoadError, match=r"o_proj \(gptq \(4 bit\)\): group size 64 does not divide its 32 local"):
        _build(path, tp_rank=1, tp_size=2, load=False)


def test_act_order_on_a_row_parallel_layer_under_tp(tmp_path):
    path = str(tmp_path / "model")
    writers.write_gptq(tiny_model("llama"), path, bits=4, group_size=16, desc_act=True)
    with pytest.raises(QuantLoadError, match="act-order .* use tp=1"):
        _build(path, tp_rank=0, tp_size=2, load=False)


def test_missing_tensor(gptq_dir, tmp_path):
    path = _edit(gptq_dir, str(tmp_path / "m"), tensors=lambda s: s.pop("model.layers.1.mlp.down_proj.scales"))
    with pytest.raises(
        QuantLoadError, match=r"layers.1.mlp.down_proj \(gptq \(4 bit\)\): the checkpoint has no scales"
    ):
        _build(path)


def test_misshaped_tensor(gptq_dir, tmp_path):
    def shrink(state):
        name = "model.layers.0.self_attn.k_proj.qzeros"
        state[name] = state[name][:, :2].contiguous()

    path = _edit(gptq_dir, str(tmp_path / "m"), tensors=shrink)
    with pytest.raises(ValueError, match=r"qkv_proj \(gptq \(4 bit\)\): qzeros has shape \(2, 2\)"):
        _build(path)


def test_wrong_dtype(gptq_dir, tmp_path):
    def widen(state):
        name = "model.layers.0.mlp.up_proj.qweight"
        state[name] = state[name].to(torch.int64)

    path = _edit(gptq_dir, str(tmp_path / "m"), tensors=widen)
    with pytest.raises(ValueError, match=r"gate_up_proj \(gptq \(4 bit\)\): qweight has dtype torch.int64"):
        _build(path)


def test_fused_layer_half_quantized(gptq_dir, tmp_path):
    def densify(state):
        for s in ("qweight", "qzeros", "scales", "g_idx"):
            state.pop(f"model.layers.0.self_attn.v_proj.{s}")
        state["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(32, 64)

    path = _edit(gptq_dir, str(tmp_path / "m"), tensors=densify)
    with pytest.raises(ValueError, match=r"qkv_proj \(gptq \(4 bit\)\): got both a dense float weight and quantized"):
        _build(path)


def test_modules_to_not_convert_with_quantized_tensors(gptq_dir, tmp_path):
    """A layer the config keeps dense while the checkpoint has quantized tensors for it: those tensors match no
    parameter (the load's unused-tensor check names them before the missing dense weight is noticed)."""
    path = _edit(gptq_dir, str(tmp_path / "m"), config=lambda q: q.update(modules_to_not_convert=["down_proj"]))
    with pytest.raises(ValueError, match=r"match no parameter .*down_proj\.qweight"):
        _build(path)


def test_check_model_reports_and_refuses_quantization(gptq_dir, tmp_path):
    from lmforge.check_env import ModelCheckError, check_model

    report = check_model(gptq_dir, verbose=False)
    assert report.quantization == "gptq: int4 weights, group 32, symmetric"
    assert "quantization:   gptq: int4" in str(report)
    path = _edit(gptq_dir, str(tmp_path / "m"), config=lambda q: q.update(bits=3))
    with pytest.raises(ModelCheckError, match="read the quantization_config: QuantConfigError: .*bits=3"):
        check_model(path, verbose=False)
