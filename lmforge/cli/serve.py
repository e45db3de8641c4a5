"""`lmforge serve [MODEL]`: the OpenAI-compatible HTTP server with its chat page at /."""

from __future__ import annotations

import argparse
import sys

from .common import HelpFormatter, add_engine_args, engine_config

# lmforge.serve.parsers' choices, written out so `--help` does not import the server (a test keeps them equal)
TOOL_CALL_PARSER_CHOICES = ("auto", "hermes", "llama3_json", "mistral")
REASONING_PARSER_CHOICES = ("auto", "none", "qwen3", "deepseek_r1")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        formatter_class=HelpFormatter,
        help="OpenAI-compatible HTTP server with a chat page at /",
        description="Serve MODEL over an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions), "
        "with /health, Prometheus /metrics and a chat page at /. MODEL defaults to the embedded "
        "SmolLM2-135M-Instruct. Binds 127.0.0.1 unless --host says otherwise. The engine runs in a process of its "
        "own (one per --dp replica); the HTTP front end in this one (or in --api-server-count processes).",
    )
    p.add_argument("model", nargs="?", default=None, help="HF model folder or .gguf file (default: embedded SmolLM2)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=23333)
    g.add_argument(
        "--api-keys",
        nargs="+",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (any of these keys) on /v1/*, the docs and /metrics; "
        "/health and the chat page stay open",
    )
    g.add_argument(
        "--metrics-key",
        default=None,
        metavar="KEY",
        help="the key /metrics takes instead of the API keys (for a scraper that should not hold an API key)",
    )
    g.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        metavar="HOST",
        help="accept only these Host header names ('*.example.com' for subdomains); others get a 400 (default: any)",
    )
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="model name(s) clients send as 'model' (default: the model's own name)",
    )
    g.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=None,
        help="answer 429 to generation requests beyond this many in flight (default: no limit)",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help="larger request bodies get a 413 before they are read (default: 8388608, 8 MiB)",
    )
    g.add_argument(
        "--request-header-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="close a connection (408) that has not sent its request headers in this time (default: 10)",
    )
    g.add_argument(
        "--request-body-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="answer 408 to a request whose body has not arrived in this time (default: 60)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="open connections beyond this many get a 503 and are closed (default: 1024)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish after SIGINT/SIGTERM before they are aborted",
    )
    g.add_argument(
        "--dp",
        type=int,
        default=1,
        help="data parallelism: engine replicas (each with --tp ranks) behind this one endpoint, each request "
        "routed by load and to the replica holding its prompt's prefix (default: 1)",
    )
    g.add_argument(
        "--api-server-count",
        type=int,
        default=1,
        help="HTTP front-end processes sharing the port (tokenization, templates, JSON and SSE off the engine's "
        "processes; default: 1)",
    )
    g.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=TOOL_CALL_PARSER_CHOICES,
        help="how the model writes tool calls: hermes (<tool_call> JSON, Qwen), llama3_json, mistral "
        "([TOOL_CALLS]); auto: read from the chat template, else hermes",
    )
    g.add_argument(
        "--reasoning-parser",
        default="auto",
        choices=REASONING_PARSER_CHOICES,
        help="split <think>...</think> into reasoning_content (qwen3, deepseek_r1); auto: when the chat template "
        "writes the tags; none: never",
    )
    add_engine_args(p)
    p.set_defaults(func=run, log_level="INFO")  # INFO: one log line per request


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (status 0); 1 when the model cannot start or an engine core dies."""
    from lmforge.serve.launcher import serve_model
    from lmforge.serve.limits import ServeLimits

    if args.max_concurrent_requests is not None and args.max_concurrent_requests < 1:
        print("error: --max-concurrent-requests must be >= 1", file=sys.stderr)
        return 2
    if args.dp < 1 or args.api_server_count < 1:
        print("error: --dp and --api-server-count must be >= 1", file=sys.stderr)
        return 2
    try:
        given = {
            "max_request_bytes": args.max_request_bytes,
            "header_timeout": args.request_header_timeout,
            "body_timeout": args.request_body_timeout,
            "max_connections": args.max_connections,
        }
        limits = ServeLimits(**{k: v for k, v in given.items() if v is not None})  # the defaults the help names
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backend_config = engine_config(args)  # also sets up logging
    try:
        return serve_model(
            args.model,
            backend_config,
            dp=args.dp,
            api_server_count=args.api_server_count,
            log_level=args.log_level,
            host=args.host,
            port=args.port,
            served_model_name=args.served_model_name,
            api_keys=args.api_keys,
            max_concurrent_requests=args.max_concurrent_requests,
            shutdown_timeout=args.shutdown_timeout,
            tool_call_parser=args.tool_call_parser,
            reasoning_parser=args.reasoning_parser,
            limits=limits,
            metrics_key=args.metrics_key,
            allowed_hosts=args.allowed_hosts,
            stats_interval=10.0 if args.stats else None,
        )
    except (OSError, ValueError) as e:  # a missing or broken model, a bad setting: say what, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmforge")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
