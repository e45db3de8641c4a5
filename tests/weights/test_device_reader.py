"""weights.device_reader against safetensors' own reader: the same tensors, bit for bit, whatever the chunking
(tensors larger than one buffer, more chunks than buffers), dtypes, empty and 0-d tensors; a short file fails."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.weights.device_reader import DeviceReader, read_header
from lmforge.weights.errors import WeightFileError
from lmforge.weights.files import iter_weights


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "big.bf16": torch.randn(37, 29, generator=g).to(torch.bfloat16),
        "f32": torch.randn(5, 3, generator=g),
        "f16": torch.randn(11, generator=g).half(),
        "i8": torch.randint(-128, 127, (9, 7), generator=g, dtype=torch.int8),
        "i64": torch.arange(13),
        "mask": torch.rand(17, generator=g) > 0.5,
        "fp8": torch.randn(6, 4, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
    }


def _reference(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), name


@pytest.mark.parametrize("buffer_bytes,num_buffers,num_threads", [(64, 2, 2), (100, 3, 1), (1 << 20, 8, 4)])
def test_reader_matches_safe_open(tmp_path, buffer_bytes, num_buffers, num_threads):
    path = str(tmp_path / "model.safetensors")
    save_file(_tensors(), path)
    reader = DeviceReader(torch.device("cpu"), num_buffers, buffer_bytes, num_threads)
    got = dict(reader.read(path, read_header(path)))
    _same(got, _reference(path))
    assert reader.bytes_read == sum(t.numel() * t.element_size() for t in _tensors().values())
    got2 = dict(reader.read(path, read_header(path)))  # the buffers are reused across files
    _same(got2, _reference(path))


def test_short_file_fails_with_its_name(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file(_tensors(), path)
    entries = read_header(path)
    with open(path, "r+b") as f:
        f.truncate(entries[-1].begin + 1)
    with pytest.raises(WeightFileError, match="model.safetensors ended early"):
        list(DeviceReader(torch.device("cpu"), 2, 64, 2).read(path, entries))


def test_an_unknown_dtype_leaves_the_file_to_safe_open(tmp_path):
    path = str(tmp_path / "model.safetensors")
    import numpy as np
    from safetensors.numpy import save_file as save_numpy

    save_numpy({"u16": np.arange(4, dtype=np.uint16), "f32": np.ones(2, dtype=np.float32)}, path)
    assert read_header(path) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_iter_weights_on_cuda_matches_safe_open(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file(_tensors(), path)
    got = {k: v.cpu() for k, v in iter_weights(path, device="cuda", progress=False)}
    _same(got, _reference(path))
    for k, v in iter_weights(path, dtype=torch.float16, device="cuda", progress=False):
        if _tensors()[k].dtype in (torch.float32, torch.bfloat16):
            assert v.dtype == torch.float16 and v.is_cuda, k


def test_the_reader_setting_is_checked(tmp_path, monkeypatch):
    path = str(tmp_path / "model.safetensors")
    save_file({"f32": torch.ones(2)}, path)
    monkeypatch.setenv("LMFORGE_SAFETENSORS_READER", "fast")
    with pytest.raises(ValueError, match="LMFORGE_SAFETENSORS_READER must be 'threads' or 'safe_open'"):
        list(iter_weights(path, device="cuda", progress=False))
