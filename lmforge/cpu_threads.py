"""CPU thread settings for the engine: how many intra-op threads, and how idle OpenMP threads wait.

Imports nothing heavy (no torch at module level): `set_omp_wait_policy` must run before torch is imported,
because OpenMP reads its wait policy once, when torch's runtime loads.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

logger = logging.getLogger(__name__)

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


# libgomp: how long (iterations, ~10-30 us here) an idle OpenMP worker spins before it sleeps
_SPIN_COUNT = "10000"


def set_omp_wait_policy() -> None:
    """A short spin for idle OpenMP workers (GOMP_SPINCOUNT=10000) unless the user chose a policy (OMP_WAIT_POLICY
    or GOMP_SPINCOUNT set), or torch is already loaded, when it is too late (OpenMP reads it once).

    A decode step is ~150 small parallel regions a few microseconds apart. Sleeping workers (PASSIVE) must be
    woken for each, which on an idle virtual CPU costs more than the region: a 2-core Xeon VM ran SmolLM2-135M
    at 12 tok/s passive against 33 spinning ~10k iterations. libgomp's default spin (300k) is too long for a
    machine whose cores are also busy with other work (a spinning worker takes the core the next region waits
    for): the contention itself is handled by `CpuThreadGovernor`, which drops to one thread while it lasts."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = _SPIN_COUNT


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


def configure_cpu_threads(requested: int = 0) -> tuple[int, bool]:
    """Set torch's intra-op thread count for a CPU engine: `requested` when > 0; else what OMP_NUM_THREADS /
    MKL_NUM_THREADS asked for (torch already applied it); else the physical cores. Returns (threads, chosen
    here): a count the user chose is kept as it is; one chosen here may be narrowed by CpuThreadGovernor."""
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
    policy = os.environ.get("OMP_WAIT_POLICY") or f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'default')}"
    logger.info("CPU threads: %d (%s), OpenMP wait: %s", n, source, policy)
    return n, source == "physical cores"


class CpuThreadGovernor:
    """Runs torch's intra-op pool at full width while this process has its cores, and at one thread while other
    work contends for them.

    With N threads every parallel region waits for its slowest thread; when another process (or the server's
    own front end) takes a core, that thread is often descheduled and a decode step takes several scheduler
    slices: on a 2-core VM with one busy process beside it, 2 threads ran a SmolLM2 decode step in ~130 ms and
    1 thread in ~45 ms. Contention shows as involuntary context switches of this process, read once per step
    with getrusage: alone ~30-120 a second, beside one busy process ~700-1,200. When the rate over `window`
    steps exceeds `busy_rate` it drops to 1 thread; it tries full width again after `retry_s`, doubling that wait
    (up to `max_retry_s`) while the contention lasts."""

    def __init__(self, threads: int, window: int = 8, busy_rate: float = 400.0, retry_s: float = 2.0,
                 max_retry_s: float = 60.0):  # fmt: skip
        self.threads, self.window, self.busy_rate = threads, window, busy_rate
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self._wait_s = retry_s
        self._single_since: float | None = None
        self._probing = False  # the current window began with a return to full width
        self._steps = 0
        self._switches = 0
        self._window_start = time.monotonic()
        self._last = self._read()
        self.drops = 0  # times it fell back to one thread (for logs and tests)

    @staticmethod
    def _read() -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw

    def _new_window(self, now: float) -> None:
        self._steps = self._switches = 0
        self._window_start = now

    def after_step(self, now: float | None = None) -> None:
        import torch

        now = time.monotonic() if now is None else now
        count = self._read()
        delta, self._last = count - self._last, count
        if self._single_since is not None:  # one thread: try full width again after the wait
            if now - self._single_since >= self._wait_s:
                self._single_since = None
                self._probing = True
                self._new_window(now)
                torch.set_num_threads(self.threads)
            return
        self._steps += 1
        self._switches += delta
        if self._steps < self.window:
            return
        contended = self._switches > self.busy_rate * max(now - self._window_start, 1e-3)
        self._new_window(now)
        if contended:
            torch.set_num_threads(1)
            self._single_since = now
            self.drops += 1
            if self.drops == 1:
                logger.info("CPU cores contended by other work: 1 thread while it lasts (%d otherwise)", self.threads)
        # a failed probe doubles the wait before the next; a first drop after free cores waits retry_s
        self._wait_s = min(self._wait_s * 2, self.max_retry_s) if contended and self._probing else self.retry_s
        self._probing = False
