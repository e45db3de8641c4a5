"""CPU thread settings: the thread count the engine picks, the OpenMP wait policy set before torch loads, and the
governor that narrows the pool to one thread while other work contends for the cores."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from lmforge.cpu_threads import CpuThreadGovernor, configure_cpu_threads, physical_cores
from lmforge.engine.startup import resolve_dtypes
from lmforge.messages import PytorchEngineConfig


def test_physical_cores_within_the_affinity_set():
    n = physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_configure_cpu_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads(1) == (1, False) and torch.get_num_threads() == 1
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            monkeypatch.delenv(name, raising=False)
        assert configure_cpu_threads(0) == (physical_cores(), True)  # chosen here: the governor may narrow it
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert configure_cpu_threads(0) == (1, False)  # the environment's setting is kept
        with pytest.raises(ValueError, match="cpu_threads"):
            configure_cpu_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_setting_is_checked():
    with pytest.raises(ValueError, match="cpu_threads"):
        PytorchEngineConfig(cpu_threads=-2)


def _policy_after_import(env: dict) -> tuple[str, str]:
    code = "import lmforge, os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return tuple(out.stdout.split())


def test_import_sets_a_short_omp_spin_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert _policy_after_import(env) == ("None", "10000")
    assert _policy_after_import({**env, "OMP_WAIT_POLICY": "PASSIVE"}) == ("PASSIVE", "None")
    assert _policy_after_import({**env, "GOMP_SPINCOUNT": "0"}) == ("None", "0")


class _Switches:
    """Stands in for getrusage's involuntary context switches."""

    def __init__(self):
        self.count = 0

    def __call__(self) -> int:
        return self.count


def test_governor_narrows_to_one_thread_while_the_cores_are_contended(monkeypatch):
    switches = _Switches()
    monkeypatch.setattr(CpuThreadGovernor, "_read", staticmethod(switches))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gov = CpuThreadGovernor(2, window=4, busy_rate=400, retry_s=2.0, max_retry_s=8.0)
        now = gov._window_start
        for _ in range(8):  # alone: a few switches a step (100 a second)
            now += 0.03
            switches.count += 3
            gov.after_step(now)
        for _ in range(4):  # long steps (a large batch) see more switches at the same rate
            now += 0.3
            switches.count += 30
            gov.after_step(now)
        assert torch.get_num_threads() == 2 and gov.drops == 0
        for _ in range(4):  # another process takes a core: ~900 a second
            now += 0.13
            switches.count += 120
            gov.after_step(now)
        assert torch.get_num_threads() == 1 and gov.drops == 1
        gov.after_step(now + 1.0)
        assert torch.get_num_threads() == 1  # waits retry_s before trying again
        now += 2.0
        gov.after_step(now)
        assert torch.get_num_threads() == 2  # a probe at full width
        for _ in range(4):  # still contended: back to one thread, and the next probe waits twice as long
            switches.count += 120
            now += 0.13
            gov.after_step(now)
        assert torch.get_num_threads() == 1 and gov.drops == 2
        gov.after_step(now + 3.0)
        assert torch.get_num_threads() == 1
        now += 4.0
        gov.after_step(now)
        assert torch.get_num_threads() == 2
        for _ in range(4):  # the cores are free again: stays at full width, the wait resets
            switches.count += 2
            now += 0.03
            gov.after_step(now)
        assert torch.get_num_threads() == 2 and gov._wait_s == 2.0
        for _ in range(4):  # contended again later: a first drop after free cores waits retry_s, not twice it
            switches.count += 120
            now += 0.13
            gov.after_step(now)
        assert torch.get_num_threads() == 1 and gov.drops == 3
        now += 2.0
        gov.after_step(now)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_thread_count_the_user_chose_is_not_governed(tiny_llama_dir):
    from lmforge.engine.engine import Engine

    cfg = dict(device_type="cpu", num_cpu_blocks=16, block_size=16)
    before = torch.get_num_threads()
    try:
        pinned = Engine(tiny_llama_dir, PytorchEngineConfig(cpu_threads=1, **cfg))
        assert pinned._thread_governor is None
        pinned.close()
        if physical_cores() > 1:
            auto = Engine(tiny_llama_dir, PytorchEngineConfig(**cfg))
            assert auto._thread_governor is not None and auto._thread_governor.threads == physical_cores()
            auto.close()
    finally:
        torch.set_num_threads(before)


def test_auto_dtype_on_cpu_says_what_it_chose(caplog):
    """float32 compute gets a float16 KV cache (where the CPU kernels read it), bfloat16 compute its own dtype's;
    the log line names both."""
    from lmforge.kernels import cpu as cpu_kernels

    with caplog.at_level(logging.INFO, logger="lmforge.engine.startup"):
        dtype, kv_cache_dtype = resolve_dtypes("auto", None, "cpu")
    half = dtype == torch.float32 and cpu_kernels.available()
    assert (dtype, kv_cache_dtype) in ((torch.float32, "float16" if half else "auto"), (torch.bfloat16, "auto"))
    kv_words = "float16" if half else str(dtype).removeprefix("torch.")
    assert f"dtype auto on CPU: {str(dtype).removeprefix('torch.')}" in caplog.text
    assert f"KV cache {kv_words}" in caplog.text
    # what the user names stays: an explicit float32 cache, a quantized one, an explicit dtype
    assert resolve_dtypes("auto", None, "cpu", "float32")[1] == "float32"
    assert resolve_dtypes("auto", None, "cpu", "auto", 8)[1] == "auto"
    assert resolve_dtypes("float32", None, "cpu") == (torch.float32, "auto")
    saved = cpu_kernels._lib, cpu_kernels._tried
    cpu_kernels._lib, cpu_kernels._tried = None, True  # no C compiler: torch's attention, faster over float32
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lmforge.engine.startup"):
            dtype, kv_cache_dtype = resolve_dtypes("auto", None, "cpu")
        assert kv_cache_dtype == "auto"
        if dtype == torch.float32:
            assert "KV cache float32 (the CPU kernels are off" in caplog.text
    finally:
        cpu_kernels._lib, cpu_kernels._tried = saved
