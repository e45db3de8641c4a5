"""`lmforge` command line."""

from __future__ import annotations

import argparse
import sys

import lmforge

from .common import (
    HelpFormatter,
    SpeedStats,
    add_engine_args,
    add_sampling_args,
    engine_config,
    generation_config,
    sampling_settings,
)

CHAT_HELP = """commands:
  /help     this list
  /reset    forget the conversation (the system prompt stays)
  /exit     quit (also /quit, Ctrl-D)
Ctrl-C stops a reply mid-way; anything else is sent to the model."""


def _load(args: argparse.Namespace):
    """The pipeline, or None after printing why the model could not be loaded."""
    from lmforge.pipeline import pipeline

    try:
        return pipeline(args.model, engine_config(args))
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return None


def _chat(args: argparse.Namespace) -> int:
    print("loading model ...", file=sys.stderr, flush=True)
    pipe = _load(args)
    if pipe is None:
        return 2
    defaults = pipe.engine.generation_defaults
    gen = generation_config(args, defaults)
    settings = ", ".join(f"{k} {v}" for k, v in sampling_settings(args, defaults).items())
    source = " (unset ones from the model's generation defaults)" if defaults else ""
    print(f"sampling: {settings}{source}", file=sys.stderr)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("type a message (/help for commands, Ctrl-D or /exit to quit)", file=sys.stderr)
    while True:
        try:
            user = input("\nuser> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if user in ("/exit", "/quit"):
            return 0
        if user == "/help":
            print(CHAT_HELP)
            continue
        if user == "/reset":
            messages = messages[:1] if args.system else []
            print("(conversation reset" + (": the system prompt stays)" if args.system else ")"))
            continue
        if user.startswith("/") and " " not in user:
            print(f"unknown command {user}; /help lists the commands (this was not sent to the model)")
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        print("assistant> ", end="", flush=True)
        reply = ""
        stats = SpeedStats()
        try:
            for delta in pipe.stream_infer(messages, gen):
                stats.tick(delta)
                reply += delta.text
                print(delta.text, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        except ValueError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        if args.stats:
            print(stats.line(), file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})


def _generate(args: argparse.Namespace) -> int:
    pipe = _load(args)
    if pipe is None:
        return 2
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    stats = SpeedStats()
    try:
        for delta in pipe.stream_infer(prompt, generation_config(args, pipe.engine.generation_defaults)):
            stats.tick(delta)
            print(delta.text, end="", flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    if args.stats:
        print(stats.line(), file=sys.stderr)
    return 0


def _check_env(args: argparse.Namespace) -> int:
    from lmforge.check_env import ModelCheckError, check_model

    parity_only = [
        f"--{name}"
        for name, default in (("override", []), ("tp", 1), ("device", "cpu"), ("dtype", "float32"))
        if getattr(args, name) != default
    ]
    if parity_only and not args.parity:
        print(f"error: {', '.join(parity_only)} only apply with --parity", file=sys.stderr)
        return 2

    try:
        check_model(args.model, args.trust_remote_code, args.custom_module_map)
    except ModelCheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.parity:
        from lmforge.check_env.parity_cli import run_parity_cli

        return run_parity_cli(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge", description="LLM inference and serving engine.", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"lmforge {lmforge.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "chat",
        formatter_class=HelpFormatter,
        help="interactive, streaming, multi-turn chat in the terminal",
        description="Chat with a model in the terminal. MODEL defaults to the embedded SmolLM2-135M.",
    )
    p.add_argument("model", nargs="?", default=None, help="HF model folder or .gguf file (default: embedded SmolLM2)")
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p)
    add_engine_args(p)
    p.set_defaults(func=_chat)

    p = sub.add_parser(
        "generate",
        formatter_class=HelpFormatter,
        help="generate a completion for one prompt, streamed to stdout",
        description="Generate text for PROMPT and stream it to stdout.",
    )
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="HF model folder or .gguf file (default: embedded SmolLM2)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap PROMPT as a user message in the chat template (default: on)",
    )
    add_sampling_args(p, max_new_tokens=256)
    add_engine_args(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser(
        "check_env",
        formatter_class=HelpFormatter,
        aliases=["check-env"],
        help="check that a model's config, ConfigBuilder and class resolve (no weights loaded); --parity vs HF",
        description="Resolve MODEL's config, ConfigBuilder and model class (check_model); with "
        "--parity also compare its logits with HF transformers on a tiny random config of MODEL's family "
        "(--override its fields, run the engine at --tp N, on --device cuda in --dtype bfloat16).",
    )
    p.add_argument("model", nargs="?", default=None, help="HF model folder or .gguf file (default: embedded SmolLM2)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--custom-module-map", default=None, help="a Python file defining MODULE_MAP")
    p.add_argument(
        "--parity",
        action="store_true",
        help="build a tiny random config of this model type and compare lmforge with HF transformers",
    )
    from lmforge.check_env.parity_cli import add_parity_args

    add_parity_args(p)
    p.set_defaults(func=_check_env)

    from .eval import add_parser as add_eval_parser
    from .quantize import add_parser as add_quantize_parser

    add_quantize_parser(sub)
    add_eval_parser(sub)

    try:
        from .serve import add_parser as add_serve_parser
    except ImportError:
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:  # Ctrl-C while the model loads (a reply or a prompt handles its own)
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
