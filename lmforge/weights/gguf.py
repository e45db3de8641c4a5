"""GGUF models: HF config, tokenizer and HF-named weights from one .gguf file, dequantized or (on CPU, for the
linear layers of `gguf_pack_plan`) kept packed as int4 planes (weights/gguf_pack.py).

`files.iter_weights` sends .gguf paths here; the engine gets the config and tokenizer through the same path,
so a GGUF file stands in for a whole HF folder. Nothing is written to disk.
"""

import hashlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import torch
from gguf import GGMLQuantizationType as _Q
from tqdm import tqdm

from lmforge.weights.dequant import can_dequantize, dequantize
from lmforge.weights.errors import WeightFileError
from lmforge.weights.gguf_config import GGUFFamily, gguf_config_dict, gguf_family, gguf_hf_config_from_file
from lmforge.weights.gguf_file import GGUFFile, GGUFTensorInfo, read_gguf
from lmforge.weights.gguf_pack import PLANES, int4_planes, pack_gptq_order

logger = logging.getLogger(__name__)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# blk.{i}.<gguf module> -> model.layers.{i}.<HF module>
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# keyed by GGUFFamily.model_type, since Mixtral and Llama share the GGUF architecture "llama"
_FAMILY_LAYER_NAMES = {
    "gemma2": {"ffn_norm": "pre_feedforward_layernorm"},  # these have four norms per layer
    "gemma3_text": {"ffn_norm": "pre_feedforward_layernorm"},
    "phi3": {"ffn_up": "mlp.gate_up_proj"},  # Phi-3 keeps gate and up fused in one tensor
    "mixtral": {"ffn_gate_inp": "block_sparse_moe.gate"},  # the router
    "qwen3_moe": {"ffn_gate_inp": "mlp.gate"},
}
# MoE experts: the HF module holding them and the checkpoint names of each expert's gate, up and down
# projections, the per-expert names the models' load_weights (nn.moe.load_expert_weights) accept
_EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe.experts", {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}),
    "qwen3_moe": ("mlp.experts", {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}),
}
# rope factors live in the config (see gguf_config._rope_scaling), not in the model's parameters
_CONFIG_ONLY_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
# GGUF modules of the linear layers that can stay packed (MoE experts and routers, embeddings and norms cannot)
_PACKABLE_MODULES = {"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}


def gguf_hf_config(path: str, with_transformers: bool = False):
    """The HF config of a GGUF model (`architectures`, sizes, rope, special token ids, tied embeddings);
    with_transformers: transformers' PretrainedConfig even for a family configurations.hf_json reads."""
    return gguf_hf_config_from_file(read_gguf(path), with_transformers)


def _tokenizer_cache(path: str, transformers_version: str) -> str:
    """`~/.cache/lmforge/tokenizers/<key>`: the key covers the file (absolute path, size, modification time) and
    transformers' version, so a changed file or library rebuilds."""
    from lmforge.engine.startup import lmforge_cache_dir

    st = os.stat(path)
    ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{transformers_version}"
    return os.path.join(lmforge_cache_dir(), "tokenizers", hashlib.sha256(ident.encode()).hexdigest()[:16])


def gguf_tokenizer(path: str):
    """The model's fast tokenizer, rebuilt by transformers (a PreTrainedTokenizerFast) from the vocabulary and
    merges in the metadata, then kept in `_tokenizer_cache` (the rebuild took 1.3 s of a 2.4 s
    start on 2 cores; loading the saved one 0.2 s). transformers is imported only to rebuild it: a cached one is
    read by lmforge.fast_tokenizer (as are the weights and the config of a GGUF file, without transformers)."""
    from importlib.metadata import version

    from lmforge.fast_tokenizer import FastTokenizer, unsupported_reason

    read_gguf(path)  # a clear WeightFileError for a broken file (the parse is cached per file)
    cache = _tokenizer_cache(path, version("transformers"))
    if os.path.exists(os.path.join(cache, "tokenizer.json")):
        try:
            if unsupported_reason(cache) is None:
                return FastTokenizer(cache)
            import transformers

            return transformers.PreTrainedTokenizerFast.from_pretrained(cache)
        except Exception as e:  # a damaged entry: rebuild it from the file
            logger.warning("cached tokenizer %s unreadable (%s); rebuilding it from %s", cache, e, path)
    import transformers

    tokenizer = _build_gguf_tokenizer(path, transformers)
    tmp = None
    try:  # written beside, then renamed: a concurrent reader sees a whole entry or none
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cache))
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
        tmp = None
    except OSError as e:
        logger.info("tokenizer not cached (%s)", e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def _build_gguf_tokenizer(path: str, transformers):
    file = read_gguf(path)  # a clear WeightFileError for a broken file before transformers sees it
    folder, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # transformers raises many types here; the user needs the file name and the cause
        raise WeightFileError(f"GGUF file {path}: could not build its tokenizer ({type(e).__name__}: {e})") from e
    # older transformers versions leave these unset for some vocabularies; the metadata is the source of truth
    template = file.metadata.get("tokenizer.chat_template")
    if tokenizer.chat_template is None and isinstance(template, str):
        tokenizer.chat_template = template
    for role in ("bos", "eos"):
        token_id = file.metadata.get(f"tokenizer.ggml.{role}_token_id")
        if getattr(tokenizer, f"{role}_token") is None and token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    return tokenizer


def gguf_pack_plan(
    path: str, packed_modules_mapping: dict[str, list[str]] | None, tie_word_embeddings: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """({HF module name: GGUF type name} of the linear layers that can stay packed as int4 planes, the same of the
    other linear layers, which stay dense). Packed: a type of
    gguf_pack.PLANES, out-features a multiple of 16 (torch's int4 kernel), and, for the parts of one merged layer
    (packed_modules_mapping: q/k/v_proj, gate/up_proj), all parts with the same number of planes, else none of
    them. A tied lm_head packs from token_embd. Both the quant config and iter_gguf_weights follow this plan."""
    file = read_gguf(path)
    family = gguf_family(file)
    candidates: dict[str, GGUFTensorInfo] = {}
    for info in file.tensors.values():
        parts = info.name.split(".")
        if info.name == "output.weight" or (tie_word_embeddings and info.name == "token_embd.weight"):
            if "output.weight" in file.tensors and info.name == "token_embd.weight":
                continue
            candidates["lm_head"] = info
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in _PACKABLE_MODULES and parts[3] == "weight":
            candidates[_hf_names(file, family, info)[0].removesuffix(".weight")] = info
    groups: dict[str, list[str]] = {}
    for module in candidates:
        parent, _, last = module.rpartition(".")
        merged = next((m for m, parts in (packed_modules_mapping or {}).items() if last in parts), last)
        groups.setdefault(f"{parent}.{merged}", []).append(module)
    plan, dense = {}, {}
    for members in groups.values():
        infos = [candidates[m] for m in members]
        ok = all(
            _Q(i.ggml_type) in PLANES and len(i.shape) == 2 and i.shape[0] % 16 == 0 and i.shape[1] % 32 == 0
            for i in infos
        )
        ok = ok and len({PLANES[_Q(i.ggml_type)] for i in infos}) == 1
        (plan if ok else dense).update({m: i.type_name for m, i in zip(members, infos, strict=True)})
    return plan, dense


def iter_gguf_weights(
    path: str,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    progress: bool = False,
    packed: dict[str, str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every weight: dequantized to `dtype` on `device`, torch [out, in] order,
    q/k rows back in HF's rotate-half layout. The bytes move to `device` before dequantizing, so a GPU does
    the unpacking when one is given.

    packed (gguf_pack_plan's, CPU only): each of these modules instead yields the canonical wna16 tensors of its
    int4 planes, `<module>.qweight` int32 [P * K / 8, N], `.scales` and `.mins` float32 [P * K / 32, N].
    """
    packed = packed or {}
    file = read_gguf(path)
    family = gguf_family(file)
    config = gguf_config_dict(file)
    plan = [(info, _hf_names(file, family, info)) for info in file.tensors.values()]
    for info, _ in plan:  # fail before yielding anything, not halfway through a model load
        if not can_dequantize(info.ggml_type):
            raise WeightFileError(
                f"GGUF file {path}: tensor {info.name!r} uses quantization type {info.type_name}, which lmforge "
                "cannot dequantize. Use a file quantized as Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K, IQ*, F16, "
                "BF16 or F32."
            )
    bar = tqdm(plan, desc=f"Loading {os.path.basename(path)}", unit="tensor", disable=_bar_disabled(progress))
    for info, hf_names in bar:
        if not hf_names:
            continue
        module = hf_names[0].removesuffix(".weight")
        if module in packed:
            yield from _load_packed(file, family, config, info, module)
            continue
        tensor = _load_tensor(file, family, config, info, hf_names[0], dtype, torch.device(device))
        if info.name == "token_embd.weight" and "lm_head" in packed and "output.weight" not in file.tensors:
            yield from _load_packed(file, family, config, info, "lm_head")  # tied: lm_head packs from the embedding
        if _is_stacked_experts(info.name):  # [num_experts, out, in]: one HF tensor per expert
            yield from zip(hf_names, tensor.unbind(0), strict=True)
        else:
            yield hf_names[0], tensor


def _bar_disabled(progress: bool) -> bool:
    return not progress or not sys.stderr.isatty()


def _is_stacked_experts(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and parts[2].endswith("_exps")


def _hf_names(file: GGUFFile, family: GGUFFamily, info: GGUFTensorInfo) -> list[str]:
    """The HF names one GGUF tensor loads as: none for config-only tensors, one per expert for the stacked
    `blk.{i}.ffn_{gate,up,down}_exps` tensors, else one."""
    name = info.name
    if name in _CONFIG_ONLY_TENSORS:
        return []
    if name in _GLOBAL_NAMES:
        return [_GLOBAL_NAMES[name]]
    parts = name.split(".")  # blk.{i}.{module}.{weight|bias}, or blk.{i}.{module}.{expert}.weight in old Mixtrals
    moe_prefix, expert_projs = _EXPERT_NAMES.get(family.model_type, ("", {}))
    if len(parts) >= 4 and parts[0] == "blk" and parts[1].isdigit():
        layer, module = parts[1], parts[2]
        proj = expert_projs.get(module.removesuffix("_exps"))
        if len(parts) == 4 and module.endswith("_exps") and proj is not None:
            return [f"model.layers.{layer}.{moe_prefix}.{e}.{proj}.{parts[3]}" for e in range(info.shape[0])]
        if len(parts) == 5 and parts[3].isdigit() and module in expert_projs:
            # llama.cpp wrote one tensor per expert before it stacked them (Mixtral files from early 2024)
            return [f"model.layers.{layer}.{moe_prefix}.{parts[3]}.{expert_projs[module]}.{parts[4]}"]
        hf_module = _FAMILY_LAYER_NAMES.get(family.model_type, {}).get(module, _LAYER_NAMES.get(module))
        if len(parts) == 4 and hf_module is not None:
            return [f"model.layers.{layer}.{hf_module}.{parts[3]}"]
    raise WeightFileError(
        f"GGUF file {file.path}: tensor {name!r} has no known HF name for a {family.architecture} model; "
        "the file may come from a newer llama.cpp than lmforge supports."
    )


def _load_tensor(
    file: GGUFFile,
    family: GGUFFamily,
    config: dict,
    info: GGUFTensorInfo,
    hf_name: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    raw = file.raw(info).to(device)
    is_norm = family.norm_offset != 0 and hf_name.endswith("norm.weight")
    tensor = dequantize(raw, info.ggml_type, info.shape, torch.float32 if is_norm else dtype)
    if is_norm:  # subtract in float32: the offset is large next to the learned part
        tensor = (tensor - family.norm_offset).to(dtype)
    if family.permute_qk and ".self_attn.q_proj." in hf_name:
        tensor = _unpermute_rows(tensor, config["num_attention_heads"])
    elif family.permute_qk and ".self_attn.k_proj." in hf_name:
        tensor = _unpermute_rows(tensor, config["num_key_value_heads"])
    return tensor


def _load_packed(
    file: GGUFFile, family: GGUFFamily, config: dict, info: GGUFTensorInfo, module: str
) -> Iterator[tuple[str, torch.Tensor]]:
    if _Q(info.ggml_type) not in PLANES:
        raise WeightFileError(f"GGUF file {file.path}: tensor {info.name!r} ({info.type_name}) cannot stay packed")
    codes, scales, mins = int4_planes(file.raw(info), info.ggml_type, info.shape)
    heads = None
    if family.permute_qk and module.endswith(".self_attn.q_proj"):
        heads = config["num_attention_heads"]
    elif family.permute_qk and module.endswith(".self_attn.k_proj"):
        heads = config["num_key_value_heads"]
    if heads is not None:  # rows are out-features: the same un-permutation as the dense weight's
        codes, scales, mins = (_unpermute_rows(t, heads) for t in (codes, scales, mins))
    yield f"{module}.qweight", pack_gptq_order(codes)
    yield f"{module}.scales", scales.t().contiguous()
    yield f"{module}.mins", mins.t().contiguous()


def _unpermute_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation.

    Its convert script regroups each head's rows [first half | second half] (HF rotate-half pairs row r with
    r + head_dim/2) into interleaved pairs (2r, 2r + 1) for its rotary kernel: it views the rows as
    [num_heads, 2, head_dim/2] and swaps the last two axes. Swapping them back restores HF's order; k uses
    the KV head count.
    """
    head_dim = tensor.shape[0] // num_heads
    grouped = tensor.reshape(num_heads, head_dim // 2, 2, *tensor.shape[1:])
    return grouped.transpose(1, 2).reshape(tensor.shape).contiguous()
