"""Backends: where each lmforge.nn op gets its implementation (cpu: pure torch reference; cuda: Triton)."""

from .registry import BuildContext, build_context, current_build_context, get_op

__all__ = ["BuildContext", "build_context", "current_build_context", "get_op"]
