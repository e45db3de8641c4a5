"""Shared fixtures of the Triton kernel tests.

Kernels run on CUDA. Without a GPU the tests skip, unless TRITON_INTERPRET=1 is set (and triton is
installed), in which case they run on CPU tensors in Triton's interpreter: slow, but a free way to debug
a kernel. The interpreter mishandles bfloat16, so bf16 cases skip there. The root conftest skips every gpu test
without CUDA, so run them as `TRITON_INTERPRET=1 pytest tests/kernels --confcutdir tests/kernels`
(numpy < 2.3: newer numpy breaks the interpreter's loops with runtime bounds).
"""

from __future__ import annotations

import os

import pytest
import torch

from lmforge.model_inputs import AttnMetadata

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_DEVICE = torch.cuda.is_available() or INTERPRET


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture
def device() -> torch.device:
    if not HAS_DEVICE:
        pytest.skip("needs CUDA (or TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    return _device()


@pytest.fixture
def check_dtype():
    """Skips dtypes the current runner cannot check (bf16 under the interpreter)."""

    def check(dtype: torch.dtype) -> None:
        if INTERPRET and not torch.cuda.is_available() and dtype == torch.bfloat16:
            pytest.skip("the Triton interpreter mishandles bfloat16")

    return check


@pytest.fixture
def poison_allocator():
    """Fills recently freed CUDA memory with NaN so a launcher's torch.empty output likely starts as NaN:
    an element the kernel forgets to write then fails the comparison."""

    def poison(num_bytes: int = 64 << 20) -> None:
        if torch.cuda.is_available():
            torch.empty(num_bytes // 4, device="cuda").fill_(float("nan"))

    return poison


def tolerances(dtype: torch.dtype) -> dict:
    return {torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}, torch.float16: {"atol": 4e-3, "rtol": 4e-3}}.get(
        dtype, {"atol": 1e-4, "rtol": 1e-4}
    )


@pytest.fixture
def tol():
    return tolerances


@pytest.fixture
def paged_batch():
    """Factory of a random paged batch: caches full of random values (stale slots included, so a kernel
    that reads past a sequence's keys gets garbage), blocks assigned in shuffled order, and the metadata; drawn
    from `generator` when given (a CPU one), else from torch's default one."""

    def build(
        q_lens: list[int],
        kv_lens: list[int],
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        is_decoding: bool | None = None,
        extra_blocks: int = 2,
        v_head_dim: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        num_seqs = len(q_lens)
        v_head_dim = v_head_dim or head_dim

        def randn(*shape: int) -> torch.Tensor:  # a CPU generator's draws are the same on every machine
            if generator is None:
                return torch.randn(*shape, dtype=dtype, device=device)
            return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

        blocks_per_seq = [-(-kv // block_size) for kv in kv_lens]
        max_blocks = max(blocks_per_seq) + extra_blocks  # wider than needed, as a CUDA-graph runner pads it
        num_blocks = sum(blocks_per_seq) + 3
        perm = torch.randperm(num_blocks, generator=generator)
        block_tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int32)
        used = 0
        for i, n in enumerate(blocks_per_seq):
            block_tables[i, :n] = perm[used : used + n].to(torch.int32)
            used += n
        slots = []
        for i, (q, kv) in enumerate(zip(q_lens, kv_lens, strict=True)):
            for pos in range(kv - q, kv):
                slots.append(int(block_tables[i, pos // block_size]) * block_size + pos % block_size)
        q_lens_t = torch.tensor(q_lens, dtype=torch.int32)
        if is_decoding is None:
            is_decoding = all(q == 1 for q in q_lens)
        meta = AttnMetadata(
            is_decoding=is_decoding,
            block_tables=block_tables.to(device),
            q_start_loc=(torch.cumsum(q_lens_t, 0) - q_lens_t).to(torch.int32).to(device),
            q_seqlens=q_lens_t.to(device),
            kv_seqlens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_q_seqlen=max(q_lens),
            max_kv_seqlen=max(kv_lens),
            block_size=block_size,
            q_seqlens_list=list(q_lens),
            kv_seqlens_list=list(kv_lens),
        )
        return {
            "query": randn(sum(q_lens), num_heads, head_dim),
            "k_cache": randn(num_blocks, block_size, num_kv_heads, head_dim),
            "v_cache": randn(num_blocks, block_size, num_kv_heads, v_head_dim),
            "meta": meta,
        }

    return build
