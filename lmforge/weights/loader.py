"""Checkpoint names -> parameters. Each parameter's own `weight_loader` takes its slice, so a
model's load_weights is one call here with its `packed_modules_mapping`."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from lmforge.nn.linear import default_weight_loader

from .sanity import report_unused

logger = logging.getLogger(__name__)

_ALWAYS_SKIPPED = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    packed_modules_mapping: dict[str, list[str]] | None = None,
    skip: Iterable[str] = (),
) -> set[str]:
    """Load (checkpoint_name, tensor) pairs into `model`; returns the parameter names loaded.

    packed_modules_mapping {'qkv_proj': ['q_proj', 'k_proj', 'v_proj']} routes `...q_proj.weight` to
    `...qkv_proj.weight` with shard_id 0 (the part's index). Names in `skip` (substrings) are ignored; any other
    tensor that matches no parameter fails the load (lmforge.weights.sanity: unless the caller opted out).
    """
    params = dict(model.named_parameters())
    skip = tuple(skip) + _ALWAYS_SKIPPED
    packed = [
        (name, part, idx) for name, parts in (packed_modules_mapping or {}).items() for idx, part in enumerate(parts)
    ]
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        if any(s in name for s in skip):
            continue
        target, shard_id = name, None
        for packed_name, part, idx in packed:
            if f".{part}." in f".{name}":
                target, shard_id = f".{name}".replace(f".{part}.", f".{packed_name}.", 1)[1:], idx
                break
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", None)
        try:
            if loader is None:
                default_weight_loader(param, tensor)
            elif shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except (ValueError, RuntimeError) as e:
            raise ValueError(
                f"cannot load checkpoint tensor {name!r} of shape {tuple(tensor.shape)} into "
                f"parameter {target!r} of shape {tuple(param.shape)}: {e}"
            ) from e
        loaded.add(target)
    report_unused(unexpected)
    return loaded


def check_all_loaded(model: nn.Module, loaded: set[str]) -> None:
    """Raise if a parameter got no weight (a checkpoint that does not match the model)."""
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing:
        raise ValueError(
            f"the checkpoint has no weights for {len(missing)} parameters, e.g. {missing[:5]}; "
            "is this the right model for this checkpoint?"
        )
