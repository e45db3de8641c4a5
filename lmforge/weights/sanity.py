"""Weight sanity at load: a tensor holding NaN/Inf, or a checkpoint tensor that no parameter takes, fails the load
with the names (a GGUF with a corrupted stretch, or a quantized checkpoint whose scales this build ignores, would
otherwise load and serve garbage). `check_weights=False` (`--skip-weight-checks`) only logs them.

The finiteness check is one fused reduction per tensor (aminmax: NaN and +-Inf propagate into min or max), run on
the tensor's device as it streams past, with one host sync at the end; integer and 8-bit tensors (quantized
weights, whose scales are checked as floats) are skipped.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

# Set by the model loader for the duration of one load; weights.loader consults it for unexpected tensors.
_ALLOW_UNUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("lmforge_allow_unused_weights", default=False)
SKIP_HINT = "pass --skip-weight-checks (check_weights=False) to load it anyway"


def allow_unused() -> bool:
    return _ALLOW_UNUSED.get()


@contextlib.contextmanager
def unused_weights_allowed(allowed: bool):
    token = _ALLOW_UNUSED.set(allowed)
    try:
        yield
    finally:
        _ALLOW_UNUSED.reset(token)


def report_unused(names: list[str]) -> None:
    """Checkpoint tensors no parameter took: an error, or (opted out) a warning."""
    if not names:
        return
    message = f"{len(names)} checkpoint tensors match no parameter of the model, e.g. {names[:8]}"
    if allow_unused():
        logger.warning("ignored %s", message)
        return
    raise ValueError(
        f"{message}; the checkpoint may be quantized or of a different architecture than this build supports "
        f"({SKIP_HINT})"
    )


def _is_checked(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.element_size() >= 2 and tensor.numel() > 0


class FiniteCheck:
    """Wraps a (name, tensor) stream; `raise_if_bad()` after the stream is consumed names non-finite tensors."""

    def __init__(self, weights: Iterable[tuple[str, torch.Tensor]]):
        self.weights = weights
        self._extrema: dict[torch.device, list[torch.Tensor]] = {}
        self._names: dict[torch.device, list[str]] = {}

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.weights:
            if _is_checked(tensor):
                low, high = torch.aminmax(tensor.detach())
                self._extrema.setdefault(tensor.device, []).append(torch.stack([low, high]).float())
                self._names.setdefault(tensor.device, []).append(name)
            yield name, tensor

    def bad_tensors(self) -> list[str]:
        bad = []
        for device, pairs in self._extrema.items():
            finite = torch.stack(pairs).isfinite().all(dim=1).cpu()  # the one sync per device
            bad += [n for n, ok in zip(self._names[device], finite.tolist(), strict=True) if not ok]
        return bad

    def raise_if_bad(self, allowed: bool = False) -> None:
        bad = self.bad_tensors()
        if not bad:
            return
        message = f"{len(bad)} checkpoint tensors hold NaN or Inf values: {bad[:8]}"
        if allowed:
            logger.warning("%s (loaded anyway)", message)
            return
        raise ValueError(f"{message}; the weights are corrupt ({SKIP_HINT})")
