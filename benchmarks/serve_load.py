"""Load and soak test of `lmforge serve` on loopback: many concurrent streaming chat clients, some of which hang up
mid-stream. Checks that no request that should succeed fails, that every KV block is back in the free pool
afterwards, and that the server's memory stays flat across rounds. One JSON line per round, then a summary.

    python benchmarks/serve_load.py                                # embedded SmolLM2 on CPU, 200 clients, 2000 requests
    python benchmarks/serve_load.py --model /path/to/hf --device cuda --requests 4000
    python benchmarks/serve_load.py --url http://127.0.0.1:23333 --api-key K   # an already running server (no RSS)

Bounded: --requests in all, at most --concurrency at a time, --max-tokens each; it only talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
from common import device_name, emit, git_sha, log

TOPICS = ["France", "Italy", "the moon", "rain", "bread", "chess", "music", "rivers", "owls", "copper", "tea", "snow"]


@dataclass
class Round:
    ttft: list[float] = field(default_factory=list)
    ok: int = 0
    disconnected: int = 0
    errors: list[str] = field(default_factory=list)
    tokens: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


async def one_request(client: httpx.AsyncClient, args, i: int, hang_up: bool, result: Round) -> None:
    rng = random.Random(i)
    body = {
        "model": args.model_name,
        "messages": [{"role": "user", "content": f"Tell me one fact about {rng.choice(TOPICS)} (#{i})."}],
        "max_tokens": args.max_tokens,
        "temperature": 0.7,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, finish, done, usage = None, None, False, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                result.errors.append(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                return
            events = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                events += 1
                chunk = httpx.Response(200, content=line[6:]).json()
                if "error" in chunk:
                    result.errors.append(f"stream error: {chunk['error']['message']}")
                    return
                for choice in chunk["choices"]:
                    if first is None and choice["delta"].get("content"):
                        first = time.perf_counter() - start
                    finish = choice["finish_reason"] or finish
                usage = chunk.get("usage") or usage
                if hang_up and events >= 3:  # the role chunk and two tokens, then go away mid-stream
                    result.disconnected += 1
                    return
    except httpx.HTTPError as e:
        result.errors.append(f"{type(e).__name__}: {e}")
        return
    if not done or finish not in ("stop", "length") or usage is None:
        result.errors.append(f"incomplete stream: done={done} finish={finish} usage={usage}")
        return
    result.ok += 1
    result.tokens += usage["completion_tokens"]
    if first is not None:
        result.ttft.append(first)


async def run_round(args, first_index: int, count: int) -> tuple[Round, float]:
    result = Round()
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sem = asyncio.Semaphore(args.concurrency)
    rng = random.Random(first_index)

    async def guarded(i: int) -> None:
        async with sem:
            await one_request(client, args, i, rng.random() < args.disconnect_fraction, result)

    async with httpx.AsyncClient(base_url=args.url, limits=limits, headers=headers, timeout=args.timeout) as client:
        start = time.perf_counter()
        await asyncio.gather(*(guarded(i) for i in range(first_index, first_index + count)))
        return result, time.perf_counter() - start


def wait_idle(http: httpx.Client, timeout: float = 10.0) -> tuple[float, float]:
    """(free blocks, total blocks) once nothing runs, or what it is after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        free, total = metric(http, "lmforge_kv_cache_free_blocks"), metric(http, "lmforge_kv_cache_total_blocks")
        running = metric(http, "lmforge_num_requests_running") + metric(http, "lmforge_num_requests_waiting")
        if (free == total and running == 0) or time.monotonic() > deadline:
            return free, total
        time.sleep(0.05)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0], 4)


def start_server(args) -> subprocess.Popen:
    port = free_port()
    args.url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "lmforge.cli.main",
        "serve",
        *([args.model] if args.model else []),
        "--port",
        str(port),
        "--served-model-name",
        args.model_name,
        "--log-level",
        "WARNING",
    ]
    if args.device:
        cmd += ["--device", args.device]
    for flag in ("max_batch_size", "num_cpu_blocks", "block_size"):
        if getattr(args, flag):
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.api_key:
        cmd += ["--api-keys", args.api_key]
    log("starting", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"lmforge serve exited with {proc.returncode}")
        try:
            if httpx.get(args.url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("lmforge serve did not come up")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model for the server it starts (default: embedded SmolLM2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument(
        "--num-cpu-blocks",
        type=int,
        default=None,
        help="KV cache size. The cache is allocated lazily, so RSS climbs until every block was used once; "
        "a cache the first round fills shows whether memory is flat after that",
    )
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--url", default=None, help="use this running server instead of starting one")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model-name", default="load-test", help="served model name (with --url: the server's)")
    p.add_argument("--requests", type=int, default=2000, help="requests in all (the soak)")
    p.add_argument("--concurrency", type=int, default=200, help="clients streaming at once")
    p.add_argument("--rounds", type=int, default=4, help="rounds the requests are split into (one RSS sample each)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--disconnect-fraction", type=float, default=0.2, help="share of clients that hang up mid-stream")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s")
    args = p.parse_args()

    proc = None if args.url else start_server(args)
    pid = proc.pid if proc else None
    http = httpx.Client(
        base_url=args.url, timeout=30, headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    )
    try:
        log("warm-up")
        asyncio.run(run_round(argparse.Namespace(**{**vars(args), "disconnect_fraction": 0.0}), 10**6, 4))
        free_before, total = wait_idle(http)
        rss_before = rss_mb(pid)
        per_round = max(1, args.requests // args.rounds)
        all_ttft, errors, ok, hung_up, tokens, wall = [], [], 0, 0, 0, 0.0
        rss = [rss_before]
        for r in range(args.rounds):
            result, seconds = asyncio.run(run_round(args, r * per_round, per_round))
            free, _ = wait_idle(http)
            rss.append(rss_mb(pid))
            all_ttft += result.ttft
            errors += result.errors
            ok, hung_up, tokens = ok + result.ok, hung_up + result.disconnected, tokens + result.tokens
            wall += seconds
            emit(
                measure="serve_load_round",
                round=r,
                requests=per_round,
                ok=result.ok,
                disconnected=result.disconnected,
                errors=len(result.errors),
                seconds=round(seconds, 2),
                requests_per_s=round(per_round / seconds, 2),
                ttft_p50_s=pct(result.ttft, 50),
                ttft_p99_s=pct(result.ttft, 99),
                free_blocks=free,
                total_blocks=total,
                rss_mb=rss[-1],
            )
        free_after, _ = wait_idle(http)
        for e in errors[:10]:
            log("error:", e)
        growth = None if rss[1] is None else round(rss[-1] - rss[1], 1)
        emit(
            measure="serve_load",
            git_sha=git_sha(),
            device=device_name(args.device),
            model=args.model or "embedded",
            concurrency=args.concurrency,
            requests=per_round * args.rounds,
            ok=ok,
            disconnected=hung_up,
            errors=len(errors),
            max_tokens=args.max_tokens,
            seconds=round(wall, 2),
            requests_per_s=round(per_round * args.rounds / wall, 2),
            output_tokens_per_s=round(tokens / wall, 1),
            ttft_p50_s=pct(all_ttft, 50),
            ttft_p99_s=pct(all_ttft, 99),
            free_blocks_before=free_before,
            free_blocks_after=free_after,
            total_blocks=total,
            rss_mb_before=rss_before,
            rss_mb_after=rss[-1],
            rss_mb_growth_after_first_round=growth,
        )
        failed = bool(errors) or free_after != total
        return 1 if failed else 0
    finally:
        http.close()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
