"""Safetensors straight to a GPU, in parallel: a few threads read the tensors' bytes (os.preadv releases the GIL)
into a ring of pinned host buffers, and each filled buffer is copied to the device asynchronously while the next
ones are read. Used by weights.files.iter_weights for CUDA devices; safe_open would instead copy one tensor at a
time from the memory map through pageable memory, with the host waiting on every copy.

The byte layout read here: a little-endian u64 header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}}` (offsets relative to the end of the header), then the data.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lmforge.weights.errors import WeightFileError

# safetensors dtype names -> torch dtypes; a file holding any other dtype is read by safe_open instead
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(slots=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: list[int]
    begin: int  # absolute byte offsets in the file
    end: int


def read_header(path: str) -> list[_Entry] | None:
    """The file's tensors in data order, or None when one has a dtype this reader does not map (safe_open then
    reads the file). The caller has checked the file's layout (files._check_safetensors)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            return None
        begin, end = info["data_offsets"]
        entries.append(_Entry(name, dtype, list(info["shape"]), 8 + size + begin, 8 + size + end))
    return sorted(entries, key=lambda e: e.begin)


@dataclass(slots=True)
class _Chunk:
    fd: int
    path: str
    offset: int  # in the file
    nbytes: int
    entry: _Entry
    start: int  # in the tensor's bytes
    last: bool  # the tensor's last chunk


def _preadv_all(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise WeightFileError(f"Weight file {path} ended early at byte {offset + done}; re-download it.")
        done += n


class DeviceReader:
    """Reads safetensors files onto `device`. `num_buffers` pinned host buffers of `buffer_bytes` each (a tensor
    larger than one goes in several chunks), filled by `num_threads` threads."""

    def __init__(
        self,
        device: torch.device,
        num_buffers: int = 8,
        buffer_bytes: int = 64 << 20,
        num_threads: int = min(8, os.cpu_count() or 1),
    ):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.buffer_bytes = buffer_bytes
        pin = self.is_cuda
        self.buffers = [torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(num_buffers)]
        # writable views of the buffers' memory for os.preadv (ctypes, so no numpy is needed)
        self.views = [
            memoryview((ctypes.c_ubyte * buffer_bytes).from_address(b.data_ptr())).cast("B") for b in self.buffers
        ]
        # the copy out of each buffer; a thread waits on it before refilling the buffer
        self.events: list[torch.cuda.Event | None] = [None] * num_buffers
        self.num_threads = num_threads
        self.bytes_read = 0

    def _fill(self, chunk: _Chunk, slot: int) -> None:
        event = self.events[slot]
        if event is not None:
            event.synchronize()
        _preadv_all(chunk.fd, self.views[slot][: chunk.nbytes], chunk.offset, chunk.path)

    def _chunks(self, path: str, fd: int, entries: list[_Entry]) -> Iterator[_Chunk]:
        for e in entries:
            size = e.end - e.begin
            for start in range(0, size, self.buffer_bytes):
                n = min(self.buffer_bytes, size - start)
                yield _Chunk(fd, path, e.begin + start, n, e, start, start + n == size)

    def read(self, path: str, entries: list[_Entry]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(name, tensor on device)` in the file's data order. The tensors' copies are queued on the
        current stream, so work the caller queues after them on that stream sees the data."""
        fd = os.open(path, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(self.num_threads, thread_name_prefix="lmforge-weights") as pool:
                yield from self._read(path, fd, entries, pool)
        finally:
            os.close(fd)

    def _read(self, path: str, fd: int, entries: list[_Entry], pool) -> Iterator[tuple[str, torch.Tensor]]:
        for e in entries:  # empty tensors have no bytes to read
            if e.begin == e.end:
                yield e.name, torch.empty(e.shape, dtype=e.dtype, device=self.device)
        chunks = self._chunks(path, fd, [e for e in entries if e.end > e.begin])
        free = deque(range(len(self.buffers)))
        pending: deque = deque()

        def submit() -> None:  # buffers are handed out here, in chunk order, so no reader waits on a later one
            while free:
                chunk = next(chunks, None)
                if chunk is None:
                    return
                slot = free.popleft()
                pending.append((chunk, slot, pool.submit(self._fill, chunk, slot)))

        submit()
        dst = None
        while pending:
            chunk, slot, future = pending.popleft()
            future.result()
            e = chunk.entry
            if chunk.start == 0:
                dst = torch.empty(e.end - e.begin, dtype=torch.uint8, device=self.device)
            dst[chunk.start : chunk.start + chunk.nbytes].copy_(
                self.buffers[slot][: chunk.nbytes], non_blocking=self.is_cuda
            )
            if self.is_cuda:
                event = torch.cuda.Event()
                event.record()
                self.events[slot] = event
            free.append(slot)
            self.bytes_read += chunk.nbytes
            submit()
            if chunk.last:
                yield e.name, dst.view(e.dtype).view(e.shape)
                dst = None
