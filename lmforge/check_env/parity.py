"""Parity of lmforge against HF transformers: same checkpoint, same prompts, compare the logits
of prefill and of every decode step (through the real engine: paged cache, batching, preemption)
and the greedy tokens. Used by the test-suite and by `lmforge check_env MODEL --parity`."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmforge.check_env.parity_cli import TOLERANCES
from lmforge.messages import GenerationConfig, PytorchEngineConfig


@dataclass(slots=True)
class ParityResult:
    max_abs_diff_per_step: list[float]  # over all sequences, step 0 = prefill
    engine_tokens: list[list[int]]
    hf_tokens: list[list[int]]
    num_preemptions: int = 0
    notes: list[str] = field(default_factory=list)
    tolerance: float = 1e-4
    # per sequence, where lmforge's and HF's greedy tokens first differ: HF's logit of its own token minus its
    # logit of lmforge's token on the shared context (None: no divergence). Small means a near-tie (low precision)
    divergence_margins: list[float | None] = field(default_factory=list)
    # a sequence whose greedy tokens diverge where HF's margin between the two tokens is below this still passes
    # (0: tokens must agree; a low-precision run passes near-ties, which rounding may flip)
    tie_margin: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max(self.max_abs_diff_per_step, default=0.0)

    @property
    def tokens_equal(self) -> bool:
        return self.engine_tokens == self.hf_tokens

    @property
    def tokens_agree(self) -> bool:
        """Greedy tokens equal, up to divergences at near-ties (HF margin below tie_margin)."""
        return all(
            e == h or (m is not None and m < self.tie_margin)
            for e, h, m in zip(self.engine_tokens, self.hf_tokens, self.divergence_margins, strict=False)
        ) and len(self.engine_tokens) == len(self.hf_tokens)

    @property
    def passed(self) -> bool:
        return self.tokens_agree and self.max_abs_diff <= self.tolerance

    def tokens_agree_at(self, step: int) -> bool:
        """Whether every sequence's greedy token at `step` is the same in lmforge and HF."""
        return all(
            len(e) > step and len(h) > step and e[step] == h[step]
            for e, h in zip(self.engine_tokens, self.hf_tokens, strict=True)
        )

    def table(self) -> str:
        lines = ["   step  max|logit diff|  tokens agree"]
        for i, d in enumerate(self.max_abs_diff_per_step):
            flag = "" if d <= self.tolerance else "  > tolerance"
            lines.append(f"{'prefill' if i == 0 else i:>7}  {d:>15.3e}  {self.tokens_agree_at(i)!s:>12}{flag}")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(
            f"{verdict}: max|diff| {self.max_abs_diff:.3e} (tolerance {self.tolerance:.0e}), greedy tokens equal: "
            f"{self.tokens_equal}, sequences: {len(self.engine_tokens)}, preemptions: {self.num_preemptions}"
        )
        margins = [f"{m:.2e}" if m is not None else "-" for m in self.divergence_margins]
        if any(m is not None for m in self.divergence_margins):
            lines.append(f"HF logit margin where each sequence's tokens first differ: {', '.join(margins)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class EngineRequestError(RuntimeError):
    """Requests failed inside the engine during a parity run; the message is the engine's error."""


class _LogitsRecorder:
    """Wraps the engine's sampler to keep every sampled row's logits, by request."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.logits: dict[str, list[torch.Tensor]] = defaultdict(list)

    def __getattr__(self, name: str):  # the rest of the sampler's interface (row_info, ...) is the sampler's own
        return getattr(self.sampler, name)

    def __call__(self, logits: torch.Tensor, seqs):
        for row, seq in zip(logits, seqs, strict=True):
            self.logits[seq.request_id].append(row.detach().float().cpu().clone())
        return self.sampler(logits, seqs)


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt], device=next(hf_model.parameters()).device)
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
    own_engine = engine is None
    engine = engine or Engine(model_path, backend_config or PytorchEngineConfig(device_type="cpu", dtype="float32"))
    recorder = _LogitsRecorder(engine.sampler)
    engine.sampler = recorder
    gen = GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True, do_sample=False)
    try:
        ids = [engine.add_request(p, gen) for p in prompts]
        seqs = {rid: engine._requests[rid] for rid in ids}
        tokens: dict[str, list[int]] = defaultdict(list)
        errors: dict[str, str] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id].extend(out.token_ids)
                if out.finish_reason == "error":
                    errors[out.request_id] = out.error
        if errors:  # the engine's own cause, not whatever the comparison of missing logits would raise
            first = next(iter(errors.values()))
            raise EngineRequestError(f"the engine failed {len(errors)} of {len(ids)} requests: {first}")
    finally:
        engine.sampler = recorder.sampler
        if own_engine:
            engine.close()  # tensor-parallel workers
    diffs: list[float] = [0.0] * max_new_tokens
    hf_tokens, notes, margins = [], [], []
    device = next(hf_model.parameters()).device
    for i, (rid, prompt) in enumerate(zip(ids, prompts, strict=True)):
        full = torch.tensor([prompt + tokens[rid][:-1]], device=device)
        ref = hf_model(input_ids=full).logits[0, len(prompt) - 1 :].float().cpu()
        got = torch.stack(recorder.logits[rid])
        if len(got) != len(ref):  # rows and tokens out of step: the comparison itself would be wrong
            notes.append(f"sequence {i}: {len(got)} sampled logits rows for {len(ref)} tokens")
            diffs[0] = math.inf
        for step in range(min(len(got), len(ref))):
            diff = (got[step] - ref[step]).abs().max().item()
            diffs[step] = max(diffs[step], math.inf if math.isnan(diff) else diff)  # a NaN must fail, not vanish
        hf_tokens.append(hf_greedy(hf_model, prompt, max_new_tokens))
        step = next((j for j, (a, b) in enumerate(zip(tokens[rid], hf_tokens[-1], strict=False)) if a != b), None)
        margins.append(None if step is None else (ref[step, hf_tokens[-1][step]] - ref[step, tokens[rid][step]]).item())
    num_preemptions = sum(s.num_preemptions for s in seqs.values())
    return ParityResult(diffs, [tokens[r] for r in ids], hf_tokens, num_preemptions, notes, divergence_margins=margins)


# --- tiny random models of any family ------------------------------------------------------------------------

_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# sizes a family needs beyond _TINY (always applied, also over a real model's config)
_TINY_SIZES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        head_dim=16,  # HF's rotary reads head_dim: the rope part of each head
    ),
}
# the family's distinctive features, switched on when there is no real config to copy them from; a sliding
# window of 8 is shorter than the test prompts, so the window really cuts
_TINY_FEATURES: dict[str, dict] = {
    "mistral": dict(sliding_window=8),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None),
    "qwen3_moe": dict(norm_topk_prob=True),
    "gemma2": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "cohere": dict(use_qk_norm=True),  # Command R+'s per-head q/k LayerNorms
    "granite": dict(embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.125, logits_scaling=4.0),
}
_DROPPED_KEYS = (
    "architectures",
    "auto_map",
    "quantization_config",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "id2label",
    "label2id",
    "model_type",
    "use_bidirectional_attention",
)


def _config_fields(model_type: str) -> set[str]:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    return set(config.to_dict()) | set(getattr(config, "attribute_map", {}))


def _tiny_layer_types(layer_types: list[str], num_layers: int) -> list[str]:
    kinds = list(dict.fromkeys(layer_types))  # each kind once, in order of appearance
    return [kinds[i % len(kinds)] for i in range(num_layers)]


def _tiny_rope(rope: dict, head_dim: int) -> dict:
    rope = dict(rope)
    if rope.get("rope_type", rope.get("type")) == "longrope":
        half = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
        rope["short_factor"] = [1.0 + 0.05 * i for i in range(half)]
        rope["long_factor"] = [1.0 + 0.5 * i for i in range(half)]
    if rope.get("original_max_position_embeddings", 0) > 128:
        rope["original_max_position_embeddings"] = 128
    return rope


def tiny_hf_config(model_type: str, base=None, **overrides):
    """A tiny HF config of `model_type` (2 layers, hidden 64, 4 heads, 2 KV heads, vocab 256).

    With `base` (a real model's PretrainedConfig or dict), its switches are kept (biases, tied embeddings, rope
    scaling, soft-capping, sliding windows, layer types) and only the sizes shrink; without it the family's
    distinctive features are switched on. `overrides` are applied last."""
    from transformers import AutoConfig

    if base is None:  # a multimodal type ('gemma3') stands for its language model ('gemma3_text')
        model_type = AutoConfig.for_model(model_type).get_text_config().model_type
    elif not isinstance(base, dict):
        base = base.get_text_config() if hasattr(base, "get_text_config") else base
        model_type = getattr(base, "model_type", model_type)
        base = base.to_dict()
    d = {k: v for k, v in (base or {}).items() if k not in _DROPPED_KEYS and not isinstance(v, type(None))}
    # shrink only the fields this family's config has (under its own or an aliased name): a field it lacks,
    # e.g. num_key_value_heads of a multi-head-only family, HF would ignore while a config builder trusts it
    known = _config_fields(model_type)
    d.update({k: v for k, v in _TINY.items() if k in known or k.endswith("_token_id")})
    d.update(_TINY_SIZES.get(model_type, {}))
    if "head_dim" in d and model_type not in _TINY_SIZES:
        d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    if "query_pre_attn_scalar" in d or model_type in ("gemma2", "gemma3_text"):
        d["query_pre_attn_scalar"] = d.setdefault("head_dim", 16)
    if base is None:
        d.update(_TINY_FEATURES.get(model_type, {}))
    else:
        if d.get("sliding_window"):
            d["sliding_window"] = 8
        if d.get("layer_types"):
            d["layer_types"] = _tiny_layer_types(d["layer_types"], d["num_hidden_layers"])
        if d.get("max_window_layers") is not None:
            d["max_window_layers"] = 1
        if isinstance(d.get("mlp_only_layers"), list):
            d["mlp_only_layers"] = []
    head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type
            d[key] = {kind: _tiny_rope(r, head_dim) for kind, r in rope.items()}
        elif isinstance(rope, dict):
            d[key] = _tiny_rope(rope, head_dim)
    if d.get("original_max_position_embeddings", 0) > 128:
        d["original_max_position_embeddings"] = 128
    d.update(overrides)
    d = {k: v for k, v in d.items() if v is not None or k in overrides}
    return AutoConfig.for_model(model_type, **d)


def build_tiny_model(hf_config, seed: int = 0):
    """HF's own implementation of `hf_config` with random float32 weights. HF initialises norms (and DeepSeek's
    routing bias) to constants, so every tensor of the state dict is perturbed: a wrong name mapping shows."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except ValueError as e:
        raise ValueError(
            f"HF transformers has no causal-LM implementation of model_type {hf_config.model_type!r} to compare "
            f"against: {e}"
        ) from e
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.02)
    return model.eval()


def save_tiny_model(model, path: str, architecture: str | None = None) -> None:
    """save_pretrained as safetensors; `architecture` replaces HF's class name in config.json, so the engine
    resolves the class a real checkpoint of that architecture would (custom_module_map entries included)."""
    model.save_pretrained(path)
    if architecture:
        config_file = os.path.join(path, "config.json")
        with open(config_file) as f:
            config = json.load(f)
        config["architectures"] = [architecture]
        with open(config_file, "w") as f:
            json.dump(config, f, indent=2)


def run_parity(
    model_path_or_type: str,
    prompt_lengths: Sequence[int] = (5, 17, 9, 30),
    max_new_tokens: int = 6,
    custom_module_map: str | None = None,
    num_cpu_blocks: int = 256,
    max_prefill_token_num: int = 8192,
    overrides: dict | None = None,
    seed: int = 0,
    tolerance: float | None = None,
    trust_remote_code: bool = False,
    device_type: str = "cpu",
    dtype: str = "float32",
    engine_config: dict | None = None,
) -> ParityResult:
    """Parity of lmforge with HF transformers on a tiny random model of the family of `model_path_or_type`
    (a model folder / .gguf file, whose config switches are kept, or a model_type such as 'qwen3').

    The tiny model is saved as safetensors and loaded by the engine through the model's own load_weights.
    The reference is fp32 on the CPU backend; with dtype 'bfloat16' / 'float16' HF runs in that dtype too
    (loaded with from_pretrained, so modules HF keeps in fp32 stay so) on `device_type`. num_cpu_blocks sizes
    the cache on either device; `engine_config` sets other PytorchEngineConfig fields. `PREEMPTION` holds
    settings under which sequences are preempted. tolerance defaults to TOLERANCES[dtype]; below float32 a greedy
    divergence at a near-tie (HF margin under the tolerance) still passes. Requests that fail inside the engine
    raise EngineRequestError with the engine's cause."""
    import random

    architecture, base = None, None
    if os.path.exists(model_path_or_type):
        from lmforge.model_source import load_hf_config

        base = load_hf_config(model_path_or_type, trust_remote_code)
        architecture = (getattr(base, "architectures", None) or [None])[0]
        model_type = base.model_type
    else:
        model_type = model_path_or_type
    hf_config = tiny_hf_config(model_type, base, **(overrides or {}))
    hf_model = build_tiny_model(hf_config, seed)
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, hf_config.vocab_size) for _ in range(n)] for n in prompt_lengths]
    blocks = {"num_gpu_blocks" if device_type == "cuda" else "num_cpu_blocks": num_cpu_blocks}
    settings = dict(block_size=4, max_prefill_token_num=max_prefill_token_num, **blocks)
    settings.update(engine_config or {})
    backend_config = PytorchEngineConfig(
        device_type=device_type, dtype=dtype, custom_module_map=custom_module_map, **settings
    )
    # a tiny model's ops take microseconds: thread hand-offs cost more than they save, and far more on a busy host
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="lmforge_parity_") as path:
            save_tiny_model(hf_model, path, architecture)
            if dtype != "float32" or device_type != "cpu":
                from transformers import AutoModelForCausalLM

                hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device_type)
            result = engine_vs_hf(path, prompts, max_new_tokens, hf_model=hf_model, backend_config=backend_config)
    finally:
        torch.set_num_threads(num_threads)
    result.tolerance = TOLERANCES.get(dtype, 1e-4) if tolerance is None else tolerance
    if dtype != "float32":
        result.tie_margin = result.tolerance
    result.notes.append(f"tiny {model_type} ({type(hf_model).__name__} vs {architecture or 'MODULE_MAP entry'})")
    return result


# five prompts that outgrow 24 blocks of 4 tokens while decoding 12 tokens, so the newest sequences are preempted
# and recomputed; an 8-token prefill budget splits every prompt into chunks
PREEMPTION = dict(prompt_lengths=(7, 13, 21, 11, 25), max_new_tokens=12, num_cpu_blocks=24, max_prefill_token_num=8)
