"""The `lmforge` command line: every subcommand has --help; chat is multi-turn over stdin; errors are clear."""

from __future__ import annotations

import copy
import io
import re
import subprocess
import sys

import pytest

from lmforge.cli.main import build_parser, main


@pytest.mark.parametrize("cmd", ["chat", "generate", "check_env"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: lmforge" in capsys.readouterr().out


def test_chat_is_multi_turn_over_stdin(tiny_llama_dir):
    stdin = "Once upon a time\nhéllo\n/exit\n"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge.cli.main",
            "chat",
            tiny_llama_dir,
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
            "--num-cpu-blocks",
            "64",
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2


def test_chat_sends_the_whole_conversation_each_turn(tiny_llama_dir, monkeypatch, capsys):
    from lmforge.pipeline import Pipeline

    seen, real = [], Pipeline.stream_infer

    def spy(self, prompt, *args, **kwargs):
        seen.append(copy.deepcopy(prompt))
        return real(self, prompt, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "stream_infer", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time\nhéllo\n/reset\nagain\n/exit\n"))
    argv = ["chat", tiny_llama_dir, "--device", "cpu", "--max-new-tokens", "4", "--num-cpu-blocks", "64"]
    assert main(argv) == 0
    assert seen[0] == [{"role": "user", "content": "Once upon a time"}]
    first, reply, second = seen[1]
    assert first == seen[0][0] and reply["role"] == "assistant" and second == {"role": "user", "content": "héllo"}
    assert reply["content"] and reply["content"] in capsys.readouterr().out  # the streamed reply is what is kept
    assert seen[2] == [{"role": "user", "content": "again"}]  # /reset starts over


def test_generate_and_chat_print_speed_stats(tiny_llama_dir, monkeypatch, capsys):
    base = ["--device", "cpu", "--max-new-tokens", "5", "--num-cpu-blocks", "64", "--stats"]
    assert main(["generate", "Once upon a time", "--model", tiny_llama_dir, *base]) == 0
    err = capsys.readouterr().err
    assert re.search(r"\[stats\] prompt \d+ tokens, 5 generated in [\d.]+ s: first token [\d.]+ s, [\d.]+ tok/s", err)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", tiny_llama_dir, *base]) == 0
    assert "[stats] prompt" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", tiny_llama_dir, *base[:-1]]) == 0
    assert "[stats]" not in capsys.readouterr().err  # only on request


def test_speed_stats_line():
    from lmforge.cli.common import SpeedStats
    from lmforge.messages import Response

    stats = SpeedStats()
    assert stats.line() == "[stats] no tokens generated"
    stats.start = 0.0
    for t, n in ((1.0, 1), (2.0, 3), (3.0, 5)):
        delta = Response("x", n, 7)
        stats.tick(delta)
        stats.last = t
        if n == 1:
            stats.first = 1.0
    # 4 tokens after the first in 2 s; 5 in 3 s overall
    assert (
        stats.line()
        == "[stats] prompt 7 tokens, 5 generated in 3.00 s: first token 1.000 s, 2.0 tok/s decode, 1.7 tok/s overall"
    )


def test_generate_on_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_check_env_names_the_failing_step(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "architectures": ["NoSuchModel"], '
        '"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, '
        '"vocab_size": 10}'
    )
    assert main(["check_env", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "resolve the model class" in err and "NoSuchModel" in err


@pytest.mark.parametrize("argv", [["chat"], ["generate", "hi"], ["serve"]], ids=lambda a: a[0])
def test_kv_cache_format_flags_reach_the_engine_config(argv):
    from lmforge.cli.common import engine_config

    parser = build_parser()
    if argv[0] == "serve" and "serve" not in parser._subparsers._group_actions[0].choices:
        pytest.skip("the serve extra is not installed")
    cfg = engine_config(parser.parse_args([*argv, "--quant-policy", "8"]))
    assert cfg.quant_policy == 8 and cfg.kv_cache_dtype == "auto"
    cfg = engine_config(parser.parse_args([*argv, "--kv-cache-dtype", "fp8"]))
    assert cfg.quant_policy == 0 and cfg.kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--quant-policy", "3"])
