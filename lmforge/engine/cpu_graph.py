"""CPU decode steps replayed as recorded kernel calls: what CUDA graphs are on the GPU, for lmforge's own CPU
kernels (lmforge/kernels/cpu). A batch-1 decode step of the embedded 30-layer model makes ~270 kernel calls; run
through the model's Python (modules, ops, argument checks, output allocation) they cost about as much again as
the kernels themselves. Recorded once per batch size, a step is a loop over (C function, arguments).

The first decode step of each batch size runs the model on static input buffers while `kernels.cpu.recording`
appends every kernel call, and a dispatch mode watches every torch op: a step whose model did any torch work
besides allocating and viewing (a torch fallback of an op, an all-reduce, a host read of a tensor) or read the
step's host-side metadata lists is not recordable; it runs again eagerly and that batch size stays eager. A
recorded step's outputs are that step's outputs, so recording costs nothing extra. Later steps of that size copy
their inputs into the static buffers and replay the calls: the same kernels with the same arguments, so the same
results as an eager step, bit for bit.

Batch sizes up to MAX_BATCH are recorded. Their kernels' outputs come from one arena that every program takes from
the start (one program runs at a time), so the memory is that of the largest program (~2 MB a row for the embedded
model, float32 logits included); larger decode batches, where the kernels dominate, run eagerly."""

from __future__ import annotations

import logging

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.kernels import cpu as cpu_kernels
from lmforge.model_inputs import StepContext

from .decode_inputs import StaticDecodeInputs

logger = logging.getLogger(__name__)

MAX_BATCH = 32

# torch ops a recorded forward may make: allocations (the kernels' outputs) and views of them
_SHAPE_OPS = {
    "empty",
    "empty_strided",
    "view",
    "_unsafe_view",
    "as_strided",
    "slice",
    "select",
    "split",
    "split_with_sizes",
    "unbind",
    "unsqueeze",
    "squeeze",
    "t",
    "transpose",
    "permute",
    "expand",
    "alias",
    "detach",
}
# composite ops that return a view (or their input) where they can and copy otherwise: fine when they did not copy
_MAYBE_VIEW_OPS = {
    "reshape",
    "flatten",
    "unflatten",
    "contiguous",
    "to",
    "view_as",
    "reshape_as",
    "expand_as",
    "chunk",
    "narrow",
    "float",
    "type_as",
}


def _shares_storage(out, src) -> bool:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not isinstance(src, torch.Tensor):
        return False
    ptr = src.untyped_storage().data_ptr()
    return all(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == ptr for t in outs)


class _HostRead(RuntimeError):
    pass


class _StepList(list):
    """A per-step host list (q_seqlens_list, kv_seqlens_list) that a recorded forward must not read: a replay
    would reuse what it read."""

    def _refuse(self, *args, **kwargs):
        raise _HostRead("the forward reads per-step host metadata (q_seqlens_list / kv_seqlens_list)")

    __getitem__ = __iter__ = __len__ = __contains__ = __reversed__ = __bool__ = _refuse


class _TorchWork(TorchDispatchMode):
    """Notes every torch op other than allocations and views; keeps what the ops return alive (the recorded
    kernel calls hold raw pointers into those tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.foreign: list[str] = []
        self.keep: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _MAYBE_VIEW_OPS:
            if not (args and _shares_storage(out, args[0])):
                self.foreign.append(str(func))
        elif name not in _SHAPE_OPS:
            self.foreign.append(str(func))
        if isinstance(out, torch.Tensor):
            self.keep.append(out)
        elif isinstance(out, (tuple, list)):
            self.keep.extend(t for t in out if isinstance(t, torch.Tensor))
        return out


class CpuGraphRunner:
    """Records and replays decode steps of batch size <= MAX_BATCH (tensor parallelism off, CPU kernels on)."""

    def __init__(self, step, cache, block_size: int, max_batch_size: int, max_blocks: int):
        self.step = step
        self.kv_caches = cache.kv_caches
        self.max_batch_size = min(max_batch_size, MAX_BATCH)
        self.max_blocks = max_blocks
        self.inputs = StaticDecodeInputs(self.max_batch_size, max_blocks, block_size, torch.device("cpu"))
        self.programs: dict[int, tuple[cpu_kernels.KernelProgram, torch.Tensor, torch.Tensor | None, list]] = {}
        self.eager_sizes: dict[int, str] = {}  # batch sizes found not recordable, and why
        self.arena = cpu_kernels.Arena()
        support = getattr(step.model, "support_cuda_graph", True)
        self._support = support if callable(support) else (lambda *a, **k: bool(support))
        self.enabled = bool(support) and cpu_kernels.available()
        # what benchmarks read of a graph runner (CudaGraphRunner's names): recording happens on the first step of a
        # size, so there is no capture time at start
        self.graphs = self.programs
        self.capture_seconds = 0.0
        self.bucket_seconds: dict[int, float] = {}

    def _context(self, bs: int) -> StepContext:
        # the host lists refuse to be read: a forward that reads them is not recordable
        return self.inputs.context(bs, self.kv_caches, _StepList(), _StepList())

    def can_run(self, ctx: StepContext) -> bool:
        if not self.enabled or not ctx.is_decoding or ctx.inputs_embeds is not None:
            return False
        bs = ctx.attn_metadata.num_seqs
        return (
            bs <= self.max_batch_size
            and bs not in self.eager_sizes
            and ctx.attn_metadata.block_tables.shape[1] <= self.max_blocks
            and self._support(input_ids=ctx.input_ids, attn_metadata=ctx.attn_metadata)
        )

    def _record(self, bs: int, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run this step on the static buffers, recording; a step that cannot be recorded runs again eagerly on
        its own context (`ctx`), which rewrites every cache slot the attempt wrote."""
        self.arena.reset()
        program = cpu_kernels.KernelProgram(self.arena)
        watch = _TorchWork()
        static = self._context(bs)
        why = None
        try:
            with cpu_kernels.recording(program), watch:
                hidden = self.step.forward(static)
                logits = self.step.model.get_logits(hidden) if self.step.has_get_logits else None
        except Exception as e:  # a host read of step metadata, or what the eager run below reports itself
            why = str(e) or type(e).__name__
        else:
            if watch.foreign or not program.calls:
                why = "torch ops: " + (", ".join(sorted(set(watch.foreign))[:4]) or "no kernel calls")
        if why is None:
            self.programs[bs] = (program, hidden, logits, watch.keep)
            return hidden, logits
        self.eager_sizes[bs] = why
        logger.info("CPU decode batch %d runs eagerly: %s", bs, why)
        return self.step.forward(ctx), None

    def run(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states [bs, hidden], float32 logits [bs, vocab] or None): the arena's memory, read before the
        next step (of any batch size)."""
        bs = self.inputs.load(ctx)
        entry = self.programs.get(bs)
        if entry is None:
            return self._record(bs, ctx)
        program, hidden, logits, _ = entry
        program.replay(torch.get_num_threads())
        return hidden, logits
