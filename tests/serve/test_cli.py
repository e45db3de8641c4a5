"""`lmforge serve` command line: its options, its defaults (loopback, port 23333), and clear errors."""

from __future__ import annotations

import pytest

from lmforge.cli.main import build_parser
from lmforge.cli.serve import run


def test_serve_options_and_defaults():
    args = build_parser().parse_args(["serve"])
    assert args.model is None and args.host == "127.0.0.1" and args.port == 23333
    assert args.api_keys is None and args.served_model_name is None and args.max_concurrent_requests is None
    assert args.log_level == "INFO" and args.func is run
    args = build_parser().parse_args(
        [
            "serve",
            "/m",
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--api-keys",
            "a",
            "b",
            "--served-model-name",
            "x",
            "--max-concurrent-requests",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert (args.model, args.host, args.port, args.api_keys, args.served_model_name) == (
        "/m",
        "0.0.0.0",
        8000,
        ["a", "b"],
        ["x"],
    )
    assert args.max_concurrent_requests == 3 and args.device == "cpu"


def test_help_lists_the_server_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--host",
        "--port",
        "--api-keys",
        "--served-model-name",
        "--max-concurrent-requests",
        "--shutdown-timeout",
        "--session-len",
        "embedded",
    ):
        assert option in out, option


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    args = build_parser().parse_args(["serve", str(tmp_path / "nope"), "--device", "cpu", "--port", "0"])
    assert run(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err
    args = build_parser().parse_args(["serve", "--max-concurrent-requests", "0"])
    assert run(args) == 2


def test_parser_choices_match_the_server():
    from lmforge.cli import serve as cli_serve
    from lmforge.serve import parsers

    assert cli_serve.TOOL_CALL_PARSER_CHOICES == parsers.TOOL_CALL_PARSER_CHOICES
    assert cli_serve.REASONING_PARSER_CHOICES == parsers.REASONING_PARSER_CHOICES
    args = build_parser().parse_args(["serve", "--tool-call-parser", "mistral", "--reasoning-parser", "none"])
    assert (args.tool_call_parser, args.reasoning_parser) == ("mistral", "none")


def test_busy_port_is_reported_before_the_model_loads(tmp_path, capsys):
    """The port is bound first: with a missing model, a busy port is still what gets reported (the model was never
    looked at), with the option to change."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        args = build_parser().parse_args(["serve", str(tmp_path / "nope"), "--device", "cpu", "--port", str(port)])
        assert run(args) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err and "does not exist" not in err
