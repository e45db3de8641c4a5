"""HTTP serving benchmark: streaming OpenAI-style clients against `lmforge serve` (or lmdeploy's api_server), the peer
kit's workload (token-id prompts, exact output lengths), at fixed request rates or all at once.

    python benchmarks/serve_bench.py --url http://127.0.0.1:23333 --request-rates 4,8,16,inf --plot bench.png
    python benchmarks/serve_bench.py --url http://127.0.0.1:23333 --api generate     # lmdeploy api_server

Per request rate one JSON line: request and token throughput, and TTFT / inter-token latency (ITL) / end-to-end
(E2E) latency mean, p50, p90 and p99, in seconds. `inf` sends every request at once; a finite rate draws Poisson
arrivals (seeded). With --plot, a PNG of output throughput and p99 latencies against the request rate (needs
matplotlib; without it the JSON lines are still written and the plot is skipped with a message).

Workload: `../shared/peer/bench_peer.py`'s draw for draw (seed 0: per request in_len, out_len in [100, 1024], then
in_len ids in [10, vocab - 1]); --input-len / --output-len change the ranges (tiny test models), --workload reads
a file written by `bench_peer.py --write-workload`. Every request asks for exactly out_len tokens (EOS ignored),
temperature 0.6, top_p 1.0, top_k 0 (sent: lmdeploy's GenerationConfig defaults to 50), as bench_peer.py does.

Endpoints (--api): `completions` posts the ids as an OpenAI `/v1/completions` prompt (a list of token ids) with
`stream_options.include_usage`, which lmforge serves; lmdeploy's `/v1/completions` reads a list as several
prompts, so for lmdeploy use `generate`, its `/generate` endpoint with `input_ids` (same streaming SSE framing,
token ids in each chunk). An ITL sample is the gap between two streamed chunks that carry output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field

VOCAB = 49152
TEMPERATURE, TOP_P = 0.6, 1.0


def workload(n: int, seed: int, vocab: int, in_range=(100, 1024), out_range=(100, 1024)) -> list[tuple[list, int]]:
    """bench_peer.gen_workload, draw for draw, with the length ranges as parameters."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        in_len = rng.randint(*in_range)
        out_len = rng.randint(*out_range)
        reqs.append(([rng.randint(10, vocab - 1) for _ in range(in_len)], out_len))
    return reqs


def load_workload(path: str) -> list[tuple[list, int]]:
    with open(path) as f:
        data = json.load(f)
    reqs = data["requests"] if isinstance(data, dict) else data
    return [(r["input_ids"], int(r["out_len"])) for r in reqs]


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunks: int = 0  # streamed events that carried output (several tokens each when the server merged them)
    error: str = ""


def _payload(api: str, model: str, ids: list[int], out_len: int) -> tuple[str, dict]:
    common = {"max_tokens": out_len, "temperature": TEMPERATURE, "top_p": TOP_P, "top_k": 0, "ignore_eos": True,
              "stream": True}  # fmt: skip
    if api == "generate":
        return "/generate", {"input_ids": ids, **common}
    body = {"model": model, "prompt": ids, "stream_options": {"include_usage": True}, **common}
    return "/v1/completions", body


def _parse(api: str, data: dict, res: Result) -> int:
    """Fold one SSE payload into `res`; returns how many output tokens it carries (0: no output in it)."""
    if "error" in data:
        raise RuntimeError(json.dumps(data["error"])[:300])
    if api == "generate":
        n = len(data.get("output_ids") or [])
        meta = data.get("meta_info") or {}
        res.prompt_tokens = meta.get("prompt_tokens") or res.prompt_tokens
        res.output_tokens += n
        return n
    if data.get("usage"):
        res.prompt_tokens = data["usage"]["prompt_tokens"]
        res.output_tokens = data["usage"]["completion_tokens"]
    choices = data.get("choices") or []
    return int(any(c.get("text") for c in choices))


async def _lines_aiohttp(session, url: str, body: dict, headers: dict):
    async with session.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            yield raw.decode().strip()


async def _lines_httpx(client, url: str, body: dict, headers: dict):
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:300]}")
        async for line in resp.aiter_lines():
            yield line.strip()


async def one_request(lines, api: str, model: str, ids: list[int], out_len: int) -> Result:
    path, body = _payload(api, model, ids, out_len)
    res = Result(prompt_tokens=len(ids))
    start = last = time.perf_counter()
    try:
        async for line in lines(path, body):
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            if _parse(api, json.loads(payload), res):
                res.chunks += 1
                now = time.perf_counter()
                if res.ttft == 0.0:
                    res.ttft = now - start
                else:
                    res.itls.append(now - last)
                last = now
        res.e2e = time.perf_counter() - start
        res.ok = res.ttft > 0
        if not res.ok:
            res.error = "no output"
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[Result], reqs, wall: float, rate: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    row = {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "wrong_length_requests": sum(r.output_tokens != n for r, (_, n) in zip(results, reqs, strict=True) if r.ok),
        "wall_s": round(wall, 3),
        "req_per_s": round(len(ok) / wall, 3),
        "out_tok_s": round(out_tokens / wall, 1),
        "total_tok_s": round((out_tokens + in_tokens) / wall, 1),
        "in_tokens": in_tokens,
        "out_tokens": out_tokens,
        "out_chunks": sum(r.chunks for r in ok),
    }
    for name, xs in (
        ("ttft", [r.ttft for r in ok]),
        ("itl", [x for r in ok for x in r.itls]),
        ("e2e", [r.e2e for r in ok]),
    ):
        row[f"{name}_mean_s"] = round(sum(xs) / len(xs), 5) if xs else float("nan")
        for p in (50, 90, 99):
            row[f"{name}_p{p}_s"] = round(_pct(xs, p), 5)
    errors = [r.error for r in results if not r.ok]
    if errors:
        row["first_error"] = errors[0]
    return row


def arrival_delays(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: all at 0 for rate inf, else Poisson arrivals."""
    rng = random.Random(seed + 7)
    delays, t = [], 0.0
    for _ in range(n):
        delays.append(t)
        if not math.isinf(rate):
            t += rng.expovariate(rate)
    return delays


async def run_shard(args, model: str, jobs: list[tuple[int, list[int], int, float]], start_at: float):
    """Send `jobs` (index, ids, out_len, delay) from this process, the first at wall-clock `start_at`; returns
    [(index, Result)] and the wall-clock time the last one ended."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    async def with_client(lines) -> list[tuple[int, Result]]:
        async def fire(i: int, ids: list[int], n: int, delay: float) -> tuple[int, Result]:
            await asyncio.sleep(max(0.0, start_at + delay - time.time()))
            if limit is None:
                return i, await one_request(lines, args.api, model, ids, n)
            async with limit:
                return i, await one_request(lines, args.api, model, ids, n)

        return list(await asyncio.gather(*(fire(*job) for job in jobs)))

    try:
        import aiohttp
    except ImportError:
        aiohttp = None
    if aiohttp is not None:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            base_url=args.url, connector=conn, timeout=aiohttp.ClientTimeout(total=args.timeout)
        ) as session:
            results = await with_client(lambda path, body: _lines_aiohttp(session, path, body, headers))
    else:
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits) as client:
            results = await with_client(lambda path, body: _lines_httpx(client, path, body, headers))
    return results, time.time()


def _shard_main(args, model, jobs, start_at):
    return asyncio.run(run_shard(args, model, jobs, start_at))


def run_rate(args, model: str, reqs, rate: float) -> dict:
    """One request rate: with --client-procs N the requests are dealt round-robin to N client processes (one
    Python process cannot parse tens of thousands of SSE events per second), all starting at one wall-clock
    instant; the latencies are measured in each and merged."""
    delays = arrival_delays(len(reqs), rate, args.seed)
    jobs = [(i, ids, n, delays[i]) for i, (ids, n) in enumerate(reqs)]
    procs = max(1, min(args.client_procs, len(jobs)))
    if procs == 1:
        start_at = time.time()
        shards = [asyncio.run(run_shard(args, model, jobs, start_at))]
    else:
        import multiprocessing as mp

        start_at = time.time() + 2.0  # time for the client processes to start and import aiohttp
        with mp.get_context("spawn").Pool(procs) as pool:
            shards = pool.starmap(_shard_main, [(args, model, jobs[k::procs], start_at) for k in range(procs)])
    results: list[Result | None] = [None] * len(reqs)
    for shard, _ in shards:
        for i, res in shard:
            results[i] = res
    wall = max(end for _, end in shards) - start_at
    return summarize(results, reqs, wall, rate)


def model_name(args) -> str:
    if args.model_name:
        return args.model_name
    import urllib.request

    req = urllib.request.Request(args.url + "/v1/models")
    if args.api_key:
        req.add_header("Authorization", f"Bearer {args.api_key}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["data"][0]["id"]


def plot(rows: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"serve_bench: matplotlib is not installed, so no plot was written to {path} "
              "(pip install matplotlib; the JSON lines above have every figure)", file=sys.stderr)  # fmt: skip
        return False
    finite = [r["request_rate"] for r in rows if r["request_rate"] != "inf"]
    inf_x = (max(finite) * 1.5 if finite else 1.0) if any(r["request_rate"] == "inf" for r in rows) else None
    xs = [inf_x if r["request_rate"] == "inf" else r["request_rate"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(xs, [r["out_tok_s"] for r in rows], "o-", label="output tok/s")
    ax1.plot(xs, [r["total_tok_s"] for r in rows], "s--", label="total tok/s")
    ax1.set_xlabel("request rate (req/s)")
    ax1.set_ylabel("tokens / s")
    ax1.legend()
    for key, label in (("ttft_p99_s", "TTFT p99"), ("itl_p99_s", "ITL p99"), ("e2e_p99_s", "E2E p99")):
        ax2.plot(xs, [r[key] for r in rows], "o-", label=label)
    ax2.set_yscale("log")
    ax2.set_xlabel("request rate (req/s)")
    ax2.set_ylabel("seconds")
    ax2.legend()
    if inf_x is not None:
        for ax in (ax1, ax2):
            ticks = sorted(set(finite)) + [inf_x]
            ax.set_xticks(ticks, [f"{t:g}" for t in sorted(set(finite))] + ["all at once"])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def _rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        rate = float(part)
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"request rates must be > 0 or inf, got {part!r}")
        rates.append(rate)
    return rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:23333", help="the server's base URL")
    p.add_argument("--api", choices=["completions", "generate"], default="completions",
                   help="completions: OpenAI /v1/completions with token-id prompts (lmforge); generate: lmdeploy's "
                   "/generate with input_ids")  # fmt: skip
    p.add_argument("--api-key", default=None)
    p.add_argument("--model-name", default=None, help="default: the first of /v1/models")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=VOCAB, help="token ids are drawn from [10, vocab - 1]")
    p.add_argument("--input-len", type=_range, default=(100, 1024), help="LO,HI of the prompt lengths")
    p.add_argument("--output-len", type=_range, default=(100, 1024), help="LO,HI of the output lengths")
    p.add_argument("--workload", default=None, help="a JSON workload from bench_peer.py --write-workload")
    p.add_argument("--request-rates", type=_rates, default=[math.inf],
                   help="comma-separated requests per second, 'inf' = all at once (default: inf)")  # fmt: skip
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds a request may take")
    p.add_argument("--warmup-requests", type=int, default=4,
                   help="short requests sent (and not counted) before the timed runs")  # fmt: skip
    p.add_argument("--client-procs", type=int, default=1,
                   help="client processes the requests are spread over (one Python process tops out at some "
                   "tens of thousands of SSE events per second; use several against a fast server)")  # fmt: skip
    p.add_argument("--plot", default=None, help="write a PNG of throughput and p99 latency vs request rate here")
    p.add_argument("--label", default=None, help="added to every JSON line (e.g. the server and model)")
    args = p.parse_args(argv)
    if args.workload:
        reqs = load_workload(args.workload)[: args.num_requests]
    else:
        reqs = workload(args.num_requests, args.seed, args.vocab, args.input_len, args.output_len)
    model = model_name(args) if args.api == "completions" else (args.model_name or "")
    if args.warmup_requests:  # the server's first requests (lazy imports and caches) are not timed
        warm = workload(args.warmup_requests, args.seed + 99, args.vocab, (16, 16), (4, 4))
        asyncio.run(run_shard(args, model, [(i, ids, n, 0.0) for i, (ids, n) in enumerate(warm)], time.time()))
    rows = []
    for rate in args.request_rates:
        row = run_rate(args, model, reqs, rate)
        row = {"bench": "serve", "label": args.label, "api": args.api, "url": args.url, **row}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.plot:
        plot(rows, args.plot, args.label or args.url)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
