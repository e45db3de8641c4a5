"""CPU thread settings for the engine: how many intra-op threads, and how idle OpenMP threads wait.

Imports nothing heavy (no torch at module level): `prefer_passive_omp_wait` must run before torch is imported,
because OpenMP reads OMP_WAIT_POLICY once, when torch's runtime loads.
"""

from __future__ import annotations

import logging
import math
import os
import sys

logger = logging.getLogger(__name__)

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def prefer_passive_omp_wait() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user set it (or torch is already loaded, when it is too late).

    With the default policy an OpenMP worker spins after each parallel region; on a machine whose cores are
    also busy with other work (other processes, or the server's own front-end and tokenizer threads) the
    spinning workers take the cores those need, and every parallel region then waits for a descheduled
    thread: on a loaded 2-core machine a 576x1536 decode GEMV took ~5-29 ms on 2 spinning threads and
    ~0.3 ms on 2 passive ones (benchmarks in docs/benchmarks.md). Passive workers sleep at once instead."""
    if "torch" in sys.modules:
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup v2 (cpu.max) or v1 (cfs quota) limit, rounded up; None when unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return max(1, math.ceil(quota / period)) if quota > 0 else None
    except (OSError, ValueError):
        return None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads of one core count once), capped by
    a cgroup CPU quota. Falls back to the CPU count where the topology cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/physical_package_id") as f:
                package = f.read().strip()
            with open(f"{base}/core_id") as f:
                core = f.read().strip()
        except OSError:
            cores = set()
            break
        cores.add((package, core))
    n = len(cores) or len(cpus)
    limit = _cgroup_cpu_limit()
    return max(1, min(n, limit) if limit else n)


def configure_cpu_threads(requested: int = 0) -> int:
    """Set torch's intra-op thread count for a CPU engine and return it: `requested` when > 0; else what
    OMP_NUM_THREADS / MKL_NUM_THREADS asked for (torch already applied it); else the physical cores."""
    import torch

    if requested < 0:
        raise ValueError(f"cpu_threads must be >= 0 (0: one per physical core), got {requested}")
    if requested:
        torch.set_num_threads(requested)
        source = "cpu_threads"
    elif any(os.environ.get(name) for name in _THREAD_ENV):
        source = "environment"
    else:
        torch.set_num_threads(physical_cores())
        source = "physical cores"
    n = torch.get_num_threads()
    logger.info(
        "CPU threads: %d (%s), OMP_WAIT_POLICY=%s", n, source, os.environ.get("OMP_WAIT_POLICY", "unset (spin)")
    )
    return n
