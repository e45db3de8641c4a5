import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lmforge.weights import WeightFileError, find_weight_files, iter_weights


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(32, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 16, generator=g).to(torch.bfloat16),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "model.norm.weight": torch.ones(8),
        "model.position_ids": torch.arange(6),  # integer buffers keep their dtype
    }


def _load(path: str, **kwargs) -> dict[str, torch.Tensor]:
    return dict(iter_weights(path, progress=False, **kwargs))


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def _write_sharded(folder, state: dict[str, torch.Tensor]) -> None:
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[:3], names[3:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_single_safetensors_and_dtype(tmp_path):
    state = _state_dict()
    save_file(state, str(tmp_path / "model.safetensors"))
    _assert_same(_load(str(tmp_path)), state)
    _assert_same(_load(str(tmp_path / "model.safetensors")), state)
    half = _load(str(tmp_path), dtype=torch.float16)
    assert half["model.position_ids"].dtype == torch.int64
    assert all(t.dtype == torch.float16 for n, t in half.items() if n != "model.position_ids")
    assert torch.equal(half["model.norm.weight"], torch.ones(8, dtype=torch.float16))


def test_sharded_safetensors_reads_only_indexed_files(tmp_path):
    state = _state_dict()
    _write_sharded(tmp_path, state)
    save_file({"stray.weight": torch.zeros(2)}, str(tmp_path / "consolidated.safetensors"))  # not in the index
    assert find_weight_files(str(tmp_path))[1] == [
        str(tmp_path / "model-00001-of-00002.safetensors"),
        str(tmp_path / "model-00002-of-00002.safetensors"),
    ]
    _assert_same(_load(str(tmp_path)), state)


def test_index_naming_a_missing_shard(tmp_path):
    _write_sharded(tmp_path, _state_dict())
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(WeightFileError, match="model-00002-of-00002.safetensors"):
        _load(str(tmp_path))


def test_pytorch_bin_pt_and_legacy_pickle(tmp_path):
    state = _state_dict()
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    torch.save({"ignored": torch.zeros(1)}, tmp_path / "bin" / "training_args.bin")  # not pytorch_model*.bin
    _assert_same(_load(str(tmp_path / "bin")), state)
    torch.save(state, tmp_path / "weights.pt")
    _assert_same(_load(str(tmp_path / "weights.pt"), dtype=None), state)
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    _assert_same(_load(str(tmp_path / "legacy.bin")), state)


def test_bin_with_pickled_code_is_refused(tmp_path):
    """weights_only=True: a .bin that would run code on load is an error, not an executed payload."""
    path = tmp_path / "pytorch_model.bin"
    with open(path, "wb") as f:
        pickle.dump({"w": torch.zeros(1), "evil": os.system}, f, protocol=2)
    with pytest.raises(WeightFileError, match="pytorch_model.bin"):
        _load(str(path))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(WeightFileError, match="does not exist"):
        _load(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightFileError, match=r"No weight files.*\*\.safetensors.*pytorch_model\*\.bin.*\.gguf"):
        _load(str(tmp_path))
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(WeightFileError, match="several GGUF files"):
        _load(str(tmp_path))


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 40])
    elif how == "random":
        path.write_bytes(os.urandom(len(data)))
    else:  # header only: the data section is gone entirely
        path.write_bytes(data[:64])


@pytest.mark.parametrize("how", ["truncated", "random", "header-only"])
def test_damaged_safetensors_fail_before_any_tensor(tmp_path, how):
    _write_sharded(tmp_path, _state_dict())
    _damage(tmp_path / "model-00002-of-00002.safetensors", how)
    weights = iter_weights(str(tmp_path), progress=False)
    with pytest.raises(WeightFileError, match="corrupt or truncated") as info:
        next(weights)  # the first shard is fine, but nothing is yielded before every header checks out
    assert "model-00002-of-00002.safetensors" in str(info.value) and "Re-download" in str(info.value)


@pytest.mark.parametrize("how", ["truncated", "random", "header-only"])
def test_damaged_bin_raises(tmp_path, how):
    path = tmp_path / "pytorch_model.bin"
    torch.save(_state_dict(), path)
    _damage(path, how)
    with pytest.raises(WeightFileError, match="corrupt or truncated") as info:
        _load(str(tmp_path))
    assert "pytorch_model.bin" in str(info.value)


def test_corrupt_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(WeightFileError, match="model.safetensors.index.json"):
        _load(str(tmp_path))


@pytest.mark.gpu
def test_safetensors_straight_to_cuda(tmp_path):
    state = _state_dict()
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = _load(str(tmp_path), dtype=torch.bfloat16, device="cuda")
    assert all(t.is_cuda for t in loaded.values())
    assert torch.equal(loaded["model.embed_tokens.weight"].cpu(), state["model.embed_tokens.weight"].bfloat16())
