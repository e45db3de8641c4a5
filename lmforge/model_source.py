"""Where a model comes from: an HF folder (safetensors/.bin + config.json) or a single GGUF file.
Resolves the path, the HF config, the ModelConfig and the tokenizer; nothing is downloaded. The HF config of a
built-in family is read by configurations.hf_json (no transformers import); others go through AutoConfig."""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from typing import Any

from lmforge.config import ModelConfig
from lmforge.configurations import AutoModelConfigBuilder
from lmforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelSource:
    path: str  # folder, or the .gguf file
    gguf_file: str | None
    hf_config: Any
    model_config: ModelConfig
    tokenizer: Tokenizer | None
    name: str


def resolve_model_path(model_path: str | None) -> str:
    if model_path is None:
        from lmforge.weights.default_model import default_model_path

        return default_model_path()
    path = os.path.expanduser(model_path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model path {model_path!r} does not exist; give an HF model folder (config.json + *.safetensors) or a "
            ".gguf file (lmforge downloads nothing)"
        )
    return path


def _gguf_in(path: str) -> str | None:
    if path.endswith(".gguf") and os.path.isfile(path):
        return path
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        files = glob.glob(os.path.join(path, "*.gguf"))
        if len(files) == 1:
            return files[0]
    return None


def load_hf_config(
    path: str, trust_remote_code: bool = False, custom_module_map: str | None = None, with_transformers: bool = False
):
    """The model's HF config. A built-in family's is read by configurations.hf_json without importing transformers
    (seconds of every start); other families, every model under a custom_module_map (whose classes and
    ConfigBuilders may hand the config to transformers code) and with_transformers (a caller that builds an HF
    model from it) get transformers' own PretrainedConfig."""
    with_transformers = with_transformers or bool(custom_module_map)
    gguf_file = _gguf_in(path)
    if gguf_file:
        from lmforge.weights.gguf import gguf_hf_config

        return gguf_hf_config(gguf_file, with_transformers=with_transformers)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json (and is not a .gguf file); is it an HF model folder?")
    if not with_transformers:
        from lmforge.configurations.hf_json import load_hf_config_json

        config = load_hf_config_json(path)
        if config is not None:
            return config
    from transformers import AutoConfig

    _check_model_type(path, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as e:
        raise ValueError(f"cannot read {os.path.join(path, 'config.json')}: {e}") from e


def _check_model_type(path: str, trust_remote_code: bool) -> None:
    """A model_type transformers does not know: say so plainly, with what lmforge runs, instead of transformers'
    advice to upgrade (which rarely helps: such a model usually ships its own code, or is not supported here)."""
    import json

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is None or model_type in CONFIG_MAPPING:
        return
    if trust_remote_code and "auto_map" in config:
        return  # the folder brings its own config class
    from lmforge.models.module_map import MODULE_MAP

    raise ValueError(
        f"{file} has model_type '{model_type}', which neither lmforge nor transformers {transformers.__version__} "
        f"knows. lmforge runs these architectures: {', '.join(sorted(MODULE_MAP))}"
        + (" (this folder ships its own code: pass --trust-remote-code to load it)" if "auto_map" in config else "")
    )


def load_tokenizer(path: str, eos_token_ids: list[int], trust_remote_code: bool = False) -> Tokenizer | None:
    gguf_file = _gguf_in(path)
    if gguf_file:
        from lmforge.weights.gguf import gguf_tokenizer

        return Tokenizer(gguf_tokenizer(gguf_file), eos_token_ids)
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        logger.info("no tokenizer files in %s: only token-id prompts can be served", path)
        return None
    from lmforge.fast_tokenizer import FastTokenizer, unsupported_reason

    reason = unsupported_reason(path)
    if reason is None:
        return Tokenizer(FastTokenizer(path), eos_token_ids)
    logger.info("tokenizer of %s through transformers' AutoTokenizer: %s", path, reason)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    return Tokenizer(hf, eos_token_ids)


def load_model_source(
    model_path: str | None,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
    custom_module_map: str | None = None,
    with_transformers: bool = False,
) -> ModelSource:
    """custom_module_map is loaded first, so the ConfigBuilders it defines take part in building the ModelConfig.
    with_transformers: hf_config is transformers' PretrainedConfig whatever the family (see load_hf_config)."""
    path = resolve_model_path(model_path)
    hf_config = load_hf_config(path, trust_remote_code, custom_module_map, with_transformers)
    if custom_module_map:
        from lmforge.models.module_map import load_custom_module_map

        load_custom_module_map(custom_module_map)
    model_config = AutoModelConfigBuilder.build(hf_config, path)
    tokenizer = load_tokenizer(path, model_config.eos_token_ids, trust_remote_code) if with_tokenizer else None
    gguf_file = _gguf_in(path)
    name = os.path.basename(os.path.normpath(gguf_file or path))
    return ModelSource(path, gguf_file, hf_config, model_config, tokenizer, name)
