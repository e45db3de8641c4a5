"""The Triton fused-MoE kernel against the cpu reference op computed in float32, plus CUDA-graph capture/replay."""

import pytest
import torch

pytest.importorskip("triton")

from lmforge.backends import cpu as cpu_backend  # noqa: E402
from lmforge.backends import cuda as cuda_backend  # noqa: E402
from lmforge.backends.cpu.moe import fused_moe_grouped  # noqa: E402
from lmforge.kernels.cuda.fused_moe import align_by_expert, align_by_expert_torch, fused_moe  # noqa: E402

from .conftest import INTERPRET, tolerances  # noqa: E402

# the interpreter (TRITON_INTERPRET=1) runs these on CPU tensors too, for debugging without a GPU
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() and not INTERPRET, reason="needs CUDA")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (tokens, hidden, intermediate, experts, top_k): decode- and prefill-sized tiles, ragged N/K tails, top_k 1
SHAPES = [(1, 256, 128, 8, 2), (7, 128, 96, 16, 4), (100, 256, 192, 8, 2), (64, 320, 160, 64, 8), (300, 128, 64, 4, 1)]
LARGE_SHAPES = [(1, 2048, 1408, 64, 6), (512, 2048, 768, 128, 8), (2048, 1024, 704, 8, 2)]


def _inputs(num_tokens, hidden, inter, num_experts, top_k, dtype, device, skew: bool = False) -> dict:
    x = torch.randn(num_tokens, hidden, device=device)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device=device) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, device=device) * inter**-0.5
    logits = torch.randn(num_tokens, num_experts, device=device)
    if skew:  # most tokens to expert 0, several experts with none: long runs, empty runs
        logits[:, 0] += 4.0
        logits[:, num_experts // 2 :] -= 8.0
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return {
        "hidden_states": x.to(dtype),
        "gate_up_weight": gate_up.to(dtype),
        "down_weight": down.to(dtype),
        "topk_weights": weights,
        "topk_ids": ids,
    }


def _reference(inputs: dict, activation: str = "silu") -> torch.Tensor:
    return fused_moe_grouped(
        inputs["hidden_states"].float(),
        inputs["gate_up_weight"].float(),
        inputs["down_weight"].float(),
        inputs["topk_weights"].float(),
        inputs["topk_ids"],
        activation,
    )


def _check_dtype(dtype: torch.dtype) -> None:
    if INTERPRET and not torch.cuda.is_available() and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter mishandles bfloat16")


def _tol(dtype: torch.dtype) -> dict:
    # the kernel rounds the intermediate act(gate) * up to the input dtype before the down projection
    return {torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}.get(dtype, tolerances(dtype))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_moe_matches_reference(device, dtype, shape):
    _check_dtype(dtype)
    inputs = _inputs(*shape, dtype, device)
    out = fused_moe(**inputs)
    assert out.dtype == dtype and out.shape == inputs["hidden_states"].shape
    torch.testing.assert_close(out.float(), _reference(inputs), **_tol(dtype))


@pytest.mark.skipif(INTERPRET and not torch.cuda.is_available(), reason="too slow for the interpreter")
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_moe_model_shapes(device, dtype, shape):
    inputs = _inputs(*shape, dtype, device)
    torch.testing.assert_close(fused_moe(**inputs).float(), _reference(inputs), **_tol(dtype))


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_fused_moe_activations_and_skew(device, activation):
    inputs = _inputs(90, 128, 96, 16, 2, torch.float16, device, skew=True)
    out = cuda_backend.OPS["fused_moe"](**inputs, activation=activation)
    torch.testing.assert_close(out.float(), _reference(inputs, activation), **_tol(torch.float16))


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_by_expert_layout(device, block_m):
    """Each expert's slots form one run starting at a multiple of block_m; every slot appears once."""
    num_experts, top_k = 8, 3
    ids = torch.randn(50, num_experts, device=device).topk(top_k, dim=-1).indices
    sorted_ids = align_by_expert(ids, num_experts, block_m).cpu()
    num_slots = ids.numel()
    assert sorted_ids.numel() == -(-(num_slots + num_experts * (block_m - 1)) // block_m) * block_m
    real = sorted_ids[sorted_ids < num_slots]
    assert sorted(real.tolist()) == list(range(num_slots))
    flat = ids.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=num_experts)
    pos = 0
    for e in range(num_experts):
        run = sorted_ids[pos : pos + int(counts[e])]
        assert (flat[run.long()] == e).all()
        pos += -(-int(counts[e]) // block_m) * block_m
    assert (sorted_ids[pos:] == num_slots).all()


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, block_m", [(1, 128, 8, 16), (64, 128, 8, 16), (100, 16, 4, 64), (7, 4, 1, 32)]
)
def test_align_one_program_matches_torch(device, num_tokens, num_experts, top_k, block_m):
    """The single-program Triton sort of decode-sized routings gives the torch path's layout exactly."""
    ids = torch.randn(num_tokens, num_experts, device=device).topk(top_k, dim=-1).indices
    ids[: num_tokens // 2, 0] = 0  # one crowded expert
    fast = align_by_expert(ids, num_experts, block_m)
    assert torch.equal(fast, align_by_expert_torch(ids, num_experts, block_m))


def test_fused_moe_rejects_bad_arguments(device):
    inputs = _inputs(4, 64, 32, 4, 2, torch.float16, device)
    with pytest.raises(ValueError, match="activation"):
        fused_moe(**inputs, activation="relu")
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe(
            inputs["hidden_states"][:, :32],
            inputs["gate_up_weight"],
            inputs["down_weight"],
            inputs["topk_weights"],
            inputs["topk_ids"],
        )
    empty = {
        **inputs,
        "hidden_states": inputs["hidden_states"][:0],
        "topk_weights": inputs["topk_weights"][:0],
        "topk_ids": inputs["topk_ids"][:0],
    }
    assert fused_moe(**empty).shape == (0, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(8, 64, 6), (33, 8, 2)])
def test_fused_moe_cuda_graph_replay(num_tokens, num_experts, top_k):
    """Captured once, replayed with fresh routing in the same buffers: equals an eager call each time."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    static = _inputs(num_tokens, 256, 192, num_experts, top_k, torch.bfloat16, device)
    op = cuda_backend.OPS["fused_moe"]
    op(**static)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(**static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = op(**static)
    for _ in range(3):
        fresh = _inputs(num_tokens, 256, 192, num_experts, top_k, torch.bfloat16, device)
        for name, tensor in fresh.items():
            static[name].copy_(tensor)
        graph.replay()
        torch.testing.assert_close(static_out, op(**fresh), atol=0, rtol=0)
        torch.testing.assert_close(static_out.float(), _reference(fresh), **_tol(torch.bfloat16))


def test_cpu_reference_is_the_fallback_no_more():
    assert cuda_backend.OPS["fused_moe"] is not cpu_backend.OPS["fused_moe"]
