"""`lmforge eval MODEL`: perplexity of any model lmforge loads, one JSON line on stdout."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile


def _run(args: argparse.Namespace) -> int:
    import torch

    from lmforge.quantize.evaluate import evaluate_perplexity

    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    model = None if args.model in (None, "default") else args.model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        text = None
        if args.text is not None:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        max_tokens = args.max_tokens or None
        kwargs = dict(text=text, device=device, dtype=args.dtype, seq_len=args.seq_len, max_tokens=max_tokens)
        if args.dequantize:
            from lmforge.quantize.dequantize import dequantize_checkpoint

            if model is None or not os.path.isdir(model):
                raise ValueError("--dequantize needs a quantized HF model folder")
            with tempfile.TemporaryDirectory(prefix="lmforge-dequant-") as tmp:
                fmt = dequantize_checkpoint(model, tmp)
                result = evaluate_perplexity(tmp, name=os.path.basename(os.path.normpath(model)), **kwargs)
            result.format = f"{fmt} (dequantized)"
        else:
            result = evaluate_perplexity(model, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(result)))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of a model (any format lmforge loads) on a text",
        description="Perplexity of MODEL over non-overlapping SEQ_LEN-token sequences of a text, computed by "
        "lmforge's own model (prefill through the paged KV cache). Default text: built-in standard-library "
        "docstrings, held out from `lmforge quantize`'s calibration text. Prints one JSON line.",
    )
    p.add_argument("model", nargs="?", default=None, help="HF model folder or .gguf file (default: embedded SmolLM2)")
    p.add_argument("--text", default=None, help="a UTF-8 text file to score (default: the built-in held-out text)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when a GPU is present")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float16", "bfloat16", "float32"],
        help="auto: as the engine runs the model (a GGUF file on the CPU keeps its packed int4 layers: format "
        "gguf-packed); an explicit dtype dequantizes GGUF weights to it",
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per scored sequence")
    p.add_argument(
        "--max-tokens", type=int, default=20480, help="score at most this many tokens (whole sequences; 0: all)"
    )
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="score a dense copy of a quantized checkpoint (weight quantization only; when lmforge lacks its layers)",
    )
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_run)
