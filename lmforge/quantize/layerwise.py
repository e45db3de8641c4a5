"""`quantize_model`: load a dense model (HF folder or GGUF) as an HF transformers model on the host, then
quantize it one decoder layer at a time: the layer moves to the device, runs the calibration activations it
receives from the layer before (already quantized), is quantized (RTN, GPTQ, AWQ, FP8 or int8), and passes its
quantized outputs on. Only one layer and the activations live on the device, so an 8B model fits anywhere.

The result goes to quantize/writer.py, which writes the checkpoint in its method's standard format.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from lmforge.quantize import awq as awq_lib
from lmforge.quantize import writer
from lmforge.quantize.calib import builtin_text, encode_prefix, token_blocks
from lmforge.quantize.gptq import HessianAccumulator, gptq_quantize
from lmforge.quantize.qparams import IntWeight, QuantSpec, fp8_quantize, int8_quantize, rtn_quantize

logger = logging.getLogger(__name__)

METHODS = ("awq", "gptq", "rtn", "fp8", "w8a8")
_CALIBRATED = ("awq", "gptq")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


@dataclass(slots=True)
class QuantizeOptions:
    method: str
    bits: int = 4
    group_size: int = 128
    sym: bool | None = None  # None: the method's default (GPTQ/RTN symmetric, AWQ asymmetric)
    desc_act: bool = False  # GPTQ act-order
    damp: float = 0.01  # GPTQ dampening, a fraction of mean(diag H)
    awq_clip: bool = True  # AWQ's clipping search
    awq_search_samples: int | None = None  # calibration sequences AWQ's grid scores (None: all; mean|x| uses all)
    calib_samples: int = 128
    calib_random_ids: bool = False  # seeded random token ids instead of the text: random-weight models, no tokenizer
    calib_seq_len: int = 512
    device: str = "cpu"
    dtype: torch.dtype | None = None  # unquantized tensors in the output; None: the source's fp16/bf16, else bf16
    max_shard_bytes: int = 5 * 10**9
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "awq" and self.bits != 4:
            raise ValueError("AutoAWQ's gemm layout holds 4-bit weights only; use --bits 4 with --method awq")
        if self.method == "awq" and self.sym:
            raise ValueError("AWQ's gemm format stores zero points; --sym does not apply to --method awq")
        if self.method in ("fp8", "w8a8") and (self.bits, self.group_size, self.desc_act) != (4, 128, False):
            logger.info("--bits / --group-size / --desc-act do not apply to %s (8-bit, per channel)", self.method)
        if self.method != "gptq" and self.desc_act:
            raise ValueError("--desc-act (act-order) is a GPTQ option; use it with --method gptq")

    def spec(self) -> QuantSpec:
        sym = (self.method != "awq") if self.sym is None else self.sym
        return QuantSpec(self.bits, self.group_size, sym, min_zero=int(self.method in ("gptq", "rtn") and not sym))


def _out_dtype(opts: QuantizeOptions, hf_config) -> torch.dtype:
    if opts.dtype is not None:
        return opts.dtype
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return stored if stored in (torch.float16, torch.bfloat16) else torch.bfloat16


def load_dense_model(source, dtype: torch.dtype) -> nn.Module:
    """The HF transformers model of `source` on the host in `dtype`; a GGUF file's weights come dequantized
    through lmforge's own GGUF reader."""
    from transformers import AutoModelForCausalLM

    if getattr(source.hf_config, "quantization_config", None):
        raise ValueError(
            f"{source.path} is already quantized ({source.hf_config.quantization_config.get('quant_method')}); "
            "quantize the dense (fp16/bf16/fp32) model instead"
        )
    if any(getattr(source.hf_config, k, None) for k in _MOE_KEYS):
        raise ValueError(
            f"{source.name} is a mixture-of-experts model; lmforge quantize handles dense decoder models only "
            "(its experts are not nn.Linear layers it could calibrate)"
        )
    if source.gguf_file is None:
        return AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, local_files_only=True).eval()
    from lmforge.weights.files import iter_weights

    model = AutoModelForCausalLM.from_config(source.hf_config, dtype=dtype).eval()
    state = dict(iter_weights(source.gguf_file, dtype=dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(source.hf_config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{source.gguf_file}: weights do not match the HF model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")  # fmt: skip
    model.tie_weights()
    return model


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0: records its input and keyword arguments, then stops the forward."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict = {}

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append(hidden_states)
        self.kwargs = kwargs
        raise _Captured


@torch.no_grad()
def _capture_inputs(model, layers, samples: torch.Tensor, device: torch.device):
    """Layer 0's inputs (one [1, L, hidden] per sample) and its keyword arguments (the same for every sample:
    rotary cos/sin, causal mask), computed on `device` with everything but the decoder layers moved there."""
    for module in model.modules():  # embeddings, rotary, norm: whatever is not inside a decoder layer
        if module is not layers and not any(module is m for m in layers.modules()):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(device)
            for name, b in module.named_buffers(recurse=False):
                module._buffers[name] = b.to(device)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        for row in samples:
            try:
                model(input_ids=row.view(1, -1).to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        layers[0] = catcher.layer
    return catcher.inputs, catcher.kwargs


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _record_inputs(modules: dict[str, nn.Module], names: list[str], store: dict[str, list[torch.Tensor]]):
    """Forward pre-hooks that append each named module's input to store[name]; returns the handles."""

    def hook(name):
        return lambda module, args: store.setdefault(name, []).append(args[0].detach())

    return [modules[n].register_forward_pre_hook(hook(n)) for n in names]


def _set_weight(linear: nn.Linear, w: torch.Tensor) -> None:
    linear.weight.data.copy_(w.to(linear.weight.dtype))


class LayerQuantizer:
    """Quantizes one decoder layer in place (its weights become the dequantized quantized ones) and returns the
    quantized linears by their name inside the layer."""

    def __init__(self, opts: QuantizeOptions, kwargs: dict, scale_dtype: torch.dtype):
        """scale_dtype: of the FP8 / int8 weight scales (llmcompressor keeps them in the model's dtype)."""
        self.opts, self.spec, self.kwargs, self.scale_dtype = opts, opts.spec(), kwargs, scale_dtype

    def run_layer(self, layer, inputs):
        return [_first(layer(x, **self.kwargs)) for x in inputs]

    def __call__(self, layer: nn.Module, inputs: list[torch.Tensor]) -> dict[str, object]:
        method = self.opts.method
        linears = _linears(layer)
        if method == "fp8" or method == "w8a8":
            fn = fp8_quantize if method == "fp8" else int8_quantize
            return {name: fn(m.weight.data, self.scale_dtype) for name, m in linears.items()}
        if method == "rtn":
            return {name: self._rtn(m) for name, m in linears.items()}
        if method == "gptq":
            return self._gptq(layer, linears, inputs)
        return self._awq(layer, linears, inputs)

    def _rtn(self, m: nn.Linear) -> IntWeight:
        result = rtn_quantize(m.weight.data, self.spec)
        _set_weight(m, result.dequantize())
        return result

    def _input_groups(self, layer, linears, inputs) -> list[list[str]]:
        """Linears that read the same tensor (q/k/v, gate/up), in the order the forward reaches them."""
        seen: dict[int, list[str]] = {}
        alive: list[torch.Tensor] = []  # held so that no two inputs of the forward share an id()

        def hook(name):
            def record(module, args):
                alive.append(args[0])
                names = seen.setdefault(id(args[0]), [])
                if name not in names:
                    names.append(name)

            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
        try:
            self.run_layer(layer, inputs[:1])
        finally:
            for h in handles:
                h.remove()
        return list(seen.values())

    def _gptq(self, layer, linears, inputs) -> dict[str, IntWeight]:
        results = {}
        for group in self._input_groups(layer, linears, inputs):  # true-sequential: later groups see quantized ones
            acc = {n: HessianAccumulator(linears[n].in_features, linears[n].weight.device) for n in group}

            pending: set[str] = set()

            def add(name, args, acc=acc, pending=pending):
                acc[name].add(args[0])
                pending.discard(name)
                if not pending:  # the group has this sample's input: the rest of the layer is not needed
                    raise _Captured

            handles = [linears[n].register_forward_pre_hook(lambda m, a, n=n: add(n, a)) for n in group]
            try:
                for x in inputs:
                    pending.update(group)
                    try:
                        self.run_layer(layer, [x])
                    except _Captured:
                        pass
            finally:
                for h in handles:
                    h.remove()
            for n in group:
                result = gptq_quantize(linears[n].weight.data, acc[n].h, self.spec, self.opts.damp, self.opts.desc_act)
                _set_weight(linears[n], result.dequantize())
                results[n] = result
            del acc
        return results

    def _awq(self, layer, linears, inputs) -> dict[str, IntWeight]:
        modules = dict(layer.named_modules())
        groups = awq_lib.scale_groups(layer)
        store: dict[str, list[torch.Tensor]] = {}
        handles = _record_inputs(modules, [g.linears[0] for g in groups], store)
        try:
            self.run_layer(layer, inputs)
        finally:
            for h in handles:
                h.remove()

        def run(module, x):
            return module(x, **self.kwargs) if module is modules["self_attn"] else module(x)

        # every group's scales are searched on the original layer, then all are folded in (as AutoAWQ does)
        k = self.opts.awq_search_samples
        scales = [
            awq_lib.search_scales(modules, g, store[g.linears[0]][:k], run, self.spec, stat_inputs=store[g.linears[0]])
            for g in groups
        ]
        for g, s in zip(groups, scales, strict=True):
            awq_lib.apply_scales(modules, g, s)
        del store
        if self.opts.awq_clip:
            store = {}
            names = [n for n in linears if not n.endswith(("q_proj", "k_proj"))]  # q/k errors are not additive
            handles = _record_inputs(modules, names, store)
            try:
                self.run_layer(layer, inputs)
            finally:
                for h in handles:
                    h.remove()
            for n in names:
                x = torch.cat([t.reshape(-1, t.shape[-1]) for t in store.pop(n)])
                x = x[:: max(1, x.shape[0] // 512)][:512]  # AutoAWQ's 512 sampled tokens
                awq_lib.apply_clip(linears[n].weight.data, awq_lib.search_clip(linears[n].weight.data, x, self.spec),
                                   self.spec)  # fmt: skip
        return {name: self._rtn(m) for name, m in linears.items()}


def calibration_samples(tokenizer, num_samples: int, seq_len: int) -> torch.Tensor:
    """[num_samples, seq_len] consecutive token blocks from the start of the built-in calibration text."""
    ids = encode_prefix(tokenizer, builtin_text("calibration"), num_samples * seq_len)
    return token_blocks(ids, num_samples, seq_len)


def quantize_model(model_path: str | None, out_dir: str, opts: QuantizeOptions) -> dict:
    """Quantize `model_path` (None: the embedded default) into `out_dir`; returns a summary dict."""
    from lmforge.model_source import load_model_source, load_tokenizer

    # transformers' own config: an HF model is built from it (AutoModelForCausalLM.from_config)
    source = load_model_source(model_path, with_tokenizer=False, with_transformers=True)
    needs_text = opts.method in _CALIBRATED and not opts.calib_random_ids
    try:
        source.tokenizer = load_tokenizer(source.path, source.model_config.eos_token_ids)
    except (OSError, ValueError) as e:
        if needs_text:
            raise
        logger.warning("%s: no usable tokenizer (%s); the checkpoint is written without one", source.path, e)
    out_dtype = _out_dtype(opts, source.hf_config)
    device = torch.device(opts.device)
    spec = opts.spec()
    # calibration runs in fp32 on the host (exact, and bf16 matmuls are slow there), in the output dtype on GPUs
    compute_dtype = torch.float32 if device.type == "cpu" else out_dtype
    model = load_dense_model(source, compute_dtype)
    layers_name, layers = _decoder_layers(model)
    if opts.method not in ("fp8", "w8a8"):
        _check_shapes(layers_name, layers, spec)  # before minutes of calibration

    inputs, kwargs = [], {}
    if opts.method in _CALIBRATED:
        if opts.calib_random_ids:
            gen = torch.Generator().manual_seed(0)
            vocab = source.hf_config.vocab_size
            samples = torch.randint(0, vocab, (opts.calib_samples, opts.calib_seq_len), generator=gen)
        elif source.tokenizer is None:
            raise ValueError(
                f"{source.path} has no tokenizer to encode the calibration text with; add its tokenizer files, or "
                "pass --calib-random-ids for a random-weight (benchmark) model"
            )
        else:
            samples = calibration_samples(source.tokenizer, opts.calib_samples, opts.calib_seq_len)
        inputs, kwargs = _capture_inputs(model, layers, samples, device)
    quantizer = LayerQuantizer(opts, kwargs, out_dtype)
    results: dict[str, object] = {}
    bar = tqdm(range(len(layers)), desc=f"{opts.method} layers", unit="layer",
               disable=not opts.progress or not sys.stderr.isatty())  # fmt: skip
    start = time.monotonic()
    with torch.no_grad():
        for i in bar:
            layer = layers[i].to(device)
            for name, result in quantizer(layer, inputs).items():
                results[f"{layers_name}.{i}.{name}"] = _to_cpu(result)
            if inputs:
                inputs = quantizer.run_layer(layer, inputs)  # the quantized layer's outputs feed the next one
            layers[i] = layer.to("cpu")
            logger.info("%s: layer %d/%d done, %.0f s", opts.method, i + 1, len(layers), time.monotonic() - start)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    tensors, qconfig = _format_tensors(model, results, opts, out_dtype)
    os.makedirs(out_dir, exist_ok=True)
    files = writer.save_safetensors(tensors, out_dir, opts.max_shard_bytes)
    config = _source_config_dict(source)
    writer.write_config(config, qconfig, out_dtype, out_dir)
    writer.copy_side_files(None if source.gguf_file else source.path, source.tokenizer, source.hf_config, out_dir)
    eight_bit = opts.method in ("fp8", "w8a8")
    return {
        "model": source.name,
        "out": out_dir,
        "method": opts.method,
        "bits": 8 if eight_bit else spec.bits,
        "group_size": -1 if eight_bit else opts.group_size,
        "layers_quantized": len(results),
        "files": files,
    }


def _check_shapes(layers_name: str, layers: nn.ModuleList, spec: QuantSpec) -> None:
    linears = {f"{layers_name}.{i}.{n}": m for i, layer in enumerate(layers) for n, m in _linears(layer).items()}
    sizes = math.gcd(*(m.in_features for m in linears.values()))
    for name, m in linears.items():
        if spec.group_size != -1 and m.in_features % spec.group_size:
            fits = [g for g in (128, 64, 32) if sizes % g == 0]
            hint = f"--group-size {fits[0]}" if fits else "--group-size -1 (per channel)"
            raise ValueError(
                f"{name}: group size {spec.group_size} does not divide its {m.in_features} input features (the "
                f"formats need whole groups); use {hint}, which divides every layer of this model"
            )
        if m.out_features % (32 // spec.bits):
            raise ValueError(f"{name}: {m.out_features} outputs do not pack {32 // spec.bits} to an int32 word")


def _to_cpu(result):
    if isinstance(result, IntWeight):
        return IntWeight(result.q.cpu(), result.scales.cpu(), result.zeros.cpu(), result.g_idx.cpu(), result.spec)
    return tuple(t.cpu() for t in result)


def _source_config_dict(source) -> dict:
    import json

    if source.gguf_file is None:
        with open(os.path.join(source.path, "config.json")) as f:
            return json.load(f)
    return source.hf_config.to_dict()


def _format_tensors(model, results: dict[str, object], opts: QuantizeOptions, out_dtype: torch.dtype):
    """The checkpoint's tensors in its format, and its quantization_config."""
    spec = opts.spec()
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        prefix = name.rsplit(".", 1)[0]
        if prefix in results and name.endswith(".weight"):
            continue
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = t.to(torch.float16 if opts.method == "awq" and prefix in results else out_dtype)
    for prefix, result in results.items():
        if opts.method == "awq":
            parts = writer.awq_tensors(result)
        elif opts.method in ("gptq", "rtn"):
            parts = writer.gptq_tensors(result)
        else:
            q, scale = result
            parts = {"weight": q, "weight_scale": scale}
        for suffix, t in parts.items():
            tensors[f"{prefix}.{suffix}"] = t
    tensors = dict(sorted(tensors.items()))
    if opts.method == "awq":
        qconfig = writer.awq_config(spec.bits, opts.group_size)
    elif opts.method in ("gptq", "rtn"):
        qconfig = writer.gptq_config(spec.bits, opts.group_size, spec.sym, opts.desc_act, opts.damp, opts.method)
    else:
        qconfig = writer.compressed_tensors_config("float" if opts.method == "fp8" else "int")
    return tensors, qconfig
