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
from lmforge.nn.quant.config import GGUFConfig
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
    pack_gguf: bool = False,
    times: dict[str, float] | None = None,
) -> nn.Module:
    """pack_gguf: a GGUF file's linear layers stay packed as int4 planes where their type allows (CPU, no TP;
    see gguf_plan); otherwise every GGUF weight is dequantized to `dtype`. `times`, when given, gets the seconds of
    the build (`build_s`) and of the weight load (`weights_s`)."""
    t0 = time.perf_counter()
    model_cls = resolve_model_class(source.model_config.model_arch, custom_module_map)
    quant_config = parse_quant_config(getattr(source.hf_config, "quantization_config", None))
    plan = gguf_plan(source, model_cls, device, tp_size) if pack_gguf else {}
    if plan:
        from lmforge.weights.gguf_pack import PLANES

        quant_config = GGUFConfig(plan, {t.name: p for t, p in PLANES.items()})
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
        load_model_weights(model, source, dtype, device, check_weights, plan)
    if times is not None:
        times["build_s"], times["weights_s"] = t1 - t0, time.perf_counter() - t1
    return model


def gguf_plan(source: ModelSource, model_cls, device: torch.device, tp_size: int) -> dict[str, str]:
    """The GGUF layers that stay packed (weights.gguf.gguf_pack_plan), with a log line saying what was chosen."""
    if source.gguf_file is None or device.type != "cpu" or tp_size != 1:
        return {}
    from lmforge.weights.gguf import gguf_pack_plan  # the gguf package: only for GGUF files

    tied = getattr(source.hf_config, "tie_word_embeddings", getattr(model_cls, "default_tie_word_embeddings", False))
    plan, dense = gguf_pack_plan(source.gguf_file, getattr(model_cls, "packed_modules_mapping", None), bool(tied))
    from lmforge.kernels import cpu as cpu_kernels

    matmul = (
        "lmforge's CPU kernels, float32 activations"
        if cpu_kernels.available()
        else "torch's int4 kernel, bf16 activations in a float32 model"
    )
    logger.info(
        "GGUF on CPU: %d linear layers kept packed as int4 planes of group 32 (%s; matmuls: %s), %d dequantized to "
        "the model dtype (%s)",
        len(plan),
        _count_types(plan.values()),
        matmul,
        len(dense),
        _count_types(dense.values()),
    )
    return plan


def _count_types(types) -> str:
    counts: dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    return ", ".join(f"{t} x{n}" for t, n in sorted(counts.items())) or "none"


def load_model_weights(
    model: nn.Module,
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    check_weights: bool = True,
    gguf_packed: dict[str, str] | None = None,
) -> None:
    """Stream the checkpoint into `model`. `check_weights`: NaN/Inf in a tensor, or a tensor no parameter takes,
    fails the load (lmforge.weights.sanity); False only logs them. gguf_packed: build_model's plan of packed
    GGUF layers (the model must have been built under its GGUFConfig)."""
    from lmforge.weights.files import iter_weights

    # a quantized checkpoint's tensors keep their dtypes (scales too); each parameter casts what it copies
    quantized = getattr(source.hf_config, "quantization_config", None) is not None
    weights = FiniteCheck(iter_weights(source.path, None if quantized else dtype, device, gguf_packed=gguf_packed))
    with unused_weights_allowed(not check_weights):
        loaded = model.load_weights(weights)
    weights.raise_if_bad(allowed=not check_weights)
    finish_loading(model)  # quantized layers convert their checkpoint tensors (process_weights_after_loading)
    if isinstance(loaded, set):  # built-in models report what they loaded; seed-style ones may return None
        check_all_loaded(model, loaded)
