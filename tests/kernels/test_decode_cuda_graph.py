"""The decode path of the cuda paged_attention op captured in a CUDA graph and replayed with new data in the
same buffers must give exactly what an eager call gives: no host syncs, no grid sized from kv lengths."""

import pytest
import torch

pytest.importorskip("triton")

from lmforge.backends import cpu as cpu_backend  # noqa: E402
from lmforge.backends import cuda as cuda_backend  # noqa: E402
from lmforge.model_inputs import AttnMetadata, AttnOptions  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")]

NUM_SEQS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, MAX_BLOCKS = 8, 16, 4, 128, 16, 12


def _random_inputs(device: torch.device) -> dict:
    """Fresh values with fixed shapes: each sequence owns MAX_BLOCKS shuffled blocks, any length up to them."""
    num_blocks = NUM_SEQS * MAX_BLOCKS
    kv_lens = torch.randint(1, MAX_BLOCKS * BLOCK_SIZE + 1, (NUM_SEQS,), dtype=torch.int32)
    return {
        "query": torch.randn(NUM_SEQS, NUM_HEADS, HEAD_DIM, device=device).bfloat16(),
        "k_cache": torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=device).bfloat16(),
        "v_cache": torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=device).bfloat16(),
        "block_tables": torch.randperm(num_blocks).int().view(NUM_SEQS, MAX_BLOCKS).to(device),
        "kv_seqlens": kv_lens.to(device),
    }


def _metadata(inputs: dict) -> AttnMetadata:
    device, kv_lens = inputs["query"].device, inputs["kv_seqlens"].tolist()
    ones = torch.ones(NUM_SEQS, dtype=torch.int32, device=device)
    return AttnMetadata(
        is_decoding=True,
        block_tables=inputs["block_tables"],
        q_start_loc=torch.arange(NUM_SEQS, dtype=torch.int32, device=device),
        q_seqlens=ones,
        kv_seqlens=inputs["kv_seqlens"],
        slot_mapping=torch.zeros(NUM_SEQS, dtype=torch.int64),
        max_q_seqlen=1,
        max_kv_seqlen=MAX_BLOCKS * BLOCK_SIZE,
        block_size=BLOCK_SIZE,
        q_seqlens_list=[1] * NUM_SEQS,
        kv_seqlens_list=kv_lens,
    )


@pytest.mark.parametrize("window,softcap", [(None, None), (48, 2.0)])
def test_decode_attention_cuda_graph_replay(window, softcap):
    torch.manual_seed(0)
    device = torch.device("cuda")
    op = cuda_backend.OPS["paged_attention"]
    static = _random_inputs(device)
    static_meta = _metadata(static)

    def step() -> torch.Tensor:
        return op(static["query"], static["k_cache"], static["v_cache"], static_meta, AttnOptions(0.1, window, softcap))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()

    for _ in range(3):
        fresh = _random_inputs(device)
        for name, tensor in fresh.items():
            static[name].copy_(tensor)
        graph.replay()
        opts = AttnOptions(0.1, window, softcap)
        eager = op(fresh["query"], fresh["k_cache"], fresh["v_cache"], _metadata(fresh), opts)
        torch.cuda.synchronize()
        assert torch.equal(graph_out, eager)
        meta = _metadata(fresh)
        ref = cpu_backend.paged_attention(
            fresh["query"].float(),
            fresh["k_cache"].float(),
            fresh["v_cache"].float(),
            meta,
            AttnOptions(0.1, window, softcap),
        )
        torch.testing.assert_close(graph_out.float(), ref, atol=2e-2, rtol=2e-2)

    static["kv_seqlens"][0] = 0  # a padding row of a graph batch: no keys, so zeros and no NaN
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_out[0], torch.zeros_like(graph_out[0]))
    assert not graph_out.isnan().any()


def test_fill_kv_and_attend_cuda_graph_replay():
    """The fused decode step (this step's keys/values written by the attention kernel, splits combined in the same
    launch) replayed with new data: the cache and the output match fill_kv_cache + attention in float32."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    op = cuda_backend.OPS["fill_kv_and_attend"]
    static = _random_inputs(device)
    static["kv_seqlens"].clamp_(min=1)
    static["key"] = torch.randn(NUM_SEQS, NUM_KV_HEADS, HEAD_DIM, device=device).bfloat16()
    static["value"] = torch.randn_like(static["key"])

    def slots(inputs: dict) -> torch.Tensor:
        pos = inputs["kv_seqlens"].long() - 1
        blocks = inputs["block_tables"].long().gather(1, (pos // BLOCK_SIZE)[:, None])[:, 0]
        return blocks * BLOCK_SIZE + pos % BLOCK_SIZE

    static_meta = _metadata(static)
    static_meta.slot_mapping = slots(static)

    def step() -> torch.Tensor:
        args = (static["key"], static["value"], static["k_cache"], static["v_cache"])
        return op(static["query"], *args, static_meta, AttnOptions(0.1))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()

    for _ in range(3):
        fresh = _random_inputs(device)
        fresh["kv_seqlens"].clamp_(min=1)
        fresh["key"] = torch.randn_like(static["key"])
        fresh["value"] = torch.randn_like(static["key"])
        for name, tensor in fresh.items():
            static[name].copy_(tensor)
        static_meta.slot_mapping.copy_(slots(fresh))
        graph.replay()
        torch.cuda.synchronize()
        meta = _metadata(fresh)
        meta.slot_mapping = slots(fresh)
        k_ref, v_ref = fresh["k_cache"].clone(), fresh["v_cache"].clone()
        cpu_backend.fill_kv_cache(fresh["key"], fresh["value"], k_ref, v_ref, meta.slot_mapping)
        assert torch.equal(static["k_cache"], k_ref) and torch.equal(static["v_cache"], v_ref)
        ref = cpu_backend.paged_attention(fresh["query"].float(), k_ref.float(), v_ref.float(), meta, AttnOptions(0.1))
        torch.testing.assert_close(graph_out.float(), ref, atol=2e-2, rtol=2e-2)
