"""The `lmforge` command line: every subcommand has --help; chat is multi-turn over stdin; errors are clear."""

from __future__ import annotations

import copy
import io
import os
import re
import shlex
import shutil
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


def test_version_and_defaults_in_help(capsys):
    import lmforge

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lmforge {lmforge.__version__}"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ("--max-new-tokens MAX_NEW_TOKENS default: 512", "(default: 64)", "(default: 0.8)", "(default: 8192)"):
        assert shown in out, shown
    assert "model's generation_config.json" in out


def _tmux(socket: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, check=True).stdout


def _wait_for_pane(socket: str, text: str, timeout: float = 120.0) -> str:
    import time

    deadline = time.monotonic() + timeout
    while True:
        pane = _tmux(socket, "capture-pane", "-p", "-J", "-S", "-200", "-t", "chat")
        if text in pane:
            return pane
        assert time.monotonic() < deadline, f"{text!r} never appeared:\n{pane}"
        time.sleep(0.1)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_chat_help_and_reset_in_a_terminal(tiny_llama_dir):
    """A real terminal (tmux): /help lists the commands and /reset says so; neither reaches the model."""
    socket = f"lmforge-test-{os.getpid()}"
    cmd = [sys.executable, "-m", "lmforge.cli.main", "chat", tiny_llama_dir, "--device", "cpu"]
    cmd += ["--max-new-tokens", "4", "--num-cpu-blocks", "64"]
    env = f"PYTHONPATH={shlex.quote(os.environ.get('PYTHONPATH', ''))}"
    _tmux(socket, "new-session", "-d", "-s", "chat", "-x", "200", "-y", "50", f"env {env} {shlex.join(cmd)}")
    try:
        _wait_for_pane(socket, "user> ")
        _tmux(socket, "send-keys", "-t", "chat", "/help", "Enter")
        pane = _wait_for_pane(socket, "forget the conversation")
        assert "/exit" in pane and "assistant>" not in pane
        _tmux(socket, "send-keys", "-t", "chat", "hello", "Enter")
        _wait_for_pane(socket, "assistant> ")
        _tmux(socket, "send-keys", "-t", "chat", "/reset", "Enter")
        pane = _wait_for_pane(socket, "(conversation reset)")
        _tmux(socket, "send-keys", "-t", "chat", "/nonsense", "Enter")
        pane = _wait_for_pane(socket, "unknown command /nonsense")
        assert pane.count("assistant> ") == 1
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)


def test_ctrl_c_while_the_model_loads_is_a_clean_exit(tiny_llama_dir, tmp_path):
    """SIGINT during the load (held there by a custom module map that waits) ends with 'interrupted', status 130,
    and no traceback."""
    import signal
    import time

    marker = tmp_path / "loading"
    module_map = tmp_path / "slow_map.py"
    module_map.write_text(
        f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(120)\nMODULE_MAP = {{}}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli.main", "chat", tiny_llama_dir, "--device", "cpu"]
        + ["--custom-module-map", str(module_map), "--num-cpu-blocks", "64"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job inherits SIGINT ignored (then Python installs no Ctrl-C handler): undo that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300  # the load reaches the module map after torch's import: slow when busy
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


def test_cuda_without_a_gpu_names_the_cpu_option(tiny_llama_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["generate", "hi", "--model", tiny_llama_dir, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cpu" in err and "device_type='cuda'" not in err


def test_unknown_model_type_is_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "wizardlm_xl", "architectures": ["WizardForCausalLM"]}')
    assert main(["generate", "hi", "--model", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "model_type 'wizardlm_xl'" in err and "LlamaForCausalLM" in err and "upgrade" not in err


def test_tp_that_does_not_divide_the_heads_is_one_clear_line(tmp_path):
    """9 heads over --tp 2: rank 0 says so; the worker exits quietly instead of adding its own traceback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=72,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=9,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.cli.main", "generate", "hi", "--model", str(tmp_path), "--no-chat"]
        + ["--tp", "2", "--device", "cpu", "--num-cpu-blocks", "16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not divisible by tp=2" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


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
