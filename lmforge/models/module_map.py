"""The model registry: HF `architectures[0]` -> "module.Class". One line per model.

`load_custom_module_map(path)` reads a user's Python file that defines MODULE_MAP; its folder
goes on sys.path so the model modules beside it import by name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

LMFORGE_MODEL_PATH = "lmforge.models"

MODULE_MAP: dict[str, str] = {
    "LlamaForCausalLM": f"{LMFORGE_MODEL_PATH}.llama.LlamaForCausalLM",
    "MistralForCausalLM": f"{LMFORGE_MODEL_PATH}.mistral.MistralForCausalLM",
    "Qwen2ForCausalLM": f"{LMFORGE_MODEL_PATH}.qwen2.Qwen2ForCausalLM",
    "Qwen3ForCausalLM": f"{LMFORGE_MODEL_PATH}.qwen3.Qwen3ForCausalLM",
    "GemmaForCausalLM": f"{LMFORGE_MODEL_PATH}.gemma.GemmaForCausalLM",
    "Gemma2ForCausalLM": f"{LMFORGE_MODEL_PATH}.gemma2.Gemma2ForCausalLM",
    "Gemma3ForCausalLM": f"{LMFORGE_MODEL_PATH}.gemma3.Gemma3ForCausalLM",
    "Phi3ForCausalLM": f"{LMFORGE_MODEL_PATH}.phi3.Phi3ForCausalLM",
    "MixtralForCausalLM": f"{LMFORGE_MODEL_PATH}.mixtral.MixtralForCausalLM",
    "Qwen3MoeForCausalLM": f"{LMFORGE_MODEL_PATH}.qwen3_moe.Qwen3MoeForCausalLM",
    "DeepseekV3ForCausalLM": f"{LMFORGE_MODEL_PATH}.deepseek_v3.DeepseekV3ForCausalLM",
    "PhiForCausalLM": f"{LMFORGE_MODEL_PATH}.phi.PhiForCausalLM",
    "CohereForCausalLM": f"{LMFORGE_MODEL_PATH}.cohere.CohereForCausalLM",
    "GPT2LMHeadModel": f"{LMFORGE_MODEL_PATH}.gpt2.GPT2LMHeadModel",
    "GraniteForCausalLM": f"{LMFORGE_MODEL_PATH}.granite.GraniteForCausalLM",
    "StableLmForCausalLM": f"{LMFORGE_MODEL_PATH}.stablelm.StableLmForCausalLM",
    "Olmo2ForCausalLM": f"{LMFORGE_MODEL_PATH}.olmo2.Olmo2ForCausalLM",
}


def load_custom_module_map(path: str) -> dict[str, str]:
    """Entries of the MODULE_MAP defined in the Python file at `path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"custom_module_map file not found: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"lmforge_custom_module_map_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entries = getattr(module, "MODULE_MAP", None)
    if not isinstance(entries, dict):
        raise ValueError(f"{path} must define a dict named MODULE_MAP ('HFArchitecture': 'module.Class')")
    return dict(entries)


def get_module_map(custom_module_map: str | None = None) -> dict[str, str]:
    module_map = dict(MODULE_MAP)
    if custom_module_map:
        module_map.update(load_custom_module_map(custom_module_map))
    return module_map


def resolve_model_class(architecture: str | None, custom_module_map: str | None = None) -> type:
    module_map = get_module_map(custom_module_map)
    if architecture not in module_map:
        raise ValueError(
            f"unsupported architecture {architecture!r}. Supported: {', '.join(sorted(module_map))}. To add it, write "
            "a model file and register it: a MODULE_MAP line in lmforge/models/module_map.py, or a file defining "
            "MODULE_MAP = {'" + str(architecture) + "': 'your_module.YourModelClass'} passed as "
            "PytorchEngineConfig(custom_module_map='/path/to/module_map.py') (see docs/adding_a_model.md)"
        )
    target = module_map[architecture]
    module_name, _, class_name = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"MODULE_MAP entry {architecture!r} -> {target!r} cannot be imported: {e}") from e
