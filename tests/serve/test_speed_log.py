"""`lmforge serve --stats`: the periodic speed line computed from the engine's token counters."""

import asyncio
import logging

from lmforge.engine.outputs import EngineStats
from lmforge.serve.server import _log_speed


class _FakeEngine:
    def __init__(self):
        self.generated = 0

    def stats(self):
        self.generated += 50  # 50 tokens between two reads
        return EngineStats(2, 1, 10, 20, 0.5, 100, self.generated)


def test_speed_log_line(caplog):
    async def run():
        task = asyncio.create_task(_log_speed(_FakeEngine(), 0.05))
        await asyncio.sleep(0.2)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="lmforge.serve"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stats:")]
    assert lines, caplog.text
    rate = float(lines[0].split()[1])
    assert 0 < rate <= 50 / 0.05 + 1e-6  # 50 tokens over at least the 0.05 s interval
    assert lines[0].endswith("2 running, 1 waiting")
