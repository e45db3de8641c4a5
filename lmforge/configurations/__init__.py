"""One ConfigBuilder per HF architecture family; importing this package registers them all
(the default builder is always tried last)."""

from . import deepseek, default, gemma, llama  # noqa: F401  (registration by import)
from .builder import AutoModelConfigBuilder

__all__ = ["AutoModelConfigBuilder"]
