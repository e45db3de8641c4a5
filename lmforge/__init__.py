"""lmforge: an LLM inference and serving engine in Python and PyTorch."""

# before torch loads: OpenMP reads its wait policy once, at load (lmforge/cpu_threads.py says why)
from lmforge.cpu_threads import set_omp_wait_policy

set_omp_wait_policy()

# the submodule is imported first so that the name `pipeline` below stays bound to the function
# (importing a submodule sets the package attribute of the same name once, on first import)
import lmforge.pipeline as _pipeline_module  # noqa: E402
from lmforge.messages import GenerationConfig, PytorchEngineConfig, Response  # noqa: E402

pipeline = _pipeline_module.pipeline
Pipeline = _pipeline_module.Pipeline

__version__ = "0.1.0"
__all__ = ["GenerationConfig", "Pipeline", "PytorchEngineConfig", "Response", "pipeline"]
