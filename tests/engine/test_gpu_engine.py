"""The engine on CUDA (skipped without a GPU): bf16 parity of Llama with HF transformers, CUDA graphs vs
eager, overlapped vs synchronous steps, and preemption under a small cache."""

from __future__ import annotations

import pytest
import torch

from lmforge.messages import GenerationConfig, PytorchEngineConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A real-shaped (head_dim 128, GQA 4) random Llama in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("gpu_llama"))
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def _prompts(n: int, vocab: int = 4096) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = [5, 37, 64, 129, 300, 17, 80, 8][:n]
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


def _generate(engine, prompts, steps=24, logprobs=None):
    """Greedy tokens per prompt; with logprobs=k, also each step's log-probabilities (top k) per prompt."""
    gen = GenerationConfig(max_new_tokens=steps, ignore_eos=True, logprobs=logprobs)
    ids = [engine.add_request(p, gen) for p in prompts]
    toks = {i: [] for i in ids}
    lps = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            toks[out.request_id] += out.token_ids
            lps[out.request_id] += out.logprobs or []
    if logprobs:
        return [toks[i] for i in ids], [lps[i] for i in ids]
    return [toks[i] for i in ids]


# bf16 logits of this model move by up to ~0.04 between kernels that round differently (test_bf16_parity_with_hf
# measures ~0.035 against HF): two greedy runs may part only where the reference's top-2 margin is below this
TIE = 0.1


def _first_divergences(got, ref, ref_logprobs):
    """(sequence, step, the reference's top-2 log-probability margin there) where each pair of runs first differs."""
    out = []
    for n, (g, r, lps) in enumerate(zip(got, ref, ref_logprobs, strict=True)):
        assert len(g) == len(r), (n, len(g), len(r))
        step = next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), None)
        if step is not None:
            top = lps[step].top
            out.append((n, step, top[0][1] - top[1][1]))
    return out


def test_bf16_parity_with_hf(llama_dir):
    """Logits within bf16 tolerance at every step; greedy tokens equal HF while the margin is clear."""
    from transformers import AutoModelForCausalLM

    from lmforge.check_env.parity import engine_vs_hf

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).cuda().eval()
    res = engine_vs_hf(
        llama_dir,
        _prompts(6),
        12,
        hf_model=hf,
        backend_config=PytorchEngineConfig(device_type="cuda", dtype="bfloat16", block_size=16, num_gpu_blocks=512),
    )
    print(res.table())
    # bf16 with different (fused) kernels: logits agree to a few bf16 ulps of their magnitude (~|logit| <= 8)
    assert res.max_abs_diff < 0.25, res.table()
    # greedy tokens equal HF's except where a sequence first parts from HF at a near-tie: HF's margin between its
    # token and lmforge's there is within twice the largest logit difference (each logit may move by it)
    res.tie_margin = 2 * res.max_abs_diff
    assert res.tokens_agree, res.table()


def test_cuda_graphs_overlap_and_preemption_give_identical_tokens(llama_dir):
    from lmforge.engine.engine import Engine

    prompts = _prompts(8)
    base = dict(device_type="cuda", dtype="bfloat16", block_size=16)
    eager = Engine(llama_dir, PytorchEngineConfig(**base, eager_mode=True, num_gpu_blocks=512))
    eager.overlap = False
    ref, ref_logprobs = _generate(eager, prompts, logprobs=2)
    del eager
    graphs = Engine(llama_dir, PytorchEngineConfig(**base, num_gpu_blocks=512))
    assert graphs.graph_runner is not None and graphs.graph_runner.graphs
    assert _generate(graphs, prompts) == ref  # graphs + overlapped steps
    del graphs
    small = Engine(llama_dir, PytorchEngineConfig(**base, num_gpu_blocks=48, max_prefill_token_num=128))
    got = _generate(small, prompts)  # preemption + chunked prefill on the GPU
    assert small.scheduler.num_preemptions > 0
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks
    # recomputed keys come from the prefill kernel instead of the decode path and chunked prefill splits the
    # matmuls differently, so bf16 rounding differs: a sequence may part from the eager run only at a near-tie
    parted = _first_divergences(got, ref, ref_logprobs)
    print("first divergences (sequence, step, eager top-2 margin):", parted)
    assert all(margin < TIE for _, _, margin in parted), parted


def test_support_cuda_graph_false_runs_eagerly(llama_dir, monkeypatch):
    from lmforge.engine.engine import Engine
    from lmforge.models.llama import LlamaForCausalLM

    calls = []

    def never(**inputs):
        calls.append(inputs["attn_metadata"].num_seqs)
        return False

    monkeypatch.setattr(LlamaForCausalLM, "support_cuda_graph", staticmethod(never))
    engine = Engine(llama_dir, PytorchEngineConfig(device_type="cuda", dtype="bfloat16", num_gpu_blocks=256))
    replays = []
    for graph in engine.graph_runner.graphs.values():
        original = graph.replay
        graph.replay = lambda original=original: replays.append(1) or original()
    out = _generate(engine, _prompts(3), steps=6)
    assert calls and not replays and all(len(t) == 6 for t in out)
