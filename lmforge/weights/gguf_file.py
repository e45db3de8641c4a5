"""GGUF container reader: metadata, tensor table and zero-copy views of tensor bytes.

`gguf.GGUFReader` builds a numpy memmap view for every string of the vocabulary, which takes about 2 s on a
49k-token file before any weight is touched; walking the same header with `struct.unpack_from` takes about 0.1 s.
Value types, quant type ids and block sizes still come from the `gguf` package. Used by `gguf.py`.
"""

import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from lmforge.weights.errors import WeightFileError

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32  # llama.cpp's, used when general.alignment is absent
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES = {kind: np.dtype(fmt) for kind, fmt in _SCALAR_FORMATS.items()}


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order, e.g. [out_features, in_features]; GGUF lists dims fastest-first
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name


@dataclass(slots=True)
class GGUFFile:
    """A parsed GGUF file. The tensor bytes stay in a private copy-on-write mapping until `raw` reads them."""

    path: str
    metadata: dict[str, object]
    tensors: dict[str, GGUFTensorInfo]
    buffer: mmap.mmap

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: object = None) -> object:
        """`{architecture}.{key}` from the metadata, e.g. `arch_value('block_count')`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def raw(self, info: GGUFTensorInfo) -> torch.Tensor:
        """The stored bytes of one tensor as a flat uint8 tensor sharing memory with the file mapping."""
        return torch.frombuffer(self.buffer, dtype=torch.uint8, count=info.nbytes, offset=info.offset)


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's header and check that every tensor's bytes lie inside the file.

    One engine start reads the same file for its config, its pack plan and its weights: the parse (~0.4 s for a
    49k-token vocabulary) is cached per (path, size, mtime), so a rewritten file is parsed again. Callers must not
    modify the returned metadata."""
    stat = os.stat(path)
    return _read_cached(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return _read(path)


def _read(path: str) -> GGUFFile:
    size = os.path.getsize(path)
    if size < 24:  # magic, version, tensor count, kv count
        raise WeightFileError(_broken(path, f"it is only {size} bytes long"))
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        metadata, tensors = _parse(buffer, size, path)
    except WeightFileError:
        raise
    except (struct.error, ValueError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        raise WeightFileError(_broken(path, f"its header does not parse ({e})")) from e
    return GGUFFile(path, metadata, tensors, buffer)


def _broken(path: str, why: str) -> str:
    return (
        f"GGUF file {path} is corrupt or truncated: {why}. "
        "Re-download it or re-convert it with llama.cpp's convert_hf_to_gguf.py."
    )


def _parse(buf: mmap.mmap, size: int, path: str) -> tuple[dict[str, object], dict[str, GGUFTensorInfo]]:
    if buf[:4] != _MAGIC:
        raise WeightFileError(_broken(path, f"it does not start with the GGUF magic (found {buf[:4]!r})"))
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        hint = " (a big-endian file? convert it with gguf_convert_endian)" if version > 0xFFFF else ""
        raise WeightFileError(_broken(path, f"unsupported GGUF version {version}{hint}"))
    # every kv pair takes at least 12 bytes and every tensor entry at least 24: bounds absurd counts early
    if kv_count * 12 > size or tensor_count * 24 > size:
        raise WeightFileError(_broken(path, f"its header claims {kv_count} keys and {tensor_count} tensors"))
    reader = _HeaderReader(buf, size, 24)
    metadata: dict[str, object] = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(reader.u32())

    entries = []
    for _ in range(tensor_count):
        name = reader.string()
        num_dims = reader.u32()
        if num_dims > 8:
            raise WeightFileError(_broken(path, f"tensor {name!r} has {num_dims} dimensions"))
        dims = struct.unpack_from(f"<{num_dims}Q", buf, reader.pos)
        reader.pos += 8 * num_dims
        ggml_type, offset = reader.u32(), reader.u64()
        entries.append((name, dims, ggml_type, offset))

    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-reader.pos // alignment) * alignment
    tensors = {}
    for name, dims, ggml_type, offset in entries:
        nbytes = _tensor_nbytes(name, dims, ggml_type, path)
        info = GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, data_start + offset, nbytes)
        if info.offset + nbytes > size:
            raise WeightFileError(
                _broken(path, f"tensor {name!r} ends at byte {info.offset + nbytes} but the file has {size} bytes")
            )
        tensors[name] = info
    return metadata, tensors


def _tensor_nbytes(name: str, dims: tuple[int, ...], ggml_type: int, path: str) -> int:
    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise WeightFileError(
            f"GGUF file {path}: tensor {name!r} has unknown ggml type id {ggml_type}; the file is corrupt or "
            "newer than the installed gguf package (try `pip install -U gguf`)."
        ) from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if dims and dims[0] % block_size:
        raise WeightFileError(_broken(path, f"tensor {name!r} row of {dims[0]} is not a multiple of {block_size}"))
    num_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
    return num_elements // block_size * type_size


class GGUFStrings(Sequence):
    """A header array of strings (the vocabulary, the merges), decoded when first read: a load whose tokenizer
    comes from lmforge's tokenizer cache never reads them (~0.3 s of a 49k-token file's header)."""

    def __init__(self, buf: mmap.mmap, starts: list[int], ends: list[int]) -> None:
        self._buf, self._starts, self._ends = buf, starts, ends
        self._values: list[str] | None = None

    def _decoded(self) -> list[str]:
        if self._values is None:
            buf, spans = self._buf, zip(self._starts, self._ends, strict=True)
            self._values = [buf[a:b].decode("utf-8", errors="replace") for a, b in spans]
        return self._values

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index):
        return self._decoded()[index]

    def __iter__(self):
        return iter(self._decoded())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (GGUFStrings, list, tuple)):
            return self._decoded() == list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"GGUFStrings({len(self)} strings)"


class _HeaderReader:
    """A cursor over the header; every read is bounds-checked so a truncated file fails with struct.error."""

    def __init__(self, buf: mmap.mmap, size: int, pos: int) -> None:
        self.buf, self.size, self.pos = buf, size, pos

    def u32(self) -> int:
        (value,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return value

    def string(self) -> str:
        length = self.u64()
        end = self.pos + length
        if end > self.size:
            raise ValueError(f"a string of {length} bytes runs past the end of the file")
        text = self.buf[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, kind: int) -> object:
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            return self.array()
        fmt = _SCALAR_FORMATS.get(kind)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {kind}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def array(self) -> list:
        kind, count = self.u32(), self.u64()
        if kind in _NUMPY_DTYPES:  # numeric arrays (token types, scores) in one numpy read
            dtype = _NUMPY_DTYPES[kind]
            if self.pos + count * dtype.itemsize > self.size:
                raise ValueError(f"an array of {count} values runs past the end of the file")
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
            self.pos += count * dtype.itemsize
            return values
        if count * 8 > self.size - self.pos:
            raise ValueError(f"an array of {count} values runs past the end of the file")
        if kind == GGUFValueType.STRING:  # the vocabulary: only the lengths are walked here, the text on first use
            starts, ends = [0] * count, [0] * count
            buf, pos, size, unpack = self.buf, self.pos, self.size, struct.unpack_from
            for i in range(count):
                (length,) = unpack("<Q", buf, pos)
                pos += 8
                starts[i], pos = pos, pos + length
                ends[i] = pos
                if pos > size:
                    raise ValueError(f"a string of {length} bytes runs past the end of the file")
            self.pos = pos
            return GGUFStrings(buf, starts, ends)
        return [self.value(kind) for _ in range(count)]
