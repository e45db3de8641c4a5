"""engine.precompile: a helper builds the engine's model with one decoder layer and zero weights and runs its part
of the start-up through the engine's own code (on CPU here: the mechanics; the kernels compile on a GPU); the
setting is checked; a failing helper is reported, not raised."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmforge.engine import precompile
from lmforge.messages import PytorchEngineConfig


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_each_part_runs_one_layer_with_zero_weights(tiny_llama_dir):
    code = (
        "from lmforge.engine import engine as em, precompile\n"
        "from lmforge.messages import PytorchEngineConfig\n"
        "seen = []\n"
        "close = em.Engine.close\n"
        "def spy(self):\n"
        "    zero = all(bool((p == 0).all()) for p in self.model.parameters())\n"
        "    seen.append((self.model_config.num_layers, zero))\n"
        "    close(self)\n"
        "em.Engine.close = spy\n"
        "cfg = PytorchEngineConfig(device_type='cpu', max_prefill_token_num=128, block_size=16)\n"
        f"for part in {precompile.PARTS!r}:\n"
        f"    precompile.run_part(part, {tiny_llama_dir!r}, 'cpu', cfg)\n"
        "assert seen == [(1, True)] * len(precompile.PARTS), seen\n"
        "print('ok')\n"
    )
    result = _run(code)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_the_setting_is_checked(monkeypatch):
    monkeypatch.setenv("LMFORGE_PRECOMPILE", "yes")
    with pytest.raises(ValueError, match="LMFORGE_PRECOMPILE must be 0 or 1"):
        precompile.enabled()
    monkeypatch.setenv("LMFORGE_PRECOMPILE", "0")
    assert not precompile.enabled()


def test_a_failing_helper_is_logged_not_raised(tmp_path, caplog):
    helpers = precompile.start(str(tmp_path / "no-model"), PytorchEngineConfig(device_type="cpu"), 0)
    with caplog.at_level("WARNING"):
        helpers.wait(timeout_s=120)
    assert all(proc.returncode for _, proc, _ in helpers.procs)
    assert "kernel precompile (prefill) failed" in caplog.text
