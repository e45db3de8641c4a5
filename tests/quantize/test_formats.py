"""The writers' checkpoints decode correctly by implementations that are not ours: AutoAWQ's own unpacking for
AWQ gemm, AutoAWQ's AWQ -> GPTQ/exllama repacking for the GPTQ v1 layout, compressed-tensors' decompressors and
config model for FP8 / int8 W8A8. A decoded checkpoint also reproduces the dense model's logits."""

from __future__ import annotations

import pytest
import torch

from lmforge.quantize import writer
from lmforge.quantize.gptq import gptq_quantize
from lmforge.quantize.qparams import QuantSpec, rtn_quantize
from tests.quantize.conftest import GROUP, load_awq_packing_utils, read_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _weight(n=64, k=96, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _step(w):  # the quantization step of each element, [N, K]
    return w.scales[:, w.g_idx.long()]


def test_awq_gemm_layout_unpacks_with_autoawq():
    awq = load_awq_packing_utils()
    dense = _weight()
    q = rtn_quantize(dense, QuantSpec(4, GROUP, sym=False))
    t = writer.awq_tensors(q)
    assert t["qweight"].shape == (96, 8) and t["qzeros"].shape == (3, 8) and t["scales"].shape == (3, 64)
    assert t["qweight"].dtype == torch.int32 and t["scales"].dtype == torch.float16
    decoded = awq.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, GROUP).float().t()  # [N, K]
    torch.testing.assert_close(decoded, q.dequantize(), atol=1e-3, rtol=1e-3)
    assert ((decoded - dense).abs() <= 0.5 * _step(q) + 1e-3).all()  # within half a step of the original


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_v1_layout_equals_autoawq_exllama_repacking(sym):
    """AutoAWQ converts its gemm tensors to the GPTQ/exllama v1 layout (qweight packed along K, zeros - 1 packed
    along N); our GPTQ writer must produce the same words from the same integers."""
    awq = load_awq_packing_utils()
    q = rtn_quantize(_weight(seed=1), QuantSpec(4, GROUP, sym=sym, min_zero=0 if sym else 1))
    theirs_qweight, theirs_qzeros = awq.unpack_reorder_pack(**_awq_args(q))
    ours = writer.gptq_tensors(q)
    assert ours["qweight"].shape == (96 // 8, 64) and ours["qzeros"].shape == (3, 8)
    assert torch.equal(ours["qweight"], theirs_qweight)
    assert torch.equal(ours["qzeros"], theirs_qzeros)
    assert torch.equal(ours["g_idx"], torch.arange(96, dtype=torch.int32) // GROUP)


def _awq_args(q):
    t = writer.awq_tensors(q)
    return dict(qweight=t["qweight"], qzeros=t["qzeros"], bits=4)


def _gptq_v1_decode(t, bits):
    """The GPTQ v1 reading, written out from AutoGPTQ's description: element (k, n) at bits * (k % p) of
    qweight[k // p, n], zero (n) of group g at bits * (n % p) of qzeros[g, n // p], plus one."""
    p, mask = 32 // bits, 2**bits - 1
    k = t["qweight"].shape[0] * p
    rows = torch.arange(k)
    q = (t["qweight"][rows // p] >> (bits * (rows % p)).view(-1, 1).to(torch.int32)) & mask  # [K, N]
    n = t["scales"].shape[1]
    cols = torch.arange(n)
    zeros = ((t["qzeros"][:, cols // p] >> (bits * (cols % p)).to(torch.int32)) & mask) + 1  # [K/G, N]
    g = t["g_idx"].long()
    return ((q.float() - zeros[g].float()) * t["scales"].float()[g]).t()


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_act_order_g_idx_decodes(bits):
    x = torch.randn(512, 96, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 96)
    h = 2 * x.t() @ x / x.shape[0]
    q = gptq_quantize(_weight(seed=3), h, QuantSpec(bits, GROUP, sym=True), act_order=True)
    assert not torch.equal(q.g_idx, torch.sort(q.g_idx).values)  # act-order really permuted the groups
    assert torch.equal(torch.bincount(q.g_idx.long()), torch.full((96 // GROUP,), GROUP))
    t = writer.gptq_tensors(q)
    torch.testing.assert_close(_gptq_v1_decode(t, bits), q.dequantize(), atol=1e-3, rtol=1e-3)


def _ct_scheme(config):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig.model_validate(config["quantization_config"]).config_groups["group_0"]


@pytest.mark.parametrize("method,preset,fmt", [("fp8", "FP8_DYNAMIC", "float"), ("w8a8", "W8A8", "int")])
def test_compressed_tensors_config_is_the_library_s(quantized, method, preset, fmt):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    config, _ = read_checkpoint(quantized(method))
    qc = dict(config["quantization_config"])
    expected = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
        format=f"{fmt}-quantized",
        ignore=["lm_head"],
        quantization_status="compressed",
    ).model_dump(exclude=["quant_method"])
    assert qc.pop("quant_method") == "compressed-tensors"
    assert qc.pop("sparsity_config") == {} and qc.pop("transform_config") == {}  # as ModelCompressor writes them
    assert qc.pop("version")
    assert qc == expected


def _decode_checkpoint(path, decode) -> dict[str, torch.Tensor]:
    """The checkpoint as a dense state dict: decode(prefix, parts) -> weight for each quantized linear."""
    config, tensors = read_checkpoint(path)
    suffixes = ("qweight", "qzeros", "scales", "g_idx", "weight_scale", "weight_zero_point")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix in suffixes or (suffix == "weight" and f"{prefix}.weight_scale" in tensors):
            groups.setdefault(prefix, {})[suffix] = t
        else:
            dense[name] = t.float()
    for prefix, parts in groups.items():
        dense[f"{prefix}.weight"] = decode(config["quantization_config"], parts).float()
    return dense


def _logits_error(model_dir, state) -> float:
    """Relative error of the logits of the HF model carrying `state` against the dense model's."""
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    got = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    got.load_state_dict(state, strict=True)
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = ref(ids).logits, got(ids).logits
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("method", ["fp8", "w8a8"])
def test_compressed_tensors_decompressor_reads_our_weights(quantized, outlier_llama_dir, method):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import FloatQuantizationCompressor, IntQuantizationCompressor

    from lmforge.weights.files import iter_weights

    path = quantized(method)
    config, tensors = read_checkpoint(path)
    scheme = _ct_scheme(config)
    compressor = FloatQuantizationCompressor if method == "fp8" else IntQuantizationCompressor
    expect_dtype = torch.float8_e4m3fn if method == "fp8" else torch.int8
    original = dict(iter_weights(outlier_llama_dir, dtype=torch.float32, progress=False))
    num = 0
    for name, t in tensors.items():
        if not name.endswith(".weight_scale"):
            continue
        prefix = name.removesuffix(".weight_scale")
        w = tensors[f"{prefix}.weight"]
        assert w.dtype == expect_dtype and t.shape == (w.shape[0], 1)
        out = compressor.decompress({"weight": w, "weight_scale": t}, scheme)["weight"].float()
        dense = original[f"{prefix}.weight"]
        step = t.float()  # one int8 step; FP8 is relative: 3 mantissa bits
        bound = dense.abs() / 16 + step * 2**-6 if method == "fp8" else 0.5 * step + 1e-6
        bound = bound + dense.abs() * 2**-8  # the decompressor's output is in the scale's dtype, bf16
        assert ((out - dense).abs() <= bound).all(), prefix
        num += 1
    assert num == 14  # 7 linears x 2 layers; lm_head stays dense (ignored)
    assert "lm_head.weight_scale" not in tensors

    def decode(qc, parts):
        return compressor.decompress({"weight": parts["weight"], "weight_scale": parts["weight_scale"]}, scheme)[
            "weight"
        ]

    # a misplaced tensor would give ~1.4 (unrelated logits); this is the quantization's own error
    assert _logits_error(outlier_llama_dir, _decode_checkpoint(path, decode)) < (0.15 if method == "fp8" else 0.05)


def test_awq_checkpoint_decoded_by_autoawq_matches_dense_model(quantized, outlier_llama_dir):
    awq = load_awq_packing_utils()
    path = quantized("awq")
    config, tensors = read_checkpoint(path)
    qc = config["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": None}  # fmt: skip
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (128, 64 // 8)
    assert tensors["model.layers.0.mlp.down_proj.scales"].shape == (128 // GROUP, 64)

    def decode(qc, parts):
        return awq.dequantize_gemm(parts["qweight"], parts["qzeros"], parts["scales"], 4, qc["group_size"]).t()

    # the RMSNorm weights carry AWQ's folded 1/s, so the decoded model equals the dense one up to the rounding
    assert _logits_error(outlier_llama_dir, _decode_checkpoint(path, decode)) < 0.35


@pytest.mark.parametrize("kw", [{}, {"desc_act": True, "sym": False}, {"bits": 8}])
def test_gptq_checkpoint_decoded_matches_dense_model(quantized, outlier_llama_dir, kw):
    path = quantized("gptq", **kw)
    config, tensors = read_checkpoint(path)
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["group_size"]) == (
        "gptq",
        "gptq",
        kw.get("bits", 4),
        GROUP,
    )
    assert qc["desc_act"] == kw.get("desc_act", False) and qc["sym"] == kw.get("sym", True)
    g_idx = tensors["model.layers.1.self_attn.o_proj.g_idx"]
    assert g_idx.dtype == torch.int32 and g_idx.shape == (64,)
    err = _logits_error(outlier_llama_dir, _decode_checkpoint(path, lambda qc, p: _gptq_v1_decode(p, qc["bits"])))
    assert err < (0.05 if kw.get("bits") == 8 else 0.45)
