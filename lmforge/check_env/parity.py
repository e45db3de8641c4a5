"""Parity of lmforge against HF transformers: same checkpoint, same prompts, compare the logits
of prefill and of every decode step (through the real engine: paged cache, batching, preemption)
and the greedy tokens. Used by the test-suite and by `lmforge check_env MODEL --parity`."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from lmforge.messages import GenerationConfig, PytorchEngineConfig


@dataclass(slots=True)
class ParityResult:
    max_abs_diff_per_step: list[float]  # over all sequences, step 0 = prefill
    engine_tokens: list[list[int]]
    hf_tokens: list[list[int]]
    num_preemptions: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max(self.max_abs_diff_per_step, default=0.0)

    @property
    def tokens_equal(self) -> bool:
        return self.engine_tokens == self.hf_tokens

    def table(self) -> str:
        lines = ["step  max|logit diff|"]
        lines += [f"{'prefill' if i == 0 else i:>7}  {d:.3e}" for i, d in enumerate(self.max_abs_diff_per_step)]
        lines.append(f"greedy tokens equal: {self.tokens_equal}  (preemptions: {self.num_preemptions})")
        return "\n".join(lines)


class _LogitsRecorder:
    """Wraps the engine's sampler to keep every sampled row's logits, by request."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.logits: dict[str, list[torch.Tensor]] = defaultdict(list)

    def __call__(self, logits: torch.Tensor, seqs):
        for row, seq in zip(logits, seqs, strict=True):
            self.logits[seq.request_id].append(row.detach().float().cpu().clone())
        return self.sampler(logits, seqs)


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt])
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()


@torch.inference_mode()
def engine_vs_hf(
    model_path: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    hf_model=None,
    backend_config: PytorchEngineConfig | None = None,
    engine=None,
) -> ParityResult:
    """Greedy-generate `prompts` together in the engine and compare with `hf_model` (loaded from
    model_path in float32 when not given)."""
    from lmforge.engine.engine import Engine

    if hf_model is None:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    engine = engine or Engine(model_path, backend_config or PytorchEngineConfig(device_type="cpu", dtype="float32"))
    recorder = _LogitsRecorder(engine.sampler)
    engine.sampler = recorder
    gen = GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True, do_sample=False)
    ids = [engine.add_request(p, gen) for p in prompts]
    seqs = {rid: engine._requests[rid] for rid in ids}
    tokens: dict[str, list[int]] = defaultdict(list)
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    engine.sampler = recorder.sampler
    diffs: list[float] = [0.0] * max_new_tokens
    hf_tokens = []
    device = next(hf_model.parameters()).device
    for rid, prompt in zip(ids, prompts, strict=True):
        full = torch.tensor([prompt + tokens[rid][:-1]], device=device)
        ref = hf_model(input_ids=full).logits[0, len(prompt) - 1 :].float().cpu()
        got = torch.stack(recorder.logits[rid])
        for step in range(min(len(got), len(ref))):
            diffs[step] = max(diffs[step], (got[step] - ref[step]).abs().max().item())
        hf_tokens.append(hf_greedy(hf_model, prompt, max_new_tokens))
    return ParityResult(diffs, [tokens[r] for r in ids], hf_tokens, sum(s.num_preemptions for s in seqs.values()))
