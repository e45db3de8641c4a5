"""Recording the CPU kernels' calls (engine/cpu_graph.py replays them): every per-step wrapper in this package
calls its C function through `_call` and allocates its float32 output with `_empty`, so that while `recording` is
active the calls are appended to a KernelProgram and the outputs come from its Arena."""

from __future__ import annotations

import ctypes
from contextlib import contextmanager

import numpy as np
import torch

# program.c's opcodes (its enum's order) and argument slots per call
PROGRAM_OPS = {name: i for i, name in enumerate([
    "lmf_q4_linear", "lmf_q4_linear_q8", "lmf_q4_linear_cols", "lmf_rms_norm", "lmf_rope", "lmf_silu_and_mul",
    "lmf_embedding", "lmf_cos_sin", "lmf_paged_attention",
])}  # fmt: skip
PROGRAM_ARGS = 32


class Arena:
    """Float32 memory for the outputs of recorded kernel calls: each recording takes its buffers in order from the
    start (`reset`), so programs of different batch sizes share the same memory (one program runs at a time, and
    what a step returns is read before the next step), which then is as large as the largest program needs. Chunks
    are never freed or moved: recorded calls hold their addresses."""

    CHUNK = 1 << 21  # floats (8 MiB)

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.reset()

    def reset(self) -> None:
        self.chunk, self.offset = 0, 0

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        numel_aligned = -(-numel // 16) * 16  # 64-byte starts
        while True:
            if self.chunk == len(self.chunks):
                self.chunks.append(torch.empty(max(self.CHUNK, numel_aligned), dtype=torch.float32))
            buf = self.chunks[self.chunk]
            if self.offset + numel_aligned <= buf.numel():
                out = buf[self.offset : self.offset + numel].view(shape)
                self.offset += numel_aligned
                return out
            if self.offset == 0:  # an older chunk too small for it: a bigger one goes before it (none moves)
                self.chunks.insert(self.chunk, torch.empty(numel_aligned, dtype=torch.float32))
                continue
            self.chunk, self.offset = self.chunk + 1, 0


class KernelProgram:
    """The kernel calls of one forward, recorded while it ran (`recording`), replayed in order with the same
    arguments: the same memory, so whatever the recorded step read (its inputs, the KV cache, the weights) must be
    rewritten in place before a replay, and what it wrote is where the replay writes (engine/cpu_graph.py). Every
    per-step kernel takes its thread count last; a replay passes the current one. With an `arena`, the kernels'
    outputs come from it."""

    def __init__(self, arena: Arena | None = None) -> None:
        self.calls: list[tuple] = []
        self.arena = arena
        self._compiled: tuple | None = None  # (run, ops, args, count), built at the first replay
        self._python = False  # a call program.c does not know: replayed from Python

    def replay(self, num_threads: int) -> None:
        if self._compiled is None and not self._python:
            self._compile()
        if self._compiled is not None:
            run, ops, args, count = self._compiled
            run(ops.ctypes.data, args.ctypes.data, count, num_threads)
            return
        for fn, args in self.calls:
            fn(*args, num_threads)

    def _compile(self) -> None:
        """The calls as program.c's opcodes and argument slots, where every function is one it knows."""
        ops = [_opcode(fn) for fn, _ in self.calls]
        if _library is None or not ops or None in ops or any(len(args) > PROGRAM_ARGS for _, args in self.calls):
            self._python = True
            return
        slots = np.zeros((len(self.calls), PROGRAM_ARGS), dtype=np.uint64)
        for row, (_, args) in zip(slots, self.calls, strict=True):
            for i, a in enumerate(args):
                v = a.value if isinstance(a, ctypes._SimpleCData) else a
                if isinstance(a, ctypes.c_float) or isinstance(v, float):
                    row[i] = int(np.float32(v).view(np.uint32))
                else:
                    row[i] = np.int64(v or 0).view(np.uint64)
        self._compiled = (_library.lmf_run_program, np.asarray(ops, dtype=np.int32), slots, len(self.calls))


_library: ctypes.CDLL | None = None  # the loaded kernel library, whose lmf_run_program replays programs


def set_library(lib: ctypes.CDLL | None) -> None:
    global _library
    _library = lib


def _opcode(fn) -> int | None:
    """program.c's opcode of a recorded function: one of its names, and that very function of _library."""
    name = getattr(fn, "__name__", None)
    if _library is None or name not in PROGRAM_OPS:
        return None
    same = ctypes.cast(fn, ctypes.c_void_p).value == ctypes.cast(getattr(_library, name), ctypes.c_void_p).value
    return PROGRAM_OPS[name] if same else None


_recording: KernelProgram | None = None


@contextmanager
def recording(program: KernelProgram):
    """Append every per-step kernel call made inside to program (the calls still run)."""
    global _recording
    previous, _recording = _recording, program
    try:
        yield program
    finally:
        _recording = previous


def _empty(*shape) -> torch.Tensor:
    """A kernel's float32 output (sizes, or one torch.Size): from the recording's arena while one records with one."""
    if len(shape) == 1 and not isinstance(shape[0], int):
        shape = tuple(shape[0])
    if _recording is not None and _recording.arena is not None:
        return _recording.arena.take(shape)
    return torch.empty(shape, dtype=torch.float32)


def _call(fn, *args) -> None:
    if _recording is not None:
        _recording.calls.append((fn, _as_ctypes(fn, args[:-1])))
    fn(*args)


def _as_ctypes(fn, args: tuple) -> tuple:
    """Recorded arguments as instances of fn's ctypes argument types, which a replayed call passes as they are
    instead of converting each Python int and float again (~1.5 us of a 12-argument call; a batch-1 decode step
    of a 30-layer model replays a few hundred calls)."""
    types = getattr(fn, "argtypes", None) or ()
    if len(types) < len(args):
        return args
    return tuple(a if isinstance(a, t) else t(a) for t, a in zip(types[: len(args)], args, strict=True))
