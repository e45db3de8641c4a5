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


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D1, BLOCK_D2): a power-of-two head and a tail block (0 if none; at least 16, the smallest dot K).

    Padding a head dim to the next power of two wastes up to half the loads and dots: MLA's 576 would become
    1024 and no longer fit in shared memory. Split, 576 = 512 + 64, 96 = 64 + 32, 40 = 32 + 16 (8 used)."""
    block_d1 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - block_d1
    return block_d1, (max(16, 1 << (rest - 1).bit_length()) if rest else 0)


def shares_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, v_dim: int, block_d1: int) -> bool:
    """True when the values are the leading block_d1 channels of the key cache itself (MLA's latent cache):
    then the kernels reuse the key tile as the value tile instead of loading the same bytes twice."""
    return v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride() and v_dim == block_d1
