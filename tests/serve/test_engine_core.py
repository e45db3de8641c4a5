"""`lmforge serve` with the engine core in its own process: data-parallel replicas (`--dp 2`) behind one endpoint
give the same greedy outputs as one, abort, and sum their /metrics; several API servers share the port; and a
killed engine core fails every waiting client with an error and makes the server exit non-zero."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from lmforge.serve.core_client import ReplicaRouter

from .conftest import REPO, TINY_SERVER_ARGS, ServerProcess

# loaded by path: putting benchmarks/ on sys.path would let its scripts shadow real modules for every later test
_spec = importlib.util.spec_from_file_location("_serve_bench_under_test", REPO / "benchmarks" / "serve_bench.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["_serve_bench_under_test"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)

PROMPTS = [[5, 6, 7, 8, 9, 10], list(range(30, 60)), [100, 7, 100, 7, 3], list(range(200, 280, 3))]
HEADERS = {"Authorization": "Bearer k"}


def _core_pids(server: ServerProcess) -> list[int]:
    pids = [int(m) for line in server.lines for m in re.findall(r"engine core \d+ ready \(pid (\d+)", line)]
    assert pids, "".join(server.lines[-20:])
    return pids


def _greedy(server: ServerProcess, stop: list[str] | None = None) -> list[str]:
    texts = []
    with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=60) as http:
        for ids in PROMPTS:
            body = {"model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            if stop:
                body["stop"] = stop
            resp = http.post("/v1/completions", json=body)
            assert resp.status_code == 200, resp.text
            texts.append(resp.json()["choices"][0]["text"])
    return texts


@pytest.fixture(scope="module")
def dp1(tiny_model_dir):
    server = ServerProcess([tiny_model_dir, *TINY_SERVER_ARGS], api_key="k")
    yield server
    server.stop()


def test_a_busy_port_fails_before_any_engine_starts(tiny_model_dir, capsys):
    from lmforge.cli.main import build_parser
    from lmforge.cli.serve import run

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = build_parser().parse_args(["serve", tiny_model_dir, "--device", "cpu", "--port", str(port)])
        assert run(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_router_keeps_a_prefix_on_its_replica_and_balances_the_rest():
    router = ReplicaRouter(2, block_size=4, max_slack=2)
    first = list(range(40))
    a = router.choose(first)
    router.load[a] += 1
    b = router.choose(list(range(100, 140)))  # nothing cached: the idle replica
    assert b != a
    router.load[b] += 1
    # the next turn of the first conversation starts with its prompt: same replica, though both are as busy
    assert router.choose(first + [7, 8, 9, 10, 11]) == a
    router.load[a] += 5
    # a prefix hit is not worth a replica this much busier than the other
    assert router.choose(first + [1] * 8) == b
    assert router.choose([1, 2]) == b  # shorter than a block: load alone
    with pytest.raises(RuntimeError, match="no engine replica"):
        router.choose(first, alive=[False, False])
    assert router.choose(first, alive=[False, True]) == 1  # a dead replica's prefixes are not used


def _in_process(model_dir: str, stop: list[str] | None = None) -> list[str]:
    """The same requests through an Engine in this process, which detokenizes itself."""
    from lmforge.engine.engine import Engine
    from lmforge.messages import GenerationConfig, PytorchEngineConfig

    engine = Engine(model_dir, PytorchEngineConfig(device_type="cpu", num_cpu_blocks=320, block_size=16))
    texts = []
    for ids in PROMPTS:
        engine.add_request(ids, GenerationConfig(max_new_tokens=8, ignore_eos=True, stop_words=stop))
        text = ""
        while engine.has_unfinished():
            text += "".join(out.text for out in engine.step())
        texts.append(text)
    return texts


def test_text_made_by_the_front_end_equals_the_engines_own(tiny_model_dir, dp1):
    """The core sends token ids; the front end's text, stop strings included, is what the Engine makes itself."""
    expected = _in_process(tiny_model_dir)
    assert _greedy(dp1) == expected
    stop = next(t[2:4] for t in expected if len(t.strip()) >= 4)
    cut = _in_process(tiny_model_dir, [stop])
    assert cut != expected and _greedy(dp1, stop=[stop]) == cut


def test_dp2_with_two_api_servers_equals_dp1_aborts_and_sums_metrics(tiny_model_dir, dp1):
    expected = _greedy(dp1)
    server = ServerProcess([tiny_model_dir, *TINY_SERVER_ARGS, "--dp", "2", "--api-server-count", "2"], api_key="k")
    try:
        # /health answers once one API server is up; the launcher says when both are
        deadline = time.monotonic() + 300
        while not any("2 API servers on" in line for line in server.lines):
            assert time.monotonic() < deadline, "".join(server.lines[-30:])
            time.sleep(0.1)
        assert len(_core_pids(server)) == 2
        assert _greedy(server) == expected
        assert server.metric("lmforge_kv_cache_total_blocks") == 2 * 320  # both replicas' blocks
        # a stream left mid-way is aborted in its replica: every block is free again
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=60) as http:
            for _ in range(2):
                with http.stream("POST", "/v1/completions", json=body) as resp:
                    assert resp.status_code == 200
                    for i, _line in enumerate(resp.iter_lines()):
                        if i == 10:
                            break
        deadline = time.monotonic() + 30
        while server.metric("lmforge_kv_cache_free_blocks") < 640 or server.metric("lmforge_num_requests_running"):
            assert time.monotonic() < deadline, "aborted requests still hold blocks"
            time.sleep(0.05)
        children = psutil.Process(server.proc.pid).children(recursive=True)
        assert server.stop(signal.SIGTERM) == 0, "".join(server.lines[-30:])
        psutil.wait_procs(children, timeout=10)
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        server.stop()


def test_a_stop_while_the_api_servers_start_is_a_clean_exit(tiny_model_dir):
    """SIGTERM right after the engine cores are up, while the API-server processes are still importing: status 0
    (either order of stop and startup), no process left behind."""
    cmd = [sys.executable, "-m", "lmforge.cli.main", "serve", tiny_model_dir, *TINY_SERVER_ARGS]
    cmd += ["--api-server-count", "2", "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "engine core 0 ready" in line:
                break
        children = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(0.3)  # the API servers are spawned now, not yet serving
        proc.send_signal(signal.SIGTERM)
        lines += proc.stdout.readlines()
        assert proc.wait(60) == 0, "".join(lines[-30:])
        psutil.wait_procs(children, timeout=10)
        assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dp2_on_ray_places_the_replicas_as_actors_and_equals_dp1(tiny_model_dir, dp1):
    """`--dp 2 --distributed-executor-backend ray` with no cluster running: the server starts a local one, each
    replica is a Ray actor serving the same engine core loop over TCP, and SIGTERM leaves no process behind."""
    pytest.importorskip("ray")
    expected = _greedy(dp1)
    env_args = [tiny_model_dir, *TINY_SERVER_ARGS, "--dp", "2", "--distributed-executor-backend", "ray"]
    server = ServerProcess(env_args, api_key="k", timeout=300)
    try:
        assert len(re.findall(r"engine core \d ready on Ray \(tcp://", "".join(server.lines))) == 2
        assert _greedy(server) == expected
        assert server.metric("lmforge_kv_cache_total_blocks") == 2 * 320
        children = psutil.Process(server.proc.pid).children(recursive=True)
        assert children  # Ray's own processes and the two actors
        assert server.stop(signal.SIGTERM, timeout=60) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline()[:2] for p in alive]
    finally:
        server.stop()


def test_serve_bench_reports_throughput_and_latency_percentiles(dp1, tmp_path):
    """benchmarks/serve_bench.py against the server: the peer kit's kind of workload at a fixed rate and all at
    once, one JSON line each, every requested token counted."""
    plot = tmp_path / "bench.png"
    cmd = [sys.executable, str(REPO / "benchmarks" / "serve_bench.py"), "--url", dp1.base_url, "--api-key", "k",
           "--num-requests", "6", "--vocab", "500", "--input-len", "5,40", "--output-len", "3,9",
           "--request-rates", "50,inf", "--plot", str(plot)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    expected_out = sum(n for _, n in bench.workload(6, 0, 500, (5, 40), (3, 9)))
    assert [r["request_rate"] for r in rows] == [50.0, "inf"]
    for r in rows:
        assert r["completed"] == 6 and r["failed"] == 0 and r["wrong_length_requests"] == 0
        assert r["out_tokens"] == expected_out and r["out_tok_s"] > 0 and r["req_per_s"] > 0
        for name in ("ttft", "itl", "e2e"):
            assert 0 < r[f"{name}_p50_s"] <= r[f"{name}_p90_s"] <= r[f"{name}_p99_s"]
        assert r["ttft_p99_s"] <= r["e2e_p99_s"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.stat().st_size > 0
    else:
        assert "matplotlib is not installed" in proc.stderr and not plot.exists()


def test_a_killed_engine_core_fails_every_waiting_client_and_the_server_exits_non_zero(dp1):
    (core,) = _core_pids(dp1)
    results: dict[str, object] = {}
    streaming = threading.Barrier(3)

    def stream(name: str) -> None:
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3500, "ignore_eos": True, "stream": True}
        events = []
        with httpx.Client(base_url=dp1.base_url, headers=HEADERS, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as resp:
                for i, line in enumerate(resp.iter_lines()):
                    if line.startswith("data: "):
                        events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                    if i == 2:
                        streaming.wait(60)
        results[name] = events

    def plain() -> None:
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3500, "ignore_eos": True}
        results["plain"] = httpx.post(dp1.base_url + "/v1/completions", json=body, headers=HEADERS, timeout=60)

    threads = [threading.Thread(target=stream, args=(f"s{i}",)) for i in range(2)] + [threading.Thread(target=plain)]
    for t in threads:
        t.start()
    streaming.wait(60)  # both streams are producing tokens
    deadline = time.monotonic() + 30
    while dp1.metric("lmforge_num_requests_running") < 3:  # and the plain request runs too
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(core, signal.SIGKILL)
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a client still hangs"
    for name in ("s0", "s1"):
        events = results[name]
        assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
        assert "engine core" in events[-2]["error"]["message"]
    assert results["plain"].status_code == 500 and "engine core" in results["plain"].text
    assert dp1.proc.wait(30) == 1
    assert "Traceback" not in "".join(dp1.lines)
