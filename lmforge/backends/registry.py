"""Op registry and the build context.

An nn module calls `get_op(name)` once, in `__init__`, and gets the function of the backend
active in the build context that the loader set while the model is constructed. The cuda
backend falls back to the cpu reference for ops it has no kernel for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

_BACKEND_MODULES = {"cpu": "lmforge.backends.cpu", "cuda": "lmforge.backends.cuda"}


@dataclass(slots=True)
class BuildContext:
    """Defaults for op builders while a model is built: a model file never passes these by hand."""

    device_type: str = "cpu"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None
    quant_config: Any = None


_BUILD_CTX: ContextVar[BuildContext | None] = ContextVar("lmforge_build_ctx", default=None)


def current_build_context() -> BuildContext:
    """The context set by `build_context`, or CPU/float32 defaults outside one."""
    return _BUILD_CTX.get() or BuildContext()


@contextmanager
def build_context(ctx: BuildContext) -> Iterator[BuildContext]:
    token = _BUILD_CTX.set(ctx)
    try:
        yield ctx
    finally:
        _BUILD_CTX.reset(token)


def _ops_of(device_type: str) -> dict[str, Callable]:
    if device_type not in _BACKEND_MODULES:
        raise ValueError(f"unknown backend {device_type!r}; known: {sorted(_BACKEND_MODULES)}")
    return importlib.import_module(_BACKEND_MODULES[device_type]).OPS


def get_op(name: str, device_type: str | None = None) -> Callable:
    device_type = device_type or current_build_context().device_type
    ops = _ops_of(device_type)
    if name in ops:
        return ops[name]
    cpu_ops = _ops_of("cpu")
    if name in cpu_ops:
        return cpu_ops[name]
    raise KeyError(f"no implementation of op {name!r} for backend {device_type!r}")
