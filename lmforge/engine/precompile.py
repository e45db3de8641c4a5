"""Cold Triton cache: compile the kernels in helper processes while the engine loads its weights.

Triton compiles a kernel the first time it is launched, one after the other, in the launching process. With an
empty kernel cache an engine start would spend most of its time there. So a one-GPU engine that finds the cache
empty starts helper processes first: each builds the same model with one decoder layer and no weights (zeros),
and runs one part of what the engine's start runs — the memory-profile prefill and the warm-up steps (`prefill`),
or the CUDA-graph decode buckets (`decode`) — which compiles the same kernels into the shared cache folder
(TRITON_CACHE_DIR, set before they start). The engine waits for them before its own profile step, which then
finds the kernels compiled. A helper that fails or runs too long costs nothing but its time: the engine compiles
what is missing itself.

    python -m lmforge.engine.precompile PART MODEL_PATH DEVICE_INDEX CONFIG_JSON   (started by `start`)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

logger = logging.getLogger(__name__)
PARTS = ("prefill", "decode")
_SETTING = "LMFORGE_PRECOMPILE"


def enabled() -> bool:
    """LMFORGE_PRECOMPILE: `1` (the default: helpers on a cold cache) or `0` (the engine compiles alone)."""
    value = os.environ.get(_SETTING, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{_SETTING} must be 0 or 1, got {value!r}")
    return value == "1"


class Precompile:
    """The helper processes of one engine start, each with a temporary file holding its stderr."""

    def __init__(self, procs: list[tuple[str, subprocess.Popen, object]]):
        self.procs = procs
        self.started = time.perf_counter()

    def wait(self, timeout_s: float = 300.0) -> None:
        """Until every helper has exited (killed after timeout_s from their start)."""
        for part, proc, err in self.procs:
            left = max(0.1, timeout_s - (time.perf_counter() - self.started))
            try:
                proc.wait(left)
            except subprocess.TimeoutExpired:
                logger.warning("kernel precompile (%s) still running after %.0f s: stopped", part, timeout_s)
                proc.kill()
                proc.wait()
            if proc.returncode:
                err.seek(0)
                tail = err.read().decode(errors="replace").strip().splitlines()[-1:]
                logger.warning("kernel precompile (%s) failed, exit code %d: %s", part, proc.returncode, tail)
            err.close()
        logger.info("kernel precompile helpers done in %.1f s", time.perf_counter() - self.started)

    def kill(self) -> None:
        for _, proc, err in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()


def start(model_path: str, cfg, device_index: int) -> Precompile:
    """One helper per part, on the engine's GPU; their output goes to the engine's stderr only on failure."""
    import tempfile

    import lmforge

    config = json.dumps({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, default=str)
    root = os.path.dirname(os.path.dirname(os.path.abspath(lmforge.__file__)))  # this lmforge, in the helpers too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    procs = []
    for part in PARTS:
        cmd = [sys.executable, "-m", "lmforge.engine.precompile", part, model_path, str(device_index), config]
        err = tempfile.TemporaryFile()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        procs.append((part, proc, err))
    logger.info("Triton kernel cache is cold: compiling in %d helper processes beside the load", len(procs))
    return Precompile(procs)


def run_part(part: str, model_path: str, device: str, cfg) -> None:
    """In a helper process: an Engine of one decoder layer with zero weights and a small KV cache, built
    through the engine's own code so that its kernels are launched with the engine's shapes and options."""
    import torch

    from lmforge.engine import engine as engine_module
    from lmforge.engine import model_loader, worker

    def one_layer_source(*args, **kwargs):
        source = load_model_source(*args, **kwargs)
        source.hf_config.num_hidden_layers = 1
        source.model_config.num_layers = 1
        return source

    def zero_weights(model, *args, **kwargs) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()

    load_model_source = engine_module.load_model_source
    engine_module.load_model_source = one_layer_source
    engine_module.load_tokenizer = lambda *args, **kwargs: None  # the warm-up runs on token ids
    model_loader.load_model_weights = zero_weights
    worker.store_profile = lambda *args, **kwargs: None  # a one-layer profile is no use to the engine
    if part == "decode":  # only the graph buckets: no profile step, no warm-up
        worker.Worker.profile_peak_memory = lambda self, max_batch_size: 0
        engine_module.Engine.warmup = lambda self: None
    fields = {f.name for f in dataclasses.fields(type(cfg))}
    blocks = -(-(cfg.max_prefill_token_num + 256) // cfg.block_size) + 64
    changes = dict(num_gpu_blocks=blocks, eager_mode=part != "decode", device_type=device.split(":")[0])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if k in fields})
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    engine_module.Engine(model_path, cfg).close()


def main(argv: list[str]) -> int:
    from lmforge.messages import PytorchEngineConfig

    part, model_path, device_index, config = argv
    if part not in PARTS:
        raise SystemExit(f"unknown precompile part {part!r}; expected one of {PARTS}")
    os.environ[_SETTING] = "0"  # a helper never starts helpers of its own
    values = json.loads(config)
    cfg = PytorchEngineConfig(**{k: v for k, v in values.items() if k in PytorchEngineConfig.__dataclass_fields__})
    run_part(part, model_path, f"cuda:{device_index}" if device_index != "cpu" else "cpu", cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
