"""lmforge: an LLM inference and serving engine in Python and PyTorch."""

# the submodule is imported first so that the name `pipeline` below stays bound to the function
# (importing a submodule sets the package attribute of the same name once, on first import)
import lmforge.pipeline as _pipeline_module
from lmforge.messages import GenerationConfig, PytorchEngineConfig, Response

pipeline = _pipeline_module.pipeline
Pipeline = _pipeline_module.Pipeline

__version__ = "0.1.0"
__all__ = ["GenerationConfig", "Pipeline", "PytorchEngineConfig", "Response", "pipeline"]
