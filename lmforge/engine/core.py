"""The engine core in a process of its own: the Engine loop behind a ZeroMQ ROUTER socket, for `lmforge serve`.

HTTP front ends (lmforge.serve.core_client.EngineCoreClient, one per API-server process) connect a DEALER socket
each. Messages are msgpack (msgspec) arrays:

    front end -> core   ["hello"]                               the core answers ["ready", info]
                        ["add", request_id, input_ids, gen_config, response_format]
                        ["abort", request_id]
                        ["shutdown"]                            abort everything, stop the engine, exit 0
    core -> front end   ["ready", info]                         model name, session_len, vocab_size, block_size
                        ["out", columns, stats]                 the deltas of one step for this front end (pack_outputs)
                        ["stats", stats]                        when the engine goes idle

The loop blocks on the socket while there is nothing to run and otherwise steps the engine, reading every message
that arrived since the previous step first. Outputs carry token ids only: detokenization and stop strings are the
front end's (it aborts a request whose text hit a stop string), as are tokenization, chat templates, JSON and SSE.

A core whose parent process disappears stops by itself; the front end watches the core's pid and fails every
waiting request when it dies.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal

import msgspec

from lmforge.messages import GenerationConfig, PytorchEngineConfig

from .outputs import EngineStats, RequestOutput, TokenLogprob

logger = logging.getLogger(__name__)

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_IDLE_POLL_MS = 500  # how often an idle core checks that its parent is still there


def encode(msg) -> bytes:
    return _encode(msg)


def decode(data: bytes):
    return _decode(data)


def pack_outputs(outs: list[RequestOutput]) -> list:
    """One step's deltas for one front end as columns (msgpack arrays of plain values: cheaper to build, encode and
    decode than one record per delta): request ids, token ids, finish reasons, prompt and generated counts, then
    logprobs, errors and texts, each None when no delta has one."""
    lps = None
    if any(o.logprobs is not None for o in outs):
        lps = [None if o.logprobs is None else [(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs] for o in outs]
    errors = [o.error for o in outs] if any(o.error is not None for o in outs) else None
    texts = [o.text for o in outs] if any(o.text for o in outs) else None
    return [
        [o.request_id for o in outs],
        [o.token_ids for o in outs],
        [o.finish_reason for o in outs],
        [o.num_prompt_tokens for o in outs],
        [o.num_generated_tokens for o in outs],
        lps,
        errors,
        texts,
    ]


def unpack_outputs(cols: list) -> list[RequestOutput]:
    rids, tokens, finish, n_prompt, n_gen, lps, errors, texts = cols
    outs = [
        RequestOutput(rid, "", toks, None, fin, p, g)
        for rid, toks, fin, p, g in zip(rids, tokens, finish, n_prompt, n_gen, strict=True)
    ]
    if lps is not None:
        for out, lp in zip(outs, lps, strict=True):
            if lp is not None:
                out.logprobs = [TokenLogprob(tid, v, [(a, b) for a, b in top]) for tid, v, top in lp]
    if errors is not None:
        for out, error in zip(outs, errors, strict=True):
            out.error = error
    if texts is not None:
        for out, text in zip(outs, texts, strict=True):
            out.text = text
    return outs


_STAT_FIELDS = tuple(f.name for f in dataclasses.fields(EngineStats))


def pack_stats(s: EngineStats) -> tuple:
    return tuple(getattr(s, name) for name in _STAT_FIELDS)  # dataclasses.astuple deep-copies: 40x slower


def unpack_stats(t: list) -> EngineStats:
    return EngineStats(*t)


def pack_gen_config(cfg: GenerationConfig) -> dict:
    return dataclasses.asdict(cfg)


def unpack_gen_config(d: dict) -> GenerationConfig:
    return GenerationConfig(**d)


class EngineCore:
    """Serves one Engine on a bound ROUTER socket until a shutdown message (or its parent's death)."""

    def __init__(self, engine, socket, parent_pid: int | None = None):
        self.engine, self.socket = engine, socket
        engine.detokenize = False  # the front ends turn tokens into text and watch for stop strings
        self.parent_pid = parent_pid
        self.clients: set[bytes] = set()
        self.owner: dict[str, bytes] = {}  # request id -> the front end that sent it
        self.stopping = False

    def info(self) -> dict:
        e = self.engine
        return {
            "model_name": e.model_name,
            "session_len": e.session_len,
            "vocab_size": e.vocab_size,
            "block_size": e.engine_config.block_size,
            "enable_prefix_caching": e.engine_config.enable_prefix_caching,
            "pid": os.getpid(),
            "stats": pack_stats(e.stats()),
            "eos_token_ids": e.eos_token_ids,
        }

    def _send(self, client: bytes, msg) -> None:
        self.socket.send_multipart([client, encode(msg)])

    def _handle(self, client: bytes, msg: list, outputs: list[RequestOutput]) -> None:
        kind = msg[0]
        if kind == "add":
            _, rid, input_ids, gen, response_format = msg
            self.owner[rid] = client
            try:
                cfg = unpack_gen_config(gen)
                if response_format is not None:
                    cfg = dataclasses.replace(cfg, response_format=response_format)
                self.engine.add_request(input_ids, cfg, rid)
            except Exception as e:  # validated by the front end; anything left fails this request alone
                outputs.append(RequestOutput(rid, "", [], None, "error", len(input_ids), 0, f"{type(e).__name__}: {e}"))
        elif kind == "abort":
            out = self.engine.abort(msg[1])
            if out is not None:
                outputs.append(out)
        elif kind == "hello":
            self.clients.add(client)
            self._send(client, ["ready", self.info()])
        elif kind == "shutdown":
            self.stopping = True
            for rid in list(self.owner):
                out = self.engine.abort(rid)
                if out is not None:
                    outputs.append(out)
        else:
            logger.error("engine core: unknown message %r", kind)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        by_client: dict[bytes, list[RequestOutput]] = {}
        owner = self.owner
        for out in outputs:
            client = owner.get(out.request_id)
            if out.finish_reason is not None:
                owner.pop(out.request_id, None)
            if client is not None:
                outs = by_client.get(client)
                if outs is None:
                    by_client[client] = outs = []
                outs.append(out)
        stats = pack_stats(self.engine.stats())
        for client, outs in by_client.items():
            self._send(client, ["out", pack_outputs(outs), stats])

    def _parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def run(self) -> None:
        import zmq

        sock, engine = self.socket, self.engine
        was_busy = False
        while not self.stopping:
            busy = engine.has_unfinished()
            if busy or sock.poll(_IDLE_POLL_MS, zmq.POLLIN):
                outputs: list[RequestOutput] = []
                while True:
                    try:
                        client, data = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(client, decode(data), outputs)
                self._deliver(outputs)
            elif self._parent_gone():
                logger.warning("engine core: the server process is gone; stopping")
                break
            if self.stopping:
                break
            if engine.has_unfinished():
                try:
                    outputs = engine.step()
                except Exception:  # the engine fails requests itself; this guards the loop
                    logger.exception("engine step raised")
                    outputs = []
                self._deliver(outputs)
                was_busy = True
            elif was_busy:  # idle now: every front end gets the final gauges
                was_busy = False
                stats = ["stats", pack_stats(engine.stats())]
                for client in self.clients:
                    self._send(client, stats)


def _configure_logging(log_level: str) -> None:
    logging.basicConfig(level=getattr(logging, log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _router_socket(ctx, address: str):
    import zmq

    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 2000)
    # protocol-level heartbeats, answered by libzmq's I/O thread even while a long step runs: a front end on
    # another node learns of a dead core (or node) from the missing pongs
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
    sock.bind(address)
    return sock


def run_engine_core(
    model_path: str | None, cfg: PytorchEngineConfig, address: str, status, log_level: str = "WARNING"
) -> None:
    """The engine-core process: bind `address`, build the Engine, report ["ready", info] or ["error", message] on
    `status` (a multiprocessing Connection), then serve. SIGINT/SIGTERM are the server's to handle: it sends
    "shutdown" once its in-flight requests are done or aborted."""
    import zmq

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _configure_logging(log_level)
    ctx = zmq.Context()
    sock = _router_socket(ctx, address)
    parent = os.getppid()
    try:
        from .engine import Engine

        engine = Engine(model_path, cfg)
    except (OSError, ValueError) as e:  # a missing or broken model, a bad setting: the server says what
        status.send(["error", str(e)])
        raise SystemExit(1) from None
    except BaseException as e:
        logger.exception("engine core failed to start")
        status.send(["error", f"{type(e).__name__}: {e}"])
        raise SystemExit(1) from None
    core = EngineCore(engine, sock, parent)
    status.send(["ready", core.info()])
    status.close()
    try:
        core.run()
    finally:
        engine.close()
        sock.close()
        ctx.term()


class EngineCoreProcess:
    """The server's handle on one engine-core process: start it, wait for its engine, stop it."""

    def __init__(self, model_path: str | None, cfg: PytorchEngineConfig, address: str, log_level: str, index: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.address, self.index = address, index
        self._status, child_end = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=run_engine_core,
            args=(model_path, cfg, address, child_end, log_level),
            name=f"lmforge-engine-core{index}",
            daemon=False,  # it starts tensor-parallel workers of its own, which a daemon process may not
        )
        self.proc.start()
        child_end.close()
        self.info: dict | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.is_alive()

    def wait_ready(self) -> dict:
        """The core's info once its engine is built; raises RuntimeError (ValueError for a bad model or setting,
        with the core's own message) if it fails or dies first."""
        try:
            msg = self._status.recv()
        except EOFError:
            self.proc.join(5)
            raise RuntimeError(f"engine core {self.index} exited during start-up (code {self.proc.exitcode})") from None
        if msg[0] == "error":
            self.proc.join(10)
            raise ValueError(msg[1])
        self.info = msg[1]
        return self.info

    def stop(self, timeout: float = 30.0) -> int | None:
        """Tell the core to shut down (over its socket) and wait; kill it if it does not go."""
        if self.proc.is_alive():
            import zmq

            ctx = zmq.Context.instance()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self.address)
            sock.send(encode(["shutdown"]))
            self.proc.join(timeout)
            sock.close()
            if self.proc.is_alive():
                logger.warning("engine core %d did not stop in %.0f s; killing it", self.index, timeout)
                self.proc.kill()
                self.proc.join(5)
        return self.proc.exitcode


class _RayCoreActor:
    """An engine core as a Ray actor (made remote when Ray is first used): `bind` picks its TCP address on its node,
    `serve` builds the Engine there (its tensor-parallel ranks, if any, placed by its own RayExecutor) and runs the
    same EngineCore loop until "shutdown"."""

    def bind(self) -> str:
        import ray
        import zmq

        from .tp import free_port

        self.ctx = zmq.Context()
        port = free_port("0.0.0.0")
        self.sock = _router_socket(self.ctx, f"tcp://0.0.0.0:{port}")
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def serve(self, model_path: str | None, cfg: PytorchEngineConfig, log_level: str) -> int:
        _configure_logging(log_level)
        from .engine import Engine

        engine = Engine(model_path, cfg)
        try:
            EngineCore(engine, self.sock).run()
        finally:
            engine.close()
            self.sock.close()
            self.ctx.term()
        return 0


class RayEngineCore:
    """The server's handle on an engine core placed on the Ray cluster (`--dp N --distributed-executor-backend
    ray`): one GPU (or CPU) for its rank 0, anywhere in the cluster. Same interface as EngineCoreProcess; its
    liveness is seen through the socket's heartbeats (pid is None: it may run on another node)."""

    pid = None

    def __init__(self, model_path: str | None, cfg: PytorchEngineConfig, log_level: str, index: int):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.index, self._ray = index, ray
        device = cfg.device_type or ("cuda" if ray.cluster_resources().get("GPU") else "cpu")
        bundle = {"GPU": 1} if device == "cuda" else {"CPU": 1}
        resources = {"num_gpus": 1, "num_cpus": 0} if device == "cuda" else {"num_cpus": 1}
        # one group for all the replica's ranks (PACK: one node when it has room); the core takes bundle 0 and
        # its RayExecutor the others
        self.pg = placement_group([bundle] * cfg.tp, strategy="PACK")
        ray.get(self.pg.ready(), timeout=300)
        strategy = PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
        self.actor = ray.remote(_RayCoreActor).options(scheduling_strategy=strategy, **resources).remote()
        self.address = ray.get(self.actor.bind.remote(), timeout=300)
        self.ref = self.actor.serve.remote(model_path, cfg, log_level)
        self.info: dict | None = None

    def alive(self) -> bool:
        return not self._ray.wait([self.ref], timeout=0)[0]

    def wait_ready(self) -> dict:
        import zmq

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        sock.send(encode(["hello"]))
        try:
            while not sock.poll(500):
                done, _ = self._ray.wait([self.ref], timeout=0)
                if done:
                    try:
                        self._ray.get(done[0])
                    except Exception as e:
                        cause = getattr(e, "cause", None) or e
                        raise ValueError(f"engine core {self.index} failed to start: {cause}") from None
                    raise RuntimeError(f"engine core {self.index} stopped during start-up")
            msg = decode(sock.recv())
        finally:
            sock.close()
        self.info = msg[1]
        return self.info

    def stop(self, timeout: float = 30.0) -> int | None:
        import zmq

        done, _ = self._ray.wait([self.ref], timeout=0)
        if not done:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self.address)
            sock.send(encode(["shutdown"]))
            self._ray.wait([self.ref], timeout=timeout)
            sock.close()
        self._ray.kill(self.actor)
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.pg)
        return 0
