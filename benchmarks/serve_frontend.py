"""The HTTP front end's capacity on CPU: `lmforge serve`'s real API server(s) (EngineCoreClient, detokenization,
JSON, SSE, uvicorn) in front of a fake engine core that emits tokens at a fixed rate, no model at all.

    python benchmarks/serve_frontend.py --model-dir DIR [--streams 256] [--tok-per-stream-s 200] [--api-server-count 1]

DIR needs only a tokenizer (and config.json: the front end loads the model source for its tokenizer and
generation defaults). The fake core is the real EngineCore loop around FakeEngine: every step period each running
request gets one random token (from a fixed seed), requests finish at exactly max_tokens; prefill is free. The load
is benchmarks/serve_bench.py (streaming /v1/completions clients, token-id prompts).

One JSON line: output tok/s reached, what the fake core offered, and the CPU the API server processes spent per
output token (`api_us_per_token`; psutil, user + system) and per step message of the core. The front end's
ceiling in token events per second per API-server process is 1e6 / api_us_per_token; that figure does not depend
on what else the machine runs, the achieved tok/s does (the load generator shares the CPUs).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from lmforge.engine.outputs import EngineStats, RequestOutput


class FakeEngine:
    """What EngineCore needs of an Engine, emitting one token per running request every `period` seconds."""

    def __init__(self, vocab_size: int, period: float, max_batch: int, seed: int = 0):
        self.detokenize = False
        self.model_name, self.session_len, self.vocab_size = "fake", 4096, vocab_size
        self.eos_token_ids = [2]
        self.engine_config = type("Cfg", (), {"block_size": 64, "enable_prefix_caching": False})()
        self.period, self.max_batch = period, max_batch
        self.rng = random.Random(seed)
        self.running: dict[str, list] = {}  # rid -> [n_prompt, n_generated, max_new]
        self.next_step = 0.0
        self.steps = self.generated = 0

    def add_request(self, input_ids, cfg, rid) -> str:
        self.running[rid] = [len(input_ids), 0, cfg.max_new_tokens]
        return rid

    def abort(self, rid):
        st = self.running.pop(rid, None)
        return None if st is None else RequestOutput(rid, "", [], None, "abort", st[0], st[1])

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), 0, 1000, 1000, 0.0, 0, self.generated)

    def step(self) -> list[RequestOutput]:
        now = time.perf_counter()
        if self.next_step > now:
            time.sleep(self.next_step - now)
        self.next_step = max(now, self.next_step) + self.period
        outs = []
        for rid in list(self.running)[: self.max_batch]:
            st = self.running[rid]
            st[1] += 1
            done = st[1] >= st[2]
            outs.append(RequestOutput(rid, "", [self.rng.randrange(10, self.vocab_size)], None,
                                      "length" if done else None, st[0], st[1]))  # fmt: skip
            if done:
                del self.running[rid]
        self.steps += 1
        self.generated += len(outs)
        return outs

    def close(self) -> None:
        pass


def run_fake_core(address: str, vocab_size: int, period: float, max_batch: int, ready) -> None:
    import signal

    import zmq

    from lmforge.engine.core import EngineCore, _router_socket

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = zmq.Context()
    sock = _router_socket(ctx, address)
    core = EngineCore(FakeEngine(vocab_size, period, max_batch), sock, os.getppid())
    ready.send(os.getpid())
    try:
        core.run()
    finally:
        sock.close()
        ctx.term()


def _api_main(profile: str | None, *args) -> None:
    """One API server (lmforge.serve.launcher's), under cProfile when `profile` names a file for the stats."""
    from lmforge.serve.launcher import _api_server_main

    if profile is None:
        _api_server_main(*args)
        return
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        _api_server_main(*args)
    finally:
        prof.disable()
        prof.dump_stats(f"{profile}.{os.getpid()}")


def _cpu(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            t = p.cpu_times()
            total += t.user + t.system
            for c in p.children(recursive=True):
                ct = c.cpu_times()
                total += ct.user + ct.system
        except psutil.NoSuchProcess:
            pass
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a folder with config.json and a tokenizer")
    p.add_argument("--streams", type=int, default=256, help="requests, all sent at once")
    p.add_argument("--tok-per-stream-s", type=float, default=200.0, help="the fake core's step rate")
    p.add_argument("--output-len", type=int, default=400, help="tokens per request")
    p.add_argument("--input-len", type=int, default=200, help="prompt token ids per request")
    p.add_argument("--api-server-count", type=int, default=1)
    p.add_argument("--client-procs", type=int, default=1)
    p.add_argument("--port", type=int, default=23391)
    p.add_argument("--label", default=None)
    p.add_argument("--profile", default=None, help="cProfile the API servers: stats to PROFILE.<pid>")
    args = p.parse_args(argv)

    from lmforge.serve.server import bind_socket

    with open(os.path.join(args.model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    tmp = tempfile.mkdtemp(prefix="lmforge-frontend-")
    address = f"ipc://{tmp}/core0"
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=False)
    period = 1.0 / args.tok_per_stream_s
    core = ctx.Process(target=run_fake_core, args=(address, vocab, period, args.streams, child_end), daemon=True)
    core.start()
    core_pid = parent_end.recv()
    sock = bind_socket("127.0.0.1", args.port)
    kwargs = dict(host="127.0.0.1", port=args.port, log_level="warning")
    api = [
        ctx.Process(
            target=_api_main,
            args=(args.profile, [address], [core_pid], args.model_dir, False, sock, kwargs, "WARNING"),
            name=f"frontend-api{j}",
        )
        for j in range(args.api_server_count)
    ]
    for a in api:
        a.start()
    url = f"http://127.0.0.1:{args.port}"
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_bench.py")
    try:
        import urllib.request

        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        api_pids = [a.pid for a in api]
        each0 = [_cpu([pid]) for pid in api_pids]
        core0, t0 = _cpu([core_pid]), time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                bench,
                "--url",
                url,
                "--num-requests",
                str(args.streams),
                "--vocab",
                str(vocab),
                "--input-len",
                f"{args.input_len},{args.input_len}",
                "--output-len",
                f"{args.output_len},{args.output_len}",
                "--client-procs",
                str(args.client_procs),
            ],  # fmt: skip
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        each = [_cpu([pid]) - c0 for pid, c0 in zip(api_pids, each0, strict=True)]
        cpu, core_cpu = sum(each), _cpu([core_pid]) - core0
        if out.returncode != 0 or not out.stdout.strip():
            print(out.stdout, out.stderr, file=sys.stderr)
            return 1
        row = json.loads(out.stdout.strip().splitlines()[-1])
        tokens = row["out_tokens"]
        print(json.dumps({
            "bench": "serve_frontend", "label": args.label, "api_server_count": args.api_server_count,
            "streams": args.streams, "offered_tok_s": round(args.streams * args.tok_per_stream_s),
            "out_tok_s": row["out_tok_s"], "completed": row["completed"], "wrong_length_requests":
            row["wrong_length_requests"], "api_cpu_s": round(cpu, 2),
            "api_cpu_s_each": [round(c, 2) for c in each], "api_us_per_token": round(1e6 * cpu / tokens, 2),
            "tokens_per_chunk": round(tokens / row["out_chunks"], 2),
            "api_us_per_chunk": round(1e6 * cpu / row["out_chunks"], 2),
            "ceiling_tok_s_per_api_server": round(tokens / cpu) if cpu else None,
            "core_cpu_s": round(core_cpu, 2), "wall_s": round(wall, 2), "ttft_p50_s": row["ttft_p50_s"],
            "itl_p50_s": row["itl_p50_s"], "itl_p99_s": row["itl_p99_s"],
        }), flush=True)  # fmt: skip
        return 0
    finally:
        for a in api:
            if a.is_alive():
                os.kill(a.pid, 15)
        for a in api:
            a.join(15)
            if a.is_alive():
                a.kill()
        core.kill()
        core.join(5)
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
