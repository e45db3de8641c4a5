"""CPU thread settings: the thread count the engine picks and the OpenMP wait policy set before torch loads."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from lmforge.cpu_threads import configure_cpu_threads, physical_cores
from lmforge.engine.startup import resolve_dtype
from lmforge.messages import PytorchEngineConfig


def test_physical_cores_within_the_affinity_set():
    n = physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_configure_cpu_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            monkeypatch.delenv(name, raising=False)
        assert configure_cpu_threads(0) == physical_cores()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert configure_cpu_threads(0) == 1  # the environment's setting is kept
        with pytest.raises(ValueError, match="cpu_threads"):
            configure_cpu_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_setting_is_checked():
    with pytest.raises(ValueError, match="cpu_threads"):
        PytorchEngineConfig(cpu_threads=-2)


def _policy_after_import(env: dict) -> str:
    code = "import lmforge, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_sets_passive_omp_wait_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy_after_import(env) == "PASSIVE"
    assert _policy_after_import({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def test_auto_dtype_on_cpu_says_what_it_chose(caplog):
    with caplog.at_level(logging.INFO, logger="lmforge.engine.startup"):
        dtype = resolve_dtype("auto", None, "cpu")
    assert dtype in (torch.float32, torch.bfloat16)
    assert f"dtype auto on CPU: {str(dtype).removeprefix('torch.')}" in caplog.text
