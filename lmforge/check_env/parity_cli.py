"""`lmforge check_env MODEL --parity [--override KEY=VALUE ...] [--tp N] [--device cuda] [--dtype bfloat16]`: the
parity of lmforge with HF transformers (check_env/parity.py) on a tiny random model of MODEL's family. Imports
nothing heavy at module level: the CLI's parser is built from it."""

from __future__ import annotations

import argparse
import json
import sys

# max |logit diff| per dtype: float32 on the CPU backend is exact up to summation order; in bfloat16 two correct
# implementations drift by a few ulps of the logits (2**-6 for |logits| < 4, the tiny models' range), float16 less
TOLERANCES = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def add_parity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a field of the tiny HF config (repeatable); VALUE is JSON (2, true, null, {...}) or else a string",
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks for the engine (default: 1)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="backend and device of both lmforge and HF"
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(TOLERANCES),
        default="float32",
        help="dtype of both; the max |logit diff| allowed is "
        + ", ".join(f"{k} {v:g}" for k, v in TOLERANCES.items())
        + " (below float32 a greedy divergence at a near-tie, an HF margin under that tolerance, passes)",
    )


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def run_parity_cli(args: argparse.Namespace) -> int:
    """A batch of 4 prompts of different lengths, then a batch that is prefilled in chunks and preempted. Prints
    both tables; 1 when tokens differ or a diff exceeds the dtype's tolerance, 2 when the check cannot run (the
    engine's own error first)."""
    from lmforge.check_env.parity import PREEMPTION, run_parity
    from lmforge.model_source import resolve_model_path

    try:
        overrides = parse_overrides(getattr(args, "override", []))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tp, device, dtype = getattr(args, "tp", 1), getattr(args, "device", "cpu"), getattr(args, "dtype", "float32")
    ok = True
    cases = (("batch of 4 sequences", {}), ("chunked prefill and preemption (24 KV blocks of 4 tokens)", PREEMPTION))
    for label, case in cases:
        try:
            result = run_parity(
                resolve_model_path(args.model),
                custom_module_map=getattr(args, "custom_module_map", None),
                trust_remote_code=getattr(args, "trust_remote_code", False),
                overrides=overrides,
                device_type=device,
                dtype=dtype,
                engine_config={"tp": tp} if tp > 1 else None,
                **case,
            )
        except Exception as e:  # the engine's (or config's) own error first, then what it led to
            print(f"parity check failed to run: {type(e).__name__}: {e}", file=sys.stderr)
            cause = e.__cause__ or e.__context__
            if cause is not None:
                print(f"  caused by {type(cause).__name__}: {cause}", file=sys.stderr)
            return 2
        where = f"{device}, {dtype}" + (f", tp={tp}" if tp > 1 else "")
        print(f"\nparity with HF transformers ({where}), {label}:")
        print(result.table())
        ok = ok and result.passed
    return 0 if ok else 1
