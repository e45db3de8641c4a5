"""`lmforge eval`: perplexity through lmforge's own model equals HF transformers' on the same dense model; a
quantized checkpoint is either run by quantized layers (agreeing with its dense copy) or refused, never scored
with its scales dropped. Also the `quantize` / `eval` command lines and the shard writer."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lmforge.cli.main import main
from lmforge.quantize.calib import builtin_text, encode_prefix, token_blocks
from lmforge.quantize.evaluate import evaluate_perplexity


def _hf_perplexity(path: str, blocks: torch.Tensor) -> float:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(blocks).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    return math.exp(nll.item())


def test_eval_perplexity_equals_hf_transformers(tiny_llama_dir):
    from transformers import AutoTokenizer

    result = evaluate_perplexity(tiny_llama_dir, device="cpu", dtype="float32", seq_len=48, max_tokens=6 * 48)
    ids = encode_prefix(AutoTokenizer.from_pretrained(tiny_llama_dir), builtin_text("evaluation"), 6 * 48)
    expected = _hf_perplexity(tiny_llama_dir, token_blocks(ids, 6, 48))
    assert result.tokens == 6 * 47 and result.num_seqs == 6 and result.format == "dense"
    assert abs(result.ppl - expected) <= 1e-3 * expected, (result.ppl, expected)


def test_eval_of_a_text_file_and_cli_json(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The capital of France is Paris. " * 40)
    assert main(["eval", tiny_llama_dir, "--text", str(text), "--device", "cpu", "--dtype", "float32",
                 "--seq-len", "32", "--max-tokens", "0"]) == 0  # fmt: skip
    line = json.loads(capsys.readouterr().out.strip())
    assert {"model", "format", "ppl", "tokens"} <= set(line) and line["tokens"] % 31 == 0 and line["ppl"] > 1


def test_eval_of_a_quantized_checkpoint_runs_it_or_refuses(quantized, tmp_path, capsys):
    path = quantized("awq")
    args = ["eval", path, "--device", "cpu", "--dtype", "float32", "--seq-len", "32", "--max-tokens", "128"]
    assert main([*args, "--dequantize"]) == 0
    dequantized = json.loads(capsys.readouterr().out.strip())
    assert dequantized["format"] == "awq (dequantized)"
    rc = main(args)
    captured = capsys.readouterr()
    if rc == 0:  # an lmforge build with quantized layers: its own AWQ path must agree with the dense copy
        direct = json.loads(captured.out.strip())
        assert direct["format"] == "awq:int4:g32"
        assert abs(direct["ppl"] - dequantized["ppl"]) <= 1e-2 * dequantized["ppl"]
    else:
        assert rc == 2 and "--dequantize" in captured.err and "awq" in captured.err


def test_quantize_cli_writes_a_loadable_checkpoint(outlier_llama_dir, tmp_path, capsys):
    out = str(tmp_path / "rtn")
    assert main(["quantize", outlier_llama_dir, out, "--method", "rtn", "--group-size", "64", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["method"] == "rtn" and summary["layers_quantized"] == 14
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"]) == ("gptq", 4, 64, True)


@pytest.mark.parametrize(
    "extra,match",
    [
        (
            ["--method", "gptq", "--group-size", "48"],
            r"model\.layers\.0\.self_attn\.q_proj: group size 48 .*--group-size",
        ),
        (["--method", "awq", "--bits", "8"], "4-bit"),
        (["--method", "rtn", "--desc-act"], "GPTQ option"),
    ],
)
def test_quantize_cli_bad_input_names_the_problem(outlier_llama_dir, tmp_path, capsys, extra, match):
    import re

    assert main(["quantize", outlier_llama_dir, str(tmp_path / "o"), "--device", "cpu", *extra]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_quantize_refuses_a_quantized_model(quantized, tmp_path, capsys):
    assert main(["quantize", quantized("fp8"), str(tmp_path / "o"), "--method", "rtn", "--device", "cpu"]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_sharded_output_reads_back(tmp_path):
    from lmforge.quantize.writer import save_safetensors
    from lmforge.weights.files import iter_weights

    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}
    files = save_safetensors(tensors, str(tmp_path), max_shard_bytes=2048)  # 1 KiB each: two a shard
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    back = dict(iter_weights(str(tmp_path), progress=False))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_too_little_text_is_an_error():
    with pytest.raises(ValueError, match="enough for 1 blocks of 8"):
        token_blocks(list(range(10)), 2, 8)


def test_quantize_without_tokenizer_needs_random_ids(outlier_llama_dir, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(outlier_llama_dir, name), bare / name)
    args = ["quantize", str(bare), str(tmp_path / "o"), "--method", "gptq", "--group-size", "32", "--device", "cpu",
            "--calib-samples", "2", "--calib-seq-len", "16"]  # fmt: skip
    assert main(args) == 2
    assert "--calib-random-ids" in capsys.readouterr().err
    assert main([*args, "--calib-random-ids"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["layers_quantized"] == 14


def test_quantize_a_gguf_file(tmp_path, capsys):
    """A GGUF source goes through lmforge's GGUF reader: the checkpoint decodes to the GGUF's weights (up to
    the RTN step) and carries an HF config the HF loader reads."""
    from transformers import AutoConfig

    from lmforge.quantize.dequantize import dequantize_checkpoint
    from lmforge.weights.files import iter_weights
    from tests.weights.tiny_gguf import random_hf_weights, write_tiny_llama

    gguf_path = str(tmp_path / "tiny.gguf")
    write_tiny_llama(gguf_path, random_hf_weights())
    out = str(tmp_path / "q")
    assert main(["quantize", gguf_path, out, "--method", "rtn", "--group-size", "32", "--device", "cpu"]) == 0
    assert AutoConfig.from_pretrained(out).quantization_config["quant_method"] == "gptq"
    dequantize_checkpoint(out, str(tmp_path / "dense"))
    got = dict(iter_weights(str(tmp_path / "dense"), progress=False))
    for name, w in iter_weights(gguf_path, dtype=torch.float32, progress=False):
        if ".layers." in name and name.endswith("proj.weight"):
            step = 2 * w.abs().amax(dim=1, keepdim=True) / 15  # symmetric int4: a row's largest possible step
            assert ((got[name] - w).abs() <= 0.51 * step).all(), name  # 0.5, and the fp16 rounding of the scale


def test_eval_of_the_embedded_gguf_scores_the_packed_layers_the_engine_runs(monkeypatch):
    """dtype auto on the CPU: the GGUF's linears stay packed (as in the engine), which equals the float32
    dequantized model; the opt-in int8 activations of the packed kernel cost a little perplexity, not nothing."""
    monkeypatch.delenv("LMFORGE_CPU_INT8_ACTIVATIONS", raising=False)
    dense = evaluate_perplexity(None, dtype="float32", max_tokens=1024, progress=False)
    packed = evaluate_perplexity(None, max_tokens=1024, progress=False)
    assert (dense.format, packed.format) == ("dense", "gguf-packed")
    assert packed.ppl == pytest.approx(dense.ppl, rel=1e-4)
    monkeypatch.setenv("LMFORGE_CPU_INT8_ACTIVATIONS", "1")
    int8 = evaluate_perplexity(None, max_tokens=1024, progress=False)
    assert int8.ppl != packed.ppl and int8.ppl == pytest.approx(packed.ppl, rel=0.03)
