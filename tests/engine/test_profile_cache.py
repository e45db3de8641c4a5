"""engine.profile_cache: one key per (config, dtype, device, step, block size, versions, lmforge source); stored
profiles read back; a damaged file is no profile (it is measured again)."""

from __future__ import annotations

import pytest
import torch

from lmforge.configurations.hf_json import hf_config_from_dict
from lmforge.engine import profile_cache as pc


@pytest.fixture
def cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(pc, "_device_identity", lambda device: ["Fake GPU", 80 << 30, "12.8"])
    return tmp_path


def _config(tmp_path, **changes):
    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=256)
    cfg.update(changes)
    return hf_config_from_dict(cfg, str(tmp_path / "model"))


def test_the_key_changes_with_whatever_the_peak_depends_on(cache_home, tmp_path, monkeypatch):
    cuda = torch.device("cuda", 0)
    base = pc.profile_key(_config(tmp_path), torch.bfloat16, cuda, 8192, 64)
    assert base == pc.profile_key(_config(tmp_path), torch.bfloat16, cuda, 8192, 64)
    others = {
        pc.profile_key(_config(tmp_path, hidden_size=128), torch.bfloat16, cuda, 8192, 64),
        pc.profile_key(_config(tmp_path), torch.float16, cuda, 8192, 64),
        pc.profile_key(_config(tmp_path), torch.bfloat16, cuda, 4096, 64),
        pc.profile_key(_config(tmp_path), torch.bfloat16, cuda, 8192, 16),
    }
    monkeypatch.setattr(pc, "_device_identity", lambda device: ["Other GPU", 80 << 30, "12.8"])
    others.add(pc.profile_key(_config(tmp_path), torch.bfloat16, cuda, 8192, 64))
    monkeypatch.setattr(pc, "_device_identity", lambda device: ["Fake GPU", 80 << 30, "12.8"])
    monkeypatch.setattr(pc, "_source_digest", "edited lmforge")
    others.add(pc.profile_key(_config(tmp_path), torch.bfloat16, cuda, 8192, 64))
    assert base not in others and len(others) == 6


def test_the_source_digest_covers_lmforge(monkeypatch):
    monkeypatch.setattr(pc, "_source_digest", None)
    digest = pc._lmforge_source_digest()
    assert len(digest) == 64 and pc._lmforge_source_digest() is digest


def test_store_and_load(cache_home):
    assert pc.load_profile("k1") is None
    pc.store_profile("k1", 3 << 30, 200 << 20)
    assert pc.load_profile("k1") == (3 << 30, 200 << 20)
    assert (cache_home / "lmforge" / "profile" / "k1.json").is_file()
    assert not list((cache_home / "lmforge" / "profile").glob("*.tmp"))


@pytest.mark.parametrize("text", ["{", '{"peak_bytes": 5}', '{"peak_bytes": -1, "outside_allocator_bytes": 0}', "[]"])
def test_a_damaged_profile_is_measured_again(cache_home, text):
    folder = cache_home / "lmforge" / "profile"
    folder.mkdir(parents=True)
    (folder / "bad.json").write_text(text)
    assert pc.load_profile("bad") is None
