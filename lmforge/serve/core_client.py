"""EngineCoreClient: the server's engine when the engine cores run in processes of their own (`lmforge serve`).

It has AsyncEngine's ServingEngine protocol (generate / abort / stats / close / is_healthy), and talks to one or
more engine-core processes (lmforge.engine.core) over ZeroMQ. The cores send token ids; the text (and stop
strings) are made here, off the engine's process. With several cores (`--dp N`) a ReplicaRouter picks
the core of each request: the one that holds the longest cached prefix of its prompt unless that core is much
busier than the least-loaded one, else the least-loaded. Stats are summed over the cores for /metrics.

Every core's pid is watched: when one dies, every request waiting on it ends with finish_reason 'error' (the
client sees an error, not a hang), the client turns unhealthy and `on_core_death` is called (the server then
exits with a non-zero status).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

import psutil

from lmforge.engine.core import decode, encode, pack_gen_config, unpack_outputs, unpack_stats
from lmforge.engine.outputs import EngineStats, RequestOutput
from lmforge.engine.requests import validate_request
from lmforge.messages import GenerationConfig

logger = logging.getLogger(__name__)

_WATCH_S = 0.2


class ReplicaRouter:
    """Routes a prompt to a replica by load and by prefix: the chained hashes of the prompt's full blocks are
    remembered (bounded, least recently used first out) with the replica that was given them, so a conversation's
    next turn, whose prompt starts with the previous one, goes where its prefix is cached."""

    def __init__(self, num_replicas: int, block_size: int, max_slack: int = 4, capacity: int = 1 << 17):
        self.num_replicas, self.block_size = num_replicas, block_size
        self.max_slack = max_slack  # how many more requests in flight than the least-loaded a prefix hit may cost
        self.capacity = capacity
        self.table: OrderedDict[bytes, int] = OrderedDict()
        self.load = [0] * num_replicas
        self._next = 0

    def block_hashes(self, input_ids: list[int]) -> list[bytes]:
        bs, h, out = self.block_size, b"", []
        for start in range(0, len(input_ids) - bs + 1, bs):
            block = input_ids[start : start + bs]
            h = hashlib.blake2b(h + b"".join(t.to_bytes(4, "little") for t in block), digest_size=12).digest()
            out.append(h)
        return out

    def choose(self, input_ids: list[int], alive: list[bool] | None = None) -> int:
        alive = alive or [True] * self.num_replicas
        candidates = [i for i in range(self.num_replicas) if alive[i]]
        if not candidates:
            raise RuntimeError("no engine replica is running")
        hashes = self.block_hashes(input_ids)
        least = min(self.load[i] for i in candidates)
        hit = None
        for h in hashes:  # the longest prefix some replica was given
            r = self.table.get(h)
            if r is None or not alive[r]:
                break
            hit = r
        if hit is not None and self.load[hit] <= least + self.max_slack:
            choice = hit
        else:  # the least loaded, ties taken in turn
            n = self.num_replicas
            order = [(self._next + k) % n for k in range(n)]
            choice = next(i for i in order if alive[i] and self.load[i] == least)
            self._next = (choice + 1) % n
        for h in hashes:
            self.table[h] = choice
            self.table.move_to_end(h)
        while len(self.table) > self.capacity:
            self.table.popitem(last=False)
        return choice


class _Stream:
    """One request's outputs on their way to its consumer. The reader appends; the consumer takes everything there
    is at once, so one that fell behind (a slow client, a busy front end) gets one merged delta instead of a
    backlog of one-token ones, and the front end's work per token falls as its load rises."""

    __slots__ = ("replica", "items", "waiter")

    def __init__(self, replica: int):
        self.replica = replica
        self.items: list[RequestOutput] = []
        self.waiter: asyncio.Future | None = None

    def put(self, out: RequestOutput) -> None:
        self.items.append(out)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[RequestOutput]:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


def merge_deltas(outs: list[RequestOutput]) -> RequestOutput:
    """Consecutive deltas of one request as one: tokens, text and logprobs in order, the last one's finish."""
    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    lps = None
    if any(o.logprobs is not None for o in outs):
        lps = [lp for o in outs for lp in o.logprobs or ()]
    return RequestOutput(
        last.request_id,
        "".join(o.text for o in outs),
        [t for o in outs for t in o.token_ids],
        lps,
        last.finish_reason,
        max(o.num_prompt_tokens for o in outs),  # an error delta from a dead core carries zeros
        max(o.num_generated_tokens for o in outs),
        last.error,
    )


class _RequestText:
    """One request's text, made here from the core's token ids exactly as the Engine makes it in-process: a
    Detokenizer over the prompt, stop tokens never in the text, held-back text released at the finish, and a stop
    string ending the request (finish_reason 'stop', the text cut before it)."""

    def __init__(self, tokenizer, input_ids: list[int], cfg: GenerationConfig, eos_token_ids: list[int]):
        from lmforge.engine.detokenizer import Detokenizer

        self.detok = None
        if tokenizer is not None:
            self.detok = Detokenizer(tokenizer.hf, list(input_ids), cfg.skip_special_tokens, cfg.stop_words)
        self.stop_ids = set(cfg.stop_token_ids or ()) | (set() if cfg.ignore_eos else set(eos_token_ids))
        self.min_new_tokens = cfg.min_new_tokens
        self.hit_stop_string = False

    def apply(self, out: RequestOutput) -> RequestOutput:
        if self.detok is None or not out.token_ids:
            return out
        if not self.detok.stop_words and self.stop_ids.isdisjoint(out.token_ids):
            # nothing in this delta can end the request early: its tokens decode in one call
            parts = [self.detok.step(out.token_ids)[0]]
            if out.finish_reason in ("stop", "length"):
                parts.append(self.detok.flush())
            out.text = "".join(parts)
            return out
        first = out.num_generated_tokens - len(out.token_ids) + 1  # the count of the delta's first token
        parts = []
        for i, token in enumerate(out.token_ids):
            if token in self.stop_ids and first + i > self.min_new_tokens:
                continue  # the core finishes the request on it; its text is never shown
            piece, hit = self.detok.step([token])
            parts.append(piece)
            if hit:
                self.hit_stop_string = True
                out.token_ids = out.token_ids[: i + 1]
                if out.logprobs is not None:
                    out.logprobs = out.logprobs[: i + 1]
                out.num_generated_tokens = first + i
                out.finish_reason = "stop"
                break
        if out.finish_reason in ("stop", "length") and not self.hit_stop_string:
            parts.append(self.detok.flush())  # text held back as a possible stop-string prefix
        out.text = "".join(parts)
        return out


class EngineCoreClient:
    def __init__(
        self,
        addresses: list[str],
        pids: list[int],
        infos: list[dict],
        tokenizer,
        on_core_death: Callable[[str], None] | None = None,
    ):
        import zmq
        import zmq.asyncio

        info = infos[0]
        self.tokenizer = tokenizer
        if tokenizer is not None:  # the detokenizer's byte table, built now rather than inside the first request
            from lmforge.engine.detokenizer import token_bytes_table

            token_bytes_table(tokenizer.hf)
        self.model_name = info["model_name"]
        self.session_len = min(i["session_len"] for i in infos)
        self.vocab_size = info["vocab_size"]
        self.eos_token_ids = info["eos_token_ids"]
        self.generation_defaults: dict = {}  # the model's sampling defaults; the launcher's factory fills them in
        self.num_replicas = len(addresses)
        self.pids, self.addresses = pids, addresses
        self.on_core_death = on_core_death
        self._ctx = zmq.asyncio.Context()
        self._socks = []
        for address in addresses:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
            sock.connect(address)
            self._socks.append(sock)
        self.router = ReplicaRouter(self.num_replicas, info["block_size"])
        self._streams: dict[str, _Stream] = {}
        self._stats = [EngineStats(0, 0, 0, 0, 0.0, 0, 0)] * self.num_replicas
        self._alive = [True] * self.num_replicas
        # a core on this machine is watched by its pid; one elsewhere (Ray) by its socket's heartbeats
        self._procs = [psutil.Process(pid) if pid is not None else None for pid in pids]
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    @classmethod
    async def connect(cls, addresses, pids, tokenizer, on_core_death=None) -> EngineCoreClient:
        """Connect to running cores: each answers "hello" with its info (and its stats start flowing)."""
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        infos = []
        for address, pid in zip(addresses, pids, strict=True):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            await sock.send(encode(["hello"]))
            while True:
                if not await sock.poll(1000):
                    if pid is not None and (
                        not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                    ):
                        raise RuntimeError(f"engine core at {address} is not running")
                    continue
                msg = decode(await sock.recv())
                if msg[0] == "ready":
                    infos.append(msg[1])
                    break
            sock.close()
        client = cls(addresses, pids, infos, tokenizer, on_core_death)
        await client.start()
        return client

    async def start(self) -> None:
        for i, sock in enumerate(self._socks):
            await sock.send(encode(["hello"]))
            self._tasks.append(asyncio.create_task(self._read(i), name=f"lmforge-core{i}-reader"))
        self._tasks.append(asyncio.create_task(self._watch(), name="lmforge-core-watch"))
        for i, proc in enumerate(self._procs):
            if proc is None:
                self._tasks.append(asyncio.create_task(self._watch_socket(i), name=f"lmforge-core{i}-monitor"))

    # --- inbound ------------------------------------------------------------------------------
    async def _read(self, i: int) -> None:
        sock = self._socks[i]
        while True:
            msg = decode(await sock.recv())
            kind = msg[0]
            if kind == "out":
                for out in unpack_outputs(msg[1]):
                    self._deliver(out)
                self._stats[i] = unpack_stats(msg[2])
            elif kind == "stats":
                self._stats[i] = unpack_stats(msg[1])
            elif kind == "ready":  # the answer to this client's hello: the gauges before any traffic
                self._stats[i] = unpack_stats(msg[1]["stats"])

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finish_reason is not None:
            self._streams.pop(out.request_id, None)
            self.router.load[stream.replica] -= 1
        stream.put(out)

    async def _watch_socket(self, i: int) -> None:
        """A remote core: its connection dropping (the process or its node gone, or heartbeats unanswered for
        10 s) is its death."""
        import zmq
        from zmq.utils.monitor import parse_monitor_message

        monitor = self._socks[i].get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED and self._alive[i]:
                    self._core_died(i)
                    return
        finally:
            monitor.close()

    def _core_alive(self, i: int) -> bool:
        if self._procs[i] is None:
            return True  # see _watch_socket
        try:
            return self._procs[i].is_running() and self._procs[i].status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_WATCH_S)
            for i in range(self.num_replicas):
                if self._alive[i] and not self._core_alive(i):
                    self._core_died(i)

    def _core_died(self, i: int) -> None:
        self._alive[i] = False
        where = f"pid {self.pids[i]}" if self.pids[i] is not None else self.addresses[i]
        reason = f"the engine core process ({where}) died"
        logger.error("%s; failing its requests", reason)
        for rid, stream in list(self._streams.items()):
            if stream.replica == i:
                self._deliver(RequestOutput(rid, "", [], None, "error", 0, 0, reason))
        if self.on_core_death is not None:
            self.on_core_death(reason)

    # --- ServingEngine ------------------------------------------------------------------------
    async def generate(
        self, input_ids: list[int], gen_config: GenerationConfig, request_id: str | None = None, guide=None
    ) -> AsyncIterator[RequestOutput]:
        """Stream the deltas of one request. Raises RequestError/ContextLengthError before the first yield."""
        validate_request(input_ids, gen_config, self.vocab_size, self.session_len)
        if self._closed or not all(self._alive):
            raise RuntimeError("the engine is not running")
        request_id = request_id or uuid.uuid4().hex
        input_ids = list(input_ids)
        replica = self.router.choose(input_ids, self._alive)
        stream = _Stream(replica)
        self._streams[request_id] = stream
        self.router.load[replica] += 1
        spec = getattr(guide, "spec", None) if guide is not None else None
        text = _RequestText(self.tokenizer, input_ids, gen_config, self.eos_token_ids)
        await self._socks[replica].send(encode(["add", request_id, input_ids, pack_gen_config(gen_config), spec]))
        finished = False
        try:
            while True:
                out = text.apply(merge_deltas(await stream.take()))
                finished = out.finish_reason is not None
                # a stop string: the core still runs the request, so stop it there (its last outputs are dropped)
                if text.hit_stop_string and self._streams.pop(request_id, None) is not None:
                    self.router.load[replica] -= 1
                    await self._socks[replica].send(encode(["abort", request_id]))
                yield out
                if finished:
                    return
        finally:
            if not finished and self._streams.pop(request_id, None) is not None:
                self.router.load[replica] -= 1
                with contextlib.suppress(Exception):
                    self._socks[replica].send(encode(["abort", request_id]))  # queued; sent by the zmq I/O thread

    async def abort(self, request_id: str) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            await self._socks[target.replica].send(encode(["abort", request_id]))

    def is_healthy(self) -> bool:
        return not self._closed and all(self._alive)

    def stats(self) -> EngineStats:
        """The sum over the replicas (the KV usage of all their blocks together)."""
        live = self._stats
        total = sum(s.num_total_blocks for s in live)
        free = sum(s.num_free_blocks for s in live)
        return EngineStats(
            sum(s.num_running for s in live),
            sum(s.num_waiting for s in live),
            free,
            total,
            (total - free) / total if total else 0.0,
            sum(s.prompt_tokens_total for s in live),
            sum(s.generation_tokens_total for s in live),
            sum(s.prefix_cache_hit_tokens for s in live),
        )

    def replica_stats(self) -> list[EngineStats]:
        return list(self._stats)

    async def close(self) -> None:
        """Close the sockets (the cores belong to the process that started them)."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self._socks:
            sock.close()
        self._ctx.term()
