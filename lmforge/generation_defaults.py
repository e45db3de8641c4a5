"""A model's own sampling defaults, used wherever a request leaves a setting unset (pipeline, CLI, server).

Read from an HF folder's generation_config.json, or a GGUF file's `general.sampling.*` metadata. The embedded
SmolLM2-135M-Instruct GGUF carries none, so its model card's recommendation is written down here.
"""

from __future__ import annotations

import json
import logging
import os

from lmforge.weights.default_model import DEFAULT_MODEL_FILE

logger = logging.getLogger(__name__)

KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_GGUF_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}
# HuggingFaceTB/SmolLM2-135M-Instruct's model card samples with temperature=0.2, top_p=0.9.
EMBEDDED_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}


def _checked(values: dict) -> dict:
    """Only the sampling keys, with values GenerationConfig accepts (a bad file must not break every request)."""
    out = {}
    for key in KEYS:
        value = values.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key == "top_k":
            value = int(value)
            if value >= 0:
                out[key] = value
        elif (key == "temperature" and 0 <= value <= 2) or (key in ("top_p", "min_p") and 0 <= value <= 1):
            if key != "top_p" or value > 0:
                out[key] = float(value)
        elif key == "repetition_penalty" and 0.01 <= value <= 100:
            out[key] = float(value)
    return out


def _gguf_defaults(path: str) -> dict:
    if os.path.basename(path) == DEFAULT_MODEL_FILE:
        return dict(EMBEDDED_DEFAULTS)
    import gguf

    reader = gguf.GGUFReader(path)
    values = {}
    for key, name in _GGUF_KEYS.items():
        f = reader.fields.get(key)
        if f is not None and f.data:
            values[name] = f.parts[f.data[0]].tolist()[0]
    return values


def load_generation_defaults(path: str, gguf_file: str | None = None) -> dict:
    """{'temperature': ..., 'top_p': ..., ...}: only the keys the model sets. `path`: a model folder or .gguf."""
    try:
        if gguf_file or path.endswith(".gguf"):
            values = _gguf_defaults(gguf_file or path)
        else:
            file = os.path.join(path, "generation_config.json")
            if not os.path.isfile(file):
                return {}
            with open(file) as f:
                values = json.load(f)
    except (OSError, ValueError) as e:
        logger.warning("ignoring the model's generation defaults, which cannot be read: %s", e)
        return {}
    return _checked(values) if isinstance(values, dict) else {}


def sampling_kwargs(defaults: dict) -> dict:
    """GenerationConfig keyword arguments for a model's defaults: sampling on when it sets a temperature > 0."""
    kwargs = {k: v for k, v in defaults.items() if k in KEYS}
    if "temperature" in kwargs:
        kwargs["do_sample"] = kwargs["temperature"] > 0
        if kwargs["temperature"] == 0:
            kwargs["temperature"] = 1.0  # greedy; GenerationConfig keeps a valid divisor
    return kwargs
