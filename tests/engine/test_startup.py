"""Start-up: the Triton kernel cache folder, the weight-file prefetch, the phase breakdown, and that the config
and weights of a built-in family load without importing transformers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmforge.engine.engine import Engine
from lmforge.engine.startup import configure_triton_cache, default_triton_cache_dir
from lmforge.messages import PytorchEngineConfig
from lmforge.weights.files import prefetch_weight_files


def test_triton_cache_defaults_to_the_lmforge_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path, entries = configure_triton_cache()
    assert path == default_triton_cache_dir() == str(tmp_path / "lmforge" / "triton")
    assert os.environ["TRITON_CACHE_DIR"] == path and os.path.isdir(path) and entries == 0
    os.mkdir(os.path.join(path, "kernelhash"))
    assert configure_triton_cache() == (path, 1)


def test_triton_cache_keeps_the_users_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert configure_triton_cache() == (str(tmp_path / "mine"), 0)
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "file"))
    with pytest.raises(RuntimeError, match="TRITON_CACHE_DIR"):
        configure_triton_cache()


def test_prefetch_weight_files(tiny_llama_dir, tmp_path):
    size = sum(os.path.getsize(os.path.join(tiny_llama_dir, f)) for f in os.listdir(tiny_llama_dir) if ".safet" in f)
    assert size > 0 and prefetch_weight_files(tiny_llama_dir) == size
    assert prefetch_weight_files(str(tmp_path / "missing")) == 0


def test_load_breakdown_phases_sum_to_the_load_time(tiny_llama_dir):
    engine = Engine(tiny_llama_dir, PytorchEngineConfig(device_type="cpu", num_cpu_blocks=16, block_size=8))
    phases = ["device_s", "source_s", "build_s", "weights_s", "profile_s", "kv_cache_s", "graphs_s"]
    phases += ["tokenizer_wait_s", "warmup_s"]
    assert list(engine.load_breakdown) == phases
    assert all(v >= 0 for v in engine.load_breakdown.values())
    assert sum(engine.load_breakdown.values()) == pytest.approx(engine.load_seconds, abs=0.04)
    assert type(engine.source.hf_config).__name__ == "HFConfig"  # read without transformers
    assert engine.triton_cache_dir is None  # CPU: no Triton


def test_config_and_weights_load_without_transformers(tiny_llama_dir):
    """The engine's hot path up to the tokenizer (which needs transformers and loads on its own thread)."""
    code = (
        "import sys, torch\n"
        "from lmforge.engine.model_loader import build_model\n"
        "from lmforge.model_inputs import StepContextManager\n"
        "from lmforge.model_source import load_model_source\n"
        f"source = load_model_source({tiny_llama_dir!r}, with_tokenizer=False)\n"
        "build_model(source, torch.float32, torch.device('cpu'), StepContextManager())\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')\n"
        "assert not loaded, loaded[:5]\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_custom_module_map_gets_transformers_config(tiny_llama_dir, tmp_path):
    """A user's model class or ConfigBuilder may hand the config to transformers code: it gets HF's own."""
    from transformers import PretrainedConfig

    from lmforge.model_source import load_hf_config

    module_map = tmp_path / "module_map.py"
    module_map.write_text("MODULE_MAP = {}\n")
    assert isinstance(load_hf_config(tiny_llama_dir, custom_module_map=str(module_map)), PretrainedConfig)
    assert type(load_hf_config(tiny_llama_dir)).__name__ == "HFConfig"


def test_short_gil_switch_is_restored():
    import sys

    from lmforge.engine.startup import short_gil_switch

    before = sys.getswitchinterval()
    first, second = short_gil_switch(0.0005), short_gil_switch(0.0005)
    first.__enter__()
    second.__enter__()  # two engines starting at once
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    first.__exit__(None, None, None)
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


def test_cuda_start_thread_leaves_errors_to_the_engine():
    """Without a GPU the thread's CUDA start fails quietly; the engine's own first CUDA call reports it."""
    import torch

    from lmforge.engine.startup import start_cuda_context

    thread = start_cuda_context()
    thread.join(timeout=120)
    assert not thread.is_alive()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA was asked for"):
            Engine(None, PytorchEngineConfig(device_type="cuda"))
