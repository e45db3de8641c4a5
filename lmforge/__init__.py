"""lmforge: an LLM inference and serving engine in Python and PyTorch."""

from lmforge.messages import GenerationConfig, PytorchEngineConfig, Response

__version__ = "0.1.0"
__all__ = ["GenerationConfig", "PytorchEngineConfig", "Response", "pipeline"]


def pipeline(model_path: str | None = None, backend_config: PytorchEngineConfig | None = None):
    """Build a Pipeline (imported lazily so `import lmforge` stays light)."""
    from lmforge.pipeline import pipeline as _pipeline

    return _pipeline(model_path, backend_config)
