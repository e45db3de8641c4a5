"""Small Triton helpers shared by several kernels."""

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# finite start for running maxima: a fully masked chunk then gives exp2(-inf - NEG_BIG) = 0 instead of NaN
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def tanh(x):
    # exp-based so it runs on every Triton backend (interpreter included); saturates to +-1 without NaN
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


def check_out(out: torch.Tensor | None, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A caller-given output buffer (a CUDA-graph static buffer, a poisoned test buffer) or a new one."""
    if out is None:
        return like.new_empty(shape)
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be {like.dtype} {shape} on {like.device}, got {out.dtype} {tuple(out.shape)}")
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """float32 models get exact float32 dots; tf32 would cost them ~3 decimal digits. Other dtypes ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
