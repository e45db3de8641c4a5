"""The model registry: HF `architectures[0]` -> "module.Class". One line per model.

`load_custom_module_map(path)` reads a user's Python file that defines MODULE_MAP; its folder
goes on sys.path so the model modules beside it import by name. The file may also define ConfigBuilders
(AutoModelConfigBuilder subclasses) and a CONFIG_BUILDERS list naming more ("module" or "module.Class"):
loading the file registers them all, and the engine loads it before it builds the ModelConfig.
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


_LOADED: dict[tuple[str, int], object] = {}


def load_custom_module_map(path: str) -> dict[str, str]:
    """Entries of the MODULE_MAP defined in the Python file at `path` (executed once per version of the file)."""
    return dict(_load_module(path).MODULE_MAP)


def custom_config_builders(path: str) -> list[type]:
    """The ConfigBuilders the custom module map at `path` registers (loading it registers them)."""
    from lmforge.configurations import AutoModelConfigBuilder

    module = _load_module(path)
    builders = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, AutoModelConfigBuilder) and v.__module__ == module.__name__
    ]
    for entry in getattr(module, "CONFIG_BUILDERS", ()):
        if isinstance(entry, type):
            builders.append(entry)
            continue
        try:
            target = importlib.import_module(entry)  # a module: every builder it defines
            builders += [v for v in vars(target).values() if isinstance(v, type) and v.__module__ == entry]
        except ImportError:
            module_name, _, class_name = entry.rpartition(".")
            builders.append(getattr(importlib.import_module(module_name), class_name))
    bad = [b for b in builders if not (isinstance(b, type) and issubclass(b, AutoModelConfigBuilder))]
    if bad:
        raise TypeError(f"CONFIG_BUILDERS of {path} names {bad}, which are not AutoModelConfigBuilder subclasses")
    return [b for b in dict.fromkeys(builders) if b is not AutoModelConfigBuilder]


def _load_module(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"custom_module_map file not found: {path}")
    path = os.path.abspath(path)
    key = (path, os.stat(path).st_mtime_ns)
    if key in _LOADED:
        return _LOADED[key]
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"lmforge_custom_module_map_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so its classes (builders) can name their module
    spec.loader.exec_module(module)
    if not isinstance(getattr(module, "MODULE_MAP", None), dict):
        raise ValueError(f"{path} must define a dict named MODULE_MAP ('HFArchitecture': 'module.Class')")
    _LOADED[key] = module
    try:
        custom_config_builders(path)  # imports the modules CONFIG_BUILDERS names, which registers their builders
    except Exception:
        del _LOADED[key]
        raise
    return module


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
