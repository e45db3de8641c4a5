"""AsyncEngine: asyncio front over the Engine loop, which runs on its own thread.

Requests and aborts go to the loop through a thread-safe queue; each request's deltas come back
through an asyncio.Queue. A consumer that stops iterating (client gone) aborts its request, which
frees its KV blocks at the next loop turn.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator

from lmforge.messages import GenerationConfig, PytorchEngineConfig

from .engine import Engine
from .outputs import EngineStats, RequestOutput, TokenLogprob

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineStats", "RequestOutput", "TokenLogprob"]


class AsyncEngine:
    def __init__(
        self,
        model_path: str | None = None,
        backend_config: PytorchEngineConfig | None = None,
        engine: Engine | None = None,
    ):
        self.engine = engine or Engine(model_path, backend_config)
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.session_len = self.engine.session_len
        self.vocab_size = self.engine.vocab_size
        self.generation_defaults = self.engine.generation_defaults
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = self.engine.stats()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    # --- engine thread --------------------------------------------------------------------------
    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is None:
            return
        loop, q = target
        if out.finish_reason is not None:
            self._streams.pop(out.request_id, None)
        try:
            loop.call_soon_threadsafe(q.put_nowait, out)
        except RuntimeError:  # the consumer's event loop is gone
            pass

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, request_id, input_ids, gen_config, guide = msg
            try:
                self.engine.add_request(input_ids, gen_config, request_id, guide)
            except Exception as e:  # validated already; anything left is reported to the request alone
                self._deliver(RequestOutput(request_id, "", [], None, "error", len(input_ids), 0, str(e)))
        elif kind == "abort":
            out = self.engine.abort(msg[1])
            if out is not None:
                self._deliver(out)

    def _loop(self) -> None:
        while not self._closed:
            try:
                msg = self._inbox.get(timeout=None if not self.engine.has_unfinished() else 0)
            except queue.Empty:
                msg = None
            while msg is not None:
                if msg[0] == "close":
                    for request_id in list(self._streams):
                        self._handle(("abort", request_id))
                    self.engine.close()
                    return
                self._handle(msg)
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    msg = None
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception:  # the engine fails requests itself; this guards the loop
                    logger.exception("engine step raised")
                    outputs = []
                for out in outputs:
                    self._deliver(out)
            self._stats = self.engine.stats()

    # --- asyncio side ---------------------------------------------------------------------------
    async def generate(
        self, input_ids: list[int], gen_config: GenerationConfig, request_id: str | None = None, guide=None
    ) -> AsyncIterator[RequestOutput]:
        """Stream the deltas of one request. Raises RequestError/ContextLengthError before the first yield."""
        self.engine.validate_request(input_ids, gen_config)
        if self._closed:
            raise RuntimeError("the engine is closed")
        request_id = request_id or uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", request_id, list(input_ids), gen_config, guide))
        finished = False
        try:
            while True:
                out = await q.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self._streams.pop(request_id, None)
                self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def is_healthy(self) -> bool:
        """False once the engine loop has stopped (closed, or died on an error it could not contain)."""
        return not self._closed and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self._stats

    async def close(self) -> None:
        if self._closed:
            return
        self._inbox.put(("close",))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._closed = True
