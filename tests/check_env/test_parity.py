"""`lmforge check_env MODEL --parity` and the tiny-config builder behind it."""

from __future__ import annotations

import json
import os
import re
import textwrap

import pytest

from lmforge.check_env.parity import build_tiny_model, save_tiny_model, tiny_hf_config
from lmforge.cli.main import main


@pytest.fixture
def qwen3_dir(tmp_path) -> str:
    """A Qwen3 folder with only a config.json: --parity reads the family's switches from it, nothing else."""
    path = str(tmp_path / "qwen3")
    os.makedirs(path)
    config = tiny_hf_config("qwen3", tie_word_embeddings=True, attention_bias=True)
    config.architectures = ["Qwen3ForCausalLM"]
    config.save_pretrained(path)
    return path


def test_cli_parity_passes_and_prints_both_tables(qwen3_dir, capsys):
    assert main(["check_env", qwen3_dir, "--parity"]) == 0
    out = capsys.readouterr().out
    assert "batch of 4 sequences" in out and "preemption" in out
    assert out.count("PASS: max|diff|") == 2 and "FAIL" not in out
    assert "preemptions: 0" in out and re.search(r"preemptions: [1-9]", out)  # the second case really preempts


def test_cli_parity_fails_for_a_wrong_model_registered_by_custom_module_map(qwen3_dir, tmp_path, capsys):
    # a plausible bug: the model forgets Qwen3's q/k norms
    (tmp_path / "broken_qwen3.py").write_text(
        textwrap.dedent(
            """
            from lmforge.models.qwen3 import Qwen3ForCausalLM

            class BrokenQwen3(Qwen3ForCausalLM):
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    for layer in self.model.layers:
                        layer.self_attn.q_norm.forward = lambda x, residual=None: x
            """
        )
    )
    module_map = tmp_path / "map.py"
    module_map.write_text("MODULE_MAP = {'Qwen3ForCausalLM': 'broken_qwen3.BrokenQwen3'}\n")
    assert main(["check_env", qwen3_dir, "--custom-module-map", str(module_map), "--parity"]) == 1
    out = capsys.readouterr().out
    assert "broken_qwen3.BrokenQwen3" in out  # check_model reports the class that was compared
    assert "FAIL: max|diff|" in out and "> tolerance" in out


def test_tiny_config_keeps_a_real_configs_switches_and_shrinks_its_sizes():
    from transformers import Gemma3TextConfig, Phi3Config, Qwen2Config

    qwen2 = tiny_hf_config(
        "qwen2",
        Qwen2Config(
            num_hidden_layers=28,
            use_sliding_window=True,
            sliding_window=4096,
            max_window_layers=21,
            tie_word_embeddings=True,
            hidden_size=3584,
            num_attention_heads=28,
            num_key_value_heads=4,
        ),
    )
    assert (qwen2.hidden_size, qwen2.num_hidden_layers, qwen2.num_attention_heads, qwen2.vocab_size) == (64, 2, 4, 256)
    assert qwen2.tie_word_embeddings and qwen2.sliding_window == 8
    assert sorted(qwen2.layer_types) == ["full_attention", "sliding_attention"]

    gemma3 = tiny_hf_config("gemma3_text", Gemma3TextConfig(num_hidden_layers=26, final_logit_softcapping=30.0))
    assert gemma3.layer_types == ["sliding_attention", "full_attention"] and gemma3.final_logit_softcapping == 30.0
    assert gemma3.head_dim == 16 and gemma3.query_pre_attn_scalar == 16

    long_rope = {"rope_type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}
    phi3 = tiny_hf_config("phi3", Phi3Config(rope_scaling=long_rope, original_max_position_embeddings=4096))
    assert len(phi3.rope_parameters["short_factor"]) == 8 == len(phi3.rope_parameters["long_factor"])
    assert phi3.rope_parameters["original_max_position_embeddings"] <= 128


def test_tiny_config_of_a_multimodal_type_is_its_language_model():
    assert tiny_hf_config("gemma3").model_type == "gemma3_text"


def test_save_tiny_model_names_the_architecture_to_resolve(tmp_path):
    model = build_tiny_model(tiny_hf_config("llama"))
    save_tiny_model(model, str(tmp_path), "MyLlamaForCausalLM")
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MyLlamaForCausalLM"]


def test_tiny_config_shrinks_only_the_fields_the_family_has():
    gpt2 = tiny_hf_config("gpt2").to_dict()
    assert (gpt2["n_embd"], gpt2["n_layer"], gpt2["n_head"], gpt2["vocab_size"]) == (64, 2, 4, 256)
    assert "num_key_value_heads" not in gpt2 and "intermediate_size" not in gpt2  # multi-head, n_inner


@pytest.fixture
def gpt2_dir(tmp_path) -> str:
    path = str(tmp_path / "gpt2")
    config = tiny_hf_config("gpt2")
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(path)
    return path


def test_cli_parity_with_overrides_at_tp2(gpt2_dir, capsys):
    argv = ["check_env", gpt2_dir, "--parity", "--tp", "2", "--override", "activation_function=relu"]
    assert main(argv + ["--override", "scale_attn_by_inverse_layer_idx=true"]) == 0
    out = capsys.readouterr().out
    assert out.count("(cpu, float32, tp=2)") == 2 and out.count("PASS: max|diff|") == 2


def test_cli_parity_prints_the_engines_own_error_first(gpt2_dir, tmp_path, capsys):
    (tmp_path / "failing_gpt2.py").write_text(
        textwrap.dedent(
            """
            from lmforge.models.gpt2 import GPT2LMHeadModel

            class FailingGPT2(GPT2LMHeadModel):
                def forward(self, *args, **kwargs):
                    raise RuntimeError("shape mismatch in the model")
            """
        )
    )
    (tmp_path / "map.py").write_text("MODULE_MAP = {'GPT2LMHeadModel': 'failing_gpt2.FailingGPT2'}\n")
    assert main(["check_env", gpt2_dir, "--custom-module-map", str(tmp_path / "map.py"), "--parity"]) == 2
    err = capsys.readouterr().err.split("parity check failed to run: ", 1)[1]  # after HF's progress bars
    assert err.startswith("EngineRequestError: the engine failed 4 of 4 requests: RuntimeError: shape mismatch in")
    assert "stack expects" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--parity", "--override", "no_equals_sign"], "--override takes KEY=VALUE"),
        (["--tp", "2"], "--tp only apply with --parity"),
    ],
)
def test_cli_parity_refuses_what_it_cannot_honour(gpt2_dir, capsys, argv, message):
    assert main(["check_env", gpt2_dir, *argv]) == 2
    assert message in capsys.readouterr().err
