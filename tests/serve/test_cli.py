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


def test_hardening_options_and_their_stated_defaults(capsys):
    from lmforge.serve.limits import ServeLimits

    args = build_parser().parse_args(["serve"])
    assert args.max_request_bytes is None and args.metrics_key is None and args.allowed_hosts is None
    assert not args.skip_weight_checks
    args = build_parser().parse_args(
        ["serve", "--max-request-bytes", "1000", "--request-header-timeout", "2", "--request-body-timeout", "3",
         "--max-connections", "9", "--metrics-key", "m", "--allowed-hosts", "a.com", "*.b.com", "--skip-weight-checks"]
    )  # fmt: skip
    assert (args.max_request_bytes, args.request_header_timeout, args.request_body_timeout) == (1000, 2.0, 3.0)
    assert (args.max_connections, args.metrics_key, args.allowed_hosts) == (9, "m", ["a.com", "*.b.com"])
    assert args.skip_weight_checks
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    limits = ServeLimits()
    assert f"default: {limits.max_request_bytes}," in help_text  # the help states the real defaults
    assert f"(default: {limits.header_timeout:g})" in help_text and f"(default: {limits.body_timeout:g})" in help_text
    assert f"(default: {limits.max_connections})" in help_text
    assert run(build_parser().parse_args(["serve", "--max-request-bytes", "0"])) == 2


def test_busy_port_fails_before_the_model_is_touched(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # a model path that does not exist: had the model been loaded first, that would be the error
        args = build_parser().parse_args(["serve", str(tmp_path / "nope"), "--device", "cpu", "--port", str(port)])
        assert run(args) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "does not exist" not in err, err
