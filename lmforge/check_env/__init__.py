"""Checks run before the engine starts. `check_model` resolves a model the way the engine will
and reports what it found, or names the step that failed and why."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from lmforge.config import ModelConfig


class ModelCheckError(RuntimeError):
    pass


@dataclass(slots=True)
class ModelCheckReport:
    path: str
    architecture: str | None
    builder: str
    model_class: str
    model_config: ModelConfig
    quantization: str | None = None  # the checkpoint's quantization_config, as lmforge will load it

    def __str__(self) -> str:
        c = self.model_config
        fields = (
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "bos_token_id",
            "eos_token_id",
            "sliding_window",
            "tie_word_embeddings",
        )
        lines = [
            f"model path:     {self.path}",
            f"architecture:   {self.architecture}",
            f"config builder: {self.builder}",
            f"model class:    {self.model_class}",
            "ModelConfig:",
        ]
        lines += [f"  {f}: {getattr(c, f)}" for f in fields]
        lines.append(f"quantization:   {self.quantization or 'none'}")
        return "\n".join(lines)


def check_model(
    model_path: str | None, trust_remote_code: bool = False, custom_module_map: str | None = None, verbose: bool = True
) -> ModelCheckReport:
    """Load the HF config, run the config builders (those of custom_module_map first), resolve the model class.
    `builder` in the report is the ConfigBuilder used (with its file when it is not lmforge's). Raises
    ModelCheckError."""
    from lmforge.configurations import AutoModelConfigBuilder
    from lmforge.model_source import load_hf_config, resolve_model_path
    from lmforge.models.module_map import custom_config_builders, resolve_model_class

    steps = []
    try:
        steps.append("resolve the model path")
        path = resolve_model_path(model_path)
        steps.append("read the HF config")
        hf_config = load_hf_config(path, trust_remote_code, custom_module_map)
        if custom_module_map:  # its ConfigBuilders take part from here on, as in the engine
            steps.append(f"load the custom module map {custom_module_map}")
            custom_config_builders(custom_module_map)
        steps.append("find a config builder")
        builder = AutoModelConfigBuilder.find_builder(hf_config)
        steps.append(f"build ModelConfig with {builder.__name__}")
        model_config = AutoModelConfigBuilder.build(hf_config, path)
        steps.append("resolve the model class")
        model_cls = resolve_model_class(model_config.model_arch, custom_module_map)
        steps.append("read the quantization_config")
        from lmforge.nn.quant import parse_quant_config

        quant_config = parse_quant_config(getattr(hf_config, "quantization_config", None))
    except Exception as e:
        raise ModelCheckError(f"check_model failed to {steps[-1]}: {type(e).__name__}: {e}") from e
    report = ModelCheckReport(
        path,
        model_config.model_arch,
        _builder_name(builder),
        f"{model_cls.__module__}.{model_cls.__qualname__}",
        model_config,
        None if quant_config is None else quant_config.describe(),
    )
    if verbose:
        print(report)
    return report


def _builder_name(builder: type) -> str:
    """lmforge's builders by name; any other with the file that defines it."""
    if builder.__module__.startswith("lmforge."):
        return builder.__name__
    source = getattr(sys.modules.get(builder.__module__), "__file__", None) or builder.__module__
    return f"{builder.__qualname__} (from {source})"


__all__ = ["ModelCheckError", "ModelCheckReport", "check_model"]
