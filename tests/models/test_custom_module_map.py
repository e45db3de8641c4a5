"""A model registered only through `custom_module_map`: a map file and a model module in a folder outside the
package, used by `pipeline` both to override a built-in architecture and to add a new one."""

from __future__ import annotations

import json
import os
import textwrap

import torch

from lmforge.check_env.parity import build_tiny_model, hf_greedy, save_tiny_model, tiny_hf_config
from lmforge.messages import GenerationConfig, PytorchEngineConfig
from lmforge.pipeline import pipeline

MODEL_MODULE = """
from lmforge.models.qwen2 import Qwen2ForCausalLM


class {name}(Qwen2ForCausalLM):
    # counts forwards, so the test sees this class (not the built-in one) doing the work
    num_forwards = 0

    def forward(self, *args, **kwargs):
        type(self).num_forwards += 1
        return super().forward(*args, **kwargs)
"""


def _write_plugin(folder, module: str, name: str, architecture: str) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{module}.py"), "w") as f:
        f.write(textwrap.dedent(MODEL_MODULE.format(name=name)))
    map_file = os.path.join(folder, "module_map.py")
    with open(map_file, "w") as f:
        f.write(f"MODULE_MAP = {{{architecture!r}: '{module}.{name}'}}\n")
    return map_file


def _run(model_dir: str, map_file: str, prompt: list[int]) -> tuple[object, list[int]]:
    config = PytorchEngineConfig(device_type="cpu", dtype="float32", num_cpu_blocks=64, custom_module_map=map_file)
    with pipeline(model_dir, config) as pipe:
        response = pipe(prompt, GenerationConfig(max_new_tokens=5, ignore_eos=True))
        return pipe.engine.model, response.token_ids


def test_custom_module_map_overrides_a_builtin_architecture(tmp_path):
    hf = build_tiny_model(tiny_hf_config("qwen2"))
    model_dir = str(tmp_path / "model")
    save_tiny_model(hf, model_dir)
    map_file = _write_plugin(tmp_path / "plugins_a", "override_qwen2", "OverrideQwen2", "Qwen2ForCausalLM")
    prompt = [5, 9, 17, 33, 2, 71, 100]
    model, tokens = _run(model_dir, map_file, prompt)
    assert type(model).__name__ == "OverrideQwen2" and type(model).__module__ == "override_qwen2"
    assert type(model).num_forwards > 0
    with torch.inference_mode():
        assert tokens == hf_greedy(hf, prompt, 5)


def test_custom_module_map_adds_a_new_architecture(tmp_path):
    hf = build_tiny_model(tiny_hf_config("qwen2"))
    model_dir = str(tmp_path / "model")
    save_tiny_model(hf, model_dir, architecture="AcmeForCausalLM")  # unknown to lmforge's MODULE_MAP
    assert json.loads(open(os.path.join(model_dir, "config.json")).read())["architectures"] == ["AcmeForCausalLM"]
    map_file = _write_plugin(tmp_path / "plugins_b", "acme_model", "AcmeForCausalLM", "AcmeForCausalLM")
    prompt = [3, 4, 5, 6]
    model, tokens = _run(model_dir, map_file, prompt)
    assert type(model).__module__ == "acme_model" and type(model).num_forwards > 0
    with torch.inference_mode():
        assert tokens == hf_greedy(hf, prompt, 5)
