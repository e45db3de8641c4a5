"""`lmforge quantize MODEL OUT --method ...`: write a quantized checkpoint in its method's standard format."""

from __future__ import annotations

import argparse
import json
import logging
import sys

_DTYPES = {"auto": None, "float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def _run(args: argparse.Namespace) -> int:
    import torch

    from lmforge.quantize.layerwise import QuantizeOptions, quantize_model

    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    model = None if args.model in (None, "default") else args.model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        opts = QuantizeOptions(
            method=args.method,
            bits=args.bits,
            group_size=args.group_size,
            sym=args.sym,
            desc_act=args.desc_act,
            damp=args.damp,
            awq_clip=args.awq_clip,
            awq_search_samples=args.awq_search_samples,
            calib_samples=args.calib_samples,
            calib_seq_len=args.calib_seq_len,
            calib_random_ids=args.calib_random_ids,
            device=device,
            dtype=getattr(torch, args.dtype) if args.dtype != "auto" else None,
            max_shard_bytes=int(args.max_shard_size * 10**9),
        )
        summary = quantize_model(model, args.out, opts)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model (AWQ, GPTQ, RTN, FP8, int8 W8A8) into a standard-format checkpoint",
        description="Quantize MODEL layer by layer and write OUT in the method's standard format: awq -> AutoAWQ "
        "gemm; gptq and rtn -> GPTQ v1 (AutoGPTQ / GPTQModel); fp8 -> compressed-tensors float-quantized (dynamic "
        "per-token activations); w8a8 -> compressed-tensors int-quantized. AWQ and GPTQ calibrate on built-in "
        "text (standard-library docstrings); nothing is downloaded.",
    )
    p.add_argument("model", nargs="?", default=None, help="HF model folder or .gguf file (default: embedded SmolLM2)")
    p.add_argument("out", help="output folder")
    p.add_argument("--method", required=True, choices=["awq", "gptq", "rtn", "fp8", "w8a8"])
    p.add_argument("--bits", type=int, default=4, choices=[4, 8], help="integer weight bits (awq: 4 only)")
    p.add_argument("--group-size", type=int, default=128, help="weights per scale along the input dim; -1: per channel")
    p.add_argument(
        "--sym",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="symmetric integer grid (default: on for gptq/rtn, off for awq, which always has zero points)",
    )
    p.add_argument("--desc-act", action="store_true", help="GPTQ act-order: columns by decreasing Hessian diagonal")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of the mean Hessian diagonal")
    p.add_argument(
        "--awq-clip", action=argparse.BooleanOptionalAction, default=True, help="AWQ's clipping search (default: on)"
    )
    p.add_argument(
        "--awq-search-samples",
        type=int,
        default=None,
        help="calibration sequences AWQ's scale grid scores its output error on (default: all; mean|x| uses all)",
    )
    p.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (awq, gptq)")
    p.add_argument(
        "--calib-random-ids",
        action="store_true",
        help="calibrate on seeded random token ids instead of the built-in text (random-weight models without a "
        "tokenizer, e.g. benchmark presets)",
    )
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="where layers are quantized (default: "
                   "cuda when present)")  # fmt: skip
    p.add_argument(
        "--dtype",
        default="auto",
        choices=list(_DTYPES),
        help="dtype of the unquantized tensors (embeddings, norms); auto: the source's fp16/bf16, else bfloat16",
    )
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GB per safetensors shard")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_run)
