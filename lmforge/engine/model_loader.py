"""Builds the model class named by MODULE_MAP under a build context and loads its weights."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch
from torch import nn

from lmforge.backends.registry import BuildContext, build_context
from lmforge.model_inputs import StepContextManager
from lmforge.model_source import ModelSource
from lmforge.models.module_map import resolve_model_class
from lmforge.nn.quant import attach_quant_states, finish_loading, parse_quant_config
from lmforge.weights.loader import check_all_loaded
from lmforge.weights.sanity import FiniteCheck, unused_weights_allowed

logger = logging.getLogger(__name__)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_model(
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    ctx_mgr: StepContextManager,
    custom_module_map: str | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    tp_group=None,
    load: bool = True,
    check_weights: bool = True,
    times: dict[str, float] | None = None,
) -> nn.Module:
    """`times`, when given, gets the seconds of the build (`build_s`) and of the weight load (`weights_s`)."""
    t0 = time.perf_counter()
    model_cls = resolve_model_class(source.model_config.model_arch, custom_module_map)
    quant_config = parse_quant_config(getattr(source.hf_config, "quantization_config", None))
    ctx = BuildContext(
        device_type=device.type,
        device=device,
        dtype=dtype,
        tp_rank=tp_rank,
        tp_size=tp_size,
        tp_group=tp_group,
        quant_config=quant_config,
    )
    # the default device/dtype also cover seed-style models that create plain nn.Linear layers
    with build_context(ctx), torch.device(device), _default_dtype(dtype):
        model = model_cls(source.hf_config, ctx_mgr, dtype=dtype, device=device)
        if quant_config is not None:  # each quantized layer learns its module name (see lmforge/nn/quant)
            attach_quant_states(model)
    model.eval()
    t1 = time.perf_counter()
    if load:
        load_model_weights(model, source, dtype, device, check_weights)
    if times is not None:
        times["build_s"], times["weights_s"] = t1 - t0, time.perf_counter() - t1
    return model


def load_model_weights(
    model: nn.Module, source: ModelSource, dtype: torch.dtype, device: torch.device, check_weights: bool = True
) -> None:
    """Stream the checkpoint into `model`. `check_weights`: NaN/Inf in a tensor, or a tensor no parameter takes,
    fails the load (lmforge.weights.sanity); False only logs them."""
    from lmforge.weights.files import iter_weights

    # a quantized checkpoint's tensors keep their dtypes (scales too); each parameter casts what it copies
    quantized = getattr(source.hf_config, "quantization_config", None) is not None
    weights = FiniteCheck(iter_weights(source.path, dtype=None if quantized else dtype, device=device))
    with unused_weights_allowed(not check_weights):
        loaded = model.load_weights(weights)
    weights.raise_if_bad(allowed=not check_weights)
    finish_loading(model)  # quantized layers convert their checkpoint tensors (process_weights_after_loading)
    if isinstance(loaded, set):  # built-in models report what they loaded; seed-style ones may return None
        check_all_loaded(model, loaded)
