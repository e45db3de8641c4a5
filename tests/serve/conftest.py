"""Fixtures of the server tests: a tiny model folder (byte-level BPE tokenizer with a ChatML template + random
Llama), engines over it, and servers: in-process (httpx ASGI) and live (uvicorn on a free loopback port).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lmforge.serve.app import build_app
from lmforge.tokenizer import Tokenizer

from .fake_engine import FakeEngine

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. Hello world, how are you today?",
    'JSON looks like {"name": "Bob", "age": 42, "tags": ["a", "b"], "ok": true, "none": null}.',
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 3.14 -7; punctuation: , . ; : ! ? ( ) [ ] { } \" ' - _ / \\",
    "the quick brown fox jumps over the lazy dog THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
]
TINY_VOCAB = 512  # model vocab; the tokenizer has fewer entries, as padded real vocabs do


def build_tiny_model(path) -> None:
    """Tokenizer (trained here in ~10 ms, so no download) and a 2-layer random Llama, saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=480,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(CORPUS * 10, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    hf.chat_template = CHATML
    hf.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir) -> Tokenizer:
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture
def fake_engine(tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer, vocab_size=TINY_VOCAB)


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on a free 127.0.0.1 port from a background thread (its own event loop).

    `extra`: more uvicorn.Config settings (e.g. http=lmforge.serve.connections.guarded_protocol(...)).
    """

    def __init__(self, app, **extra):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            log_config=None,
            timeout_graceful_shutdown=2,
            **extra,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_fake(fake_engine):
    server = LiveServer(build_app(fake_engine, "fake-model"))
    yield server
    server.stop()


REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`lmforge serve ARGS` as a child process on a free loopback port; its output is kept in `lines`."""

    def __init__(self, args: list[str], api_key: str | None = None, timeout: float = 120.0):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "lmforge.cli.main", "serve", *args, "--port", str(self.port)]
        if api_key:
            cmd += ["--api-keys", api_key]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise RuntimeError("lmforge serve exited:\n" + "".join(self.lines[-40:]))
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("lmforge serve did not come up:\n" + "".join(self.lines[-40:]))
            time.sleep(0.1)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metric(self, name: str) -> float:
        text = httpx.get(self.base_url + "/metrics", headers=self.headers(), timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


# session_len 4096 lets the shutdown test run a request that outlasts --shutdown-timeout on any machine
TINY_SERVER_ARGS = ["--device", "cpu", "--num-cpu-blocks", "320", "--block-size", "16", "--session-len", "4096",
                    "--served-model-name", "tiny", "--shutdown-timeout", "5"]  # fmt: skip


@pytest.fixture(scope="session")
def embedded_server():
    """The real server process with the embedded SmolLM2-135M-Instruct (answers sensibly; ~5 s to load)."""
    server = ServerProcess(["--device", "cpu", "--served-model-name", "smollm2"], api_key="page-key")
    server.model = "smollm2"
    yield server
    server.stop()
