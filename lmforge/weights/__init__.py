"""Weight files: safetensors, PyTorch .bin/.pt and GGUF, streamed as HF-named tensors."""

from lmforge.weights.default_model import default_model_path
from lmforge.weights.errors import WeightFileError
from lmforge.weights.files import find_weight_files, iter_weights
from lmforge.weights.gguf import gguf_hf_config, gguf_tokenizer, iter_gguf_weights

__all__ = [
    "WeightFileError",
    "default_model_path",
    "find_weight_files",
    "gguf_hf_config",
    "gguf_tokenizer",
    "iter_gguf_weights",
    "iter_weights",
]
