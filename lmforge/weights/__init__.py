"""Weight files: safetensors, PyTorch .bin/.pt and GGUF, streamed as HF-named tensors.

Names are imported on first use, so model files (which need only `weights.loader`) do not pull in
the GGUF reader and its `gguf` dependency.
"""

import importlib

_EXPORTS = {
    "WeightFileError": "lmforge.weights.errors",
    "default_model_path": "lmforge.weights.default_model",
    "find_weight_files": "lmforge.weights.files",
    "iter_weights": "lmforge.weights.files",
    "gguf_hf_config": "lmforge.weights.gguf",
    "gguf_tokenizer": "lmforge.weights.gguf",
    "iter_gguf_weights": "lmforge.weights.gguf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.weights' has no attribute {name!r}")
