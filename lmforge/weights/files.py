"""Find and stream a model's weight files: safetensors (single or sharded), PyTorch .bin/.pt, or GGUF.

The model's `load_weights` consumes `iter_weights(...)` one `(name, tensor)` at a time, so peak host memory
stays near one tensor (safetensors and .bin are memory-mapped). Every failure is a `WeightFileError` that names
the file and says what to do, never a library traceback.
"""

import glob
import json
import os
import struct
import sys
import zipfile
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from lmforge.weights.errors import WeightFileError

__all__ = ["WeightFileError", "iter_weights", "find_weight_files", "prefetch_weight_files"]

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_CAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BIN_INDEX = "pytorch_model.bin.index.json"
_LOOKED_FOR = (
    f"*.safetensors (with or without {_SAFETENSORS_INDEX}), pytorch_model*.bin (with or without {_BIN_INDEX}), "
    "*.pt, or exactly one *.gguf"
)


def iter_weights(
    model_path: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    gguf_packed: dict[str, str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every weight under `model_path` (an HF folder or one weight file).

    16/32/64-bit float tensors are cast to `dtype` when given (integer and float8 tensors, a quantized
    checkpoint's own data, keep theirs); GGUF weights are
    dequantized to `dtype`, float32 when it is None, except the layers of `gguf_packed` (weights.gguf.gguf_pack_plan),
    which stay packed. Safetensors for a GPU are read by weights.device_reader (threads into pinned buffers, copied
    to the device asynchronously); elsewhere they are memory-mapped.
    """
    kind, files = find_weight_files(model_path)
    if kind == "gguf":
        from lmforge.weights.gguf import iter_gguf_weights  # needs the gguf package: only for GGUF files

        yield from iter_gguf_weights(files[0], dtype or torch.float32, device, progress, gguf_packed)
        return
    check, read = (_check_safetensors, _read_safetensors) if kind == "safetensors" else (_check_torch, _read_torch)
    for path in files:  # every file before the first tensor, so a bad last shard fails before a partial load
        check(path)
    if kind == "safetensors" and torch.device(device).type == "cuda" and _gpu_reader() == "threads":
        read = _device_reader(torch.device(device))
    disabled = not progress or not sys.stderr.isatty()
    for path in tqdm(files, desc="Loading weight files", unit="file", disable=disabled or len(files) == 1):
        for name, tensor in read(path, device):
            if dtype is not None and tensor.dtype in _CAST_DTYPES:
                tensor = tensor.to(dtype)
            yield name, tensor.to(device)


def prefetch_weight_files(model_path: str) -> int:
    """Ask the kernel to read the weight files into the page cache in the background (POSIX_FADV_WILLNEED), so
    the disk reads overlap CUDA start and the model build instead of the first tensors' copies. Returns the bytes
    asked for; 0 where the files cannot be found or the platform has no posix_fadvise (the load then reads them
    as before, and reports any problem with the files itself)."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    try:
        _, files = find_weight_files(model_path)
    except WeightFileError:
        return 0
    size = sum(os.path.getsize(p) for p in files)
    if size > _available_memory() // 2:  # reading it all ahead would push out what it needs first
        return 0
    total = 0
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            total += os.fstat(fd).st_size
        except OSError:
            pass
        finally:
            os.close(fd)
    return total


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def find_weight_files(model_path: str) -> tuple[str, list[str]]:
    """`(kind, paths)` with kind one of 'safetensors', 'torch', 'gguf'; checks every file exists up front."""
    if not os.path.exists(model_path):
        raise WeightFileError(f"Model path {model_path} does not exist.")
    if os.path.isfile(model_path):
        return _kind_of(model_path), [model_path]

    for index_name, kind in ((_SAFETENSORS_INDEX, "safetensors"), (_BIN_INDEX, "torch")):
        index_path = os.path.join(model_path, index_name)
        if os.path.isfile(index_path):
            return kind, _shards_from_index(index_path)
    for pattern, kind in (("*.safetensors", "safetensors"), ("pytorch_model*.bin", "torch"), ("*.pt", "torch")):
        files = sorted(glob.glob(os.path.join(model_path, pattern)))
        if files:
            return kind, files
    ggufs = sorted(glob.glob(os.path.join(model_path, "*.gguf")))
    if len(ggufs) == 1:
        return "gguf", ggufs
    if len(ggufs) > 1:
        names = ", ".join(os.path.basename(p) for p in ggufs)
        raise WeightFileError(f"Model folder {model_path} holds several GGUF files ({names}); pass one file's path.")
    raise WeightFileError(f"No weight files in {model_path}: looked for {_LOOKED_FOR}.")


def _kind_of(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    kinds = {".safetensors": "safetensors", ".bin": "torch", ".pt": "torch", ".pth": "torch", ".gguf": "gguf"}
    if suffix not in kinds:
        raise WeightFileError(f"Cannot tell the format of {path} from its suffix; expected {sorted(kinds)}.")
    return kinds[suffix]


def _shards_from_index(index_path: str) -> list[str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightFileError(f"Shard index {index_path} is unreadable or corrupt ({e}); re-download it.") from e
    folder = os.path.dirname(index_path)
    shards = sorted({os.path.join(folder, name) for name in weight_map.values()})
    missing = [os.path.basename(p) for p in shards if not os.path.isfile(p)]
    if missing:
        raise WeightFileError(
            f"Shard index {index_path} names files that are missing: {', '.join(missing)}. "
            "The download is incomplete; re-download the model."
        )
    return shards


def _corrupt(path: str, why: str) -> str:
    return f"Weight file {path} is corrupt or truncated ({why}). Re-download or re-convert it."


def _read_safetensors(path: str, device: str | torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except Exception as e:  # safetensors raises its own SafetensorError, OSError or RuntimeError
        raise WeightFileError(_corrupt(path, f"{type(e).__name__}: {e}")) from e


def _gpu_reader() -> str:
    """LMFORGE_SAFETENSORS_READER: `threads` (the default: weights.device_reader) or `safe_open` (safetensors'
    own reader, one tensor at a time through pageable memory)."""
    choice = os.environ.get("LMFORGE_SAFETENSORS_READER", "threads")
    if choice not in ("threads", "safe_open"):
        raise ValueError(f"LMFORGE_SAFETENSORS_READER must be 'threads' or 'safe_open', got {choice!r}")
    return choice


def _device_reader(device: torch.device):
    """A `read(path, device)` for safetensors on a GPU: weights.device_reader, or safe_open for a file with a
    dtype that reader does not know."""
    from lmforge.weights.device_reader import DeviceReader, read_header

    reader = DeviceReader(device)

    def read(path: str, _device) -> Iterator[tuple[str, torch.Tensor]]:
        entries = read_header(path)
        if entries is None:
            yield from _read_safetensors(path, device)
            return
        try:
            yield from reader.read(path, entries)
        except OSError as e:
            raise WeightFileError(_corrupt(path, f"{type(e).__name__}: {e}")) from e

    return read


def _check_safetensors(path: str) -> None:
    """Catch a truncated or garbled file before the first tensor is yielded, not halfway through the model.

    Layout: u64 header length, a JSON header of `{name: {dtype, shape, data_offsets: [begin, end]}}`, then the
    data; the largest `end` must fit in the file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise WeightFileError(_corrupt(path, f"only {size} bytes long"))
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > size - 8:
            raise WeightFileError(_corrupt(path, f"header claims {header_size} bytes but the file has {size}"))
        try:
            header = json.loads(f.read(header_size))
            data_end = max((entry["data_offsets"][1] for k, entry in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise WeightFileError(_corrupt(path, f"its header is not valid safetensors JSON: {e}")) from e
    if 8 + header_size + data_end > size:
        raise WeightFileError(_corrupt(path, f"tensor data ends at byte {8 + header_size + data_end}, file has {size}"))


def _check_torch(path: str) -> None:
    """torch.save writes a zip whose directory sits at the end, so truncation removes it; legacy (pre-1.6)
    files are a bare pickle, which starts with the PROTO opcode 0x80."""
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK":
        raise WeightFileError(_corrupt(path, "a zip archive without its central directory"))
    if head[:1] != b"\x80":
        raise WeightFileError(_corrupt(path, "neither a torch.save zip archive nor a pickle"))


def _read_torch(path: str, device: str | torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    # mmap needs the zip format torch.save has written since 1.6; older pickles load into memory
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... depending on the damage
        raise WeightFileError(_corrupt(path, f"{type(e).__name__}: {e}")) from e
    if not isinstance(state_dict, dict):
        raise WeightFileError(f"Weight file {path} holds a {type(state_dict).__name__}, not a state dict.")
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor):
            yield name, tensor
