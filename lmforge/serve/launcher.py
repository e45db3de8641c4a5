"""`lmforge serve`'s processes: engine cores (one per `--dp` replica) and HTTP front ends (`--api-server-count`).

    launcher (this process)  takes the port, starts the engine cores and waits until their engines are built;
                             then, with one API server, serves HTTP itself; with N, starts N API-server processes
                             that accept on its listening socket (the kernel spreads connections) and watches them
    engine core i            lmforge.engine.core: Engine + ZeroMQ ROUTER at ipc://<tmp>/core<i>
    API server j             uvicorn + FastAPI + an EngineCoreClient connected to every core

A core that dies fails the requests waiting on it; its API servers then stop with status 1, and so does the
launcher. SIGINT/SIGTERM: the API servers finish (or, after --shutdown-timeout, abort) what is in flight, then the
launcher shuts the cores down.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time

from lmforge.engine.core import EngineCoreProcess
from lmforge.messages import PytorchEngineConfig

from .server import bind_socket, run_event_loop, serve_async

logger = logging.getLogger("lmforge.serve")


def _replica_configs(cfg: PytorchEngineConfig, dp: int) -> tuple[list[PytorchEngineConfig], list[dict], bool]:
    """Per replica: its engine config, its environment, and whether the replicas must start one after another
    (they share GPUs, so each must see the memory the ones before it took)."""
    import torch

    device = cfg.device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        threads = max(1, (os.cpu_count() or 1) // (dp * cfg.tp))
        env = {"OMP_NUM_THREADS": str(threads)} if dp > 1 else {}
        return [cfg] * dp, [env] * dp, False
    gpus = torch.cuda.device_count()
    if gpus >= dp * cfg.tp and dp > 1:  # every replica on GPUs of its own
        envs = [{"CUDA_VISIBLE_DEVICES": ",".join(str(i * cfg.tp + r) for r in range(cfg.tp))} for i in range(dp)]
        return [cfg] * dp, envs, False
    # replicas share the GPUs: each takes its share of the memory free when it starts, which is what the ones
    # before it left: replica i asks for c / (dp - i * c) of that, so all get c / dp of the memory free at first
    c = cfg.cache_max_entry_count
    cfgs = [dataclasses.replace(cfg, cache_max_entry_count=c / (dp - i * c)) for i in range(dp)]
    return cfgs, [{}] * dp, True


def _start_ray_cores(model_path: str | None, cfg: PytorchEngineConfig, dp: int, log_level: str) -> list:
    from lmforge.engine.core import RayEngineCore

    cores = []
    try:
        for i in range(dp):
            cores.append(RayEngineCore(model_path, cfg, log_level, i))
        for core in cores:
            core.wait_ready()
            logger.info("engine core %d ready on Ray (%s)", core.index, core.address)
    except BaseException:
        for core in cores:
            core.stop(timeout=5)
        raise
    return cores


def start_engine_cores(model_path: str | None, cfg: PytorchEngineConfig, dp: int, log_level: str, tmp: str):
    if cfg.distributed_executor_backend == "ray" and dp > 1:
        return _start_ray_cores(model_path, cfg, dp, log_level)
    cfgs, envs, sequential = _replica_configs(cfg, dp)
    cores: list[EngineCoreProcess] = []
    try:
        for i in range(dp):
            saved = {k: os.environ.get(k) for k in envs[i]}
            os.environ.update(envs[i])  # the spawned child inherits it
            try:
                cores.append(EngineCoreProcess(model_path, cfgs[i], f"ipc://{tmp}/core{i}", log_level, i))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            if sequential:
                cores[-1].wait_ready()
        for core in cores:
            if core.info is None:
                core.wait_ready()
            logger.info("engine core %d ready (pid %d, %s)", core.index, core.pid, core.address)
    except BaseException:
        for core in cores:
            core.stop(timeout=5)
        raise
    return cores


def _client_factory(addresses: list[str], pids: list[int], model_path, trust_remote_code: bool):
    async def factory(on_core_death):
        from lmforge.generation_defaults import load_generation_defaults
        from lmforge.model_source import load_model_source

        from .core_client import EngineCoreClient

        source = load_model_source(model_path, trust_remote_code, with_tokenizer=True)
        client = await EngineCoreClient.connect(addresses, pids, source.tokenizer, on_core_death)
        # the model's own sampling defaults, for what a request leaves unset (read here: the front end applies them)
        client.generation_defaults = load_generation_defaults(source.path, source.gguf_file)
        return client

    return factory


def _api_server_main(addresses, pids, model_path, trust_remote_code, sock, server_kwargs, log_level, ready) -> None:
    import sys

    # Ctrl-C reaches the whole process group; the launcher forwards it as SIGTERM, which is the one stop to honour
    # (a SIGINT landing before uvicorn installs its handlers would end this process with a traceback)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=getattr(logging, log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    factory = _client_factory(addresses, pids, model_path, trust_remote_code)
    sys.exit(run_event_loop(serve_async(factory, sock=sock, on_ready=ready.set, **server_kwargs)))


def serve_model(
    model_path: str | None,
    cfg: PytorchEngineConfig,
    dp: int = 1,
    api_server_count: int = 1,
    log_level: str = "INFO",
    **server_kwargs,
) -> int:
    """Run `lmforge serve` until a signal (status 0) or an engine core's death (status 1). Raises ValueError when
    an engine cannot start (a missing model, a bad setting), with the engine's message."""
    if dp < 1 or api_server_count < 1:
        raise ValueError(f"--dp and --api-server-count must be >= 1, got {dp} and {api_server_count}")
    sock = bind_socket(server_kwargs.get("host", "127.0.0.1"), server_kwargs.get("port", 23333))
    tmp = tempfile.mkdtemp(prefix="lmforge-serve-")
    cores: list[EngineCoreProcess] = []
    ray_started = False
    try:
        ray_started = cfg.distributed_executor_backend == "ray" and dp > 1 and _join_ray()
        cores = start_engine_cores(model_path, cfg, dp, log_level, tmp)
        addresses, pids = [c.address for c in cores], [c.pid for c in cores]
        kwargs = dict(server_kwargs, log_level=log_level.lower())
        if api_server_count == 1:
            factory = _client_factory(addresses, pids, model_path, cfg.trust_remote_code)
            return run_event_loop(serve_async(factory, sock=sock, **kwargs))
        return _run_api_servers(api_server_count, addresses, pids, model_path, cfg, sock, kwargs, log_level, cores)
    finally:
        for core in cores:
            core.stop()
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if ray_started:
            import ray

            ray.shutdown()


def _join_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("--distributed-executor-backend ray needs Ray: pip install 'lmforge[ray]'") from None
    from lmforge.engine.executor import join_ray

    return join_ray()


def _run_api_servers(n, addresses, pids, model_path, cfg, sock, kwargs, log_level, cores) -> int:
    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in range(n)]
    procs = [
        ctx.Process(
            target=_api_server_main,
            args=(addresses, pids, model_path, cfg.trust_remote_code, sock, kwargs, log_level, ready[j]),
            name=f"lmforge-api{j}",
        )
        for j in range(n)
    ]
    stopping: list[int] = []

    def forward(signum, _frame) -> None:
        stopping.append(signum)
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    def clean(p) -> bool:
        # an API server still starting when the stop came has no handler yet and dies of the SIGTERM it was sent:
        # it was serving nothing, so that is a clean stop
        return p.exitcode == 0 or (bool(stopping) and p.exitcode == -signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        announced = False
        status = 0
        while any(p.is_alive() for p in procs):
            failed = [p for p in procs if p.exitcode is not None and not clean(p)]
            dead_core = [c for c in cores if not c.alive()]
            if (failed or dead_core) and not stopping:
                status = 1
                for p in failed:
                    logger.error("API server %s exited with status %s", p.name, p.exitcode)
                forward(signal.SIGTERM, None)
            if not announced and not stopping and all(e.is_set() for e in ready):
                announced = True
                logger.info("%d API servers on http://%s:%d", n, kwargs["host"], sock.getsockname()[1])
            time.sleep(0.2)
        if not all(clean(p) for p in procs):
            status = 1
        return status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
