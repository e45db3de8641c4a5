"""ModelRunner: SchedulerOutput -> StepContext -> model forward -> logits of the sampled rows.

Host-side inputs are built with numpy and packed into two arrays (int64, int32) so a step costs
two host-to-device copies, queued without a sync behind the previous step. Decode batches go
through CUDA graphs when they were captured (engine/cuda_graph.py), on the CPU through recorded kernel
calls (engine/cpu_graph.py).
"""

from __future__ import annotations

from itertools import chain

import numpy as np
import torch
from torch import nn

from lmforge.model_inputs import AttnMetadata, StepContext, StepContextManager

from .scheduler import SchedulerOutput
from .staging import PinnedStaging


class ModelStep:
    """The one route of a step into a model: `forward(ctx)` gives hidden states (or a seed-style model's logits),
    `logits(hidden, rows)` the float32 logits of the sampled rows.

    A built-in model takes the context itself (`CausalLM.forward_step`). A model written the design document's
    way gets a thin adapter: the context is set on its ctx_mgr and its `prepare_inputs_for_generation` kwargs
    are passed to its forward."""

    def __init__(self, model: nn.Module, ctx_mgr: StepContextManager):
        self.model, self.ctx_mgr = model, ctx_mgr
        forward_step = getattr(model, "forward_step", None)
        self.forward = forward_step if callable(forward_step) else self._seed_forward
        self.has_get_logits = callable(getattr(model, "get_logits", None))

    def _seed_forward(self, ctx: StepContext) -> torch.Tensor:
        with self.ctx_mgr.context(ctx):
            return self.model(**self.model.prepare_inputs_for_generation(ctx.kv_caches, context=ctx))

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.has_get_logits:
            return self.model.get_logits(hidden.index_select(0, rows))
        if hidden.dim() == 3:  # a seed-style model returning [1, num_tokens, vocab]
            hidden = hidden[0]
        return hidden.index_select(0, rows).float()


class ModelRunner:
    def __init__(
        self,
        step: ModelStep,
        kv_caches: list,
        block_size: int,
        device: torch.device,
        graph_runner=None,
        channel=None,
    ):
        """channel: with tensor parallelism, the tp.Channel over which rank 0 broadcasts each step's inputs
        (and which the other ranks `follow`)."""
        self.step, self.kv_caches = step, kv_caches
        self.channel = channel
        self.block_size, self.device = block_size, device
        self.graph_runner = graph_runner

        self.staging = PinnedStaging(device)

    def build_context(
        self,
        sched: SchedulerOutput,
        sample_rows: list[int] | None = None,
        patch_rows: list[int] = (),
        patch_src: list[int] = (),
    ) -> tuple[StepContext, dict]:
        """The step's context, plus device index tensors: 'sample' (token rows of the sampled sequences),
        'patch_rows' / 'patch_src' (placeholder tokens to fill from the previous step's samples)."""
        bs = self.block_size
        seqs = sched.seqs
        num_seqs = len(seqs)
        q_lens = np.asarray(sched.num_tokens, dtype=np.int64)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=num_seqs)
        kv_lens = starts + q_lens
        num_tokens = int(q_lens.sum())
        num_blocks = np.fromiter((len(s.block_ids) for s in seqs), dtype=np.int64, count=num_seqs)
        max_blocks = int(num_blocks.max())
        q_start_loc = np.cumsum(q_lens) - q_lens
        last = q_start_loc + q_lens - 1
        sample = last if sample_rows is None or len(sample_rows) == num_seqs else last[sample_rows]
        # two packs (int64, int32), one host-to-device copy each
        n_patch = len(patch_rows)
        p64, p32 = self._packs(num_tokens, num_seqs, max_blocks, len(sample), n_patch)
        input_ids, positions, slot_mapping = p64["ids"], p64["pos"], p64["slots"]
        block_tables = p32["tables"].reshape(num_seqs, max_blocks)
        # every table row in one masked assignment (row-major, so the concatenated ids land row after row)
        block_tables[np.arange(max_blocks) < num_blocks[:, None]] = np.fromiter(
            chain.from_iterable(s.block_ids for s in seqs), dtype=np.int32, count=int(num_blocks.sum())
        )
        if num_tokens == num_seqs:  # decode: one token per sequence, no per-sequence slicing
            input_ids[:] = np.fromiter((s.token_ids[s.num_computed_tokens] for s in seqs), np.int64, num_seqs)
            positions[:] = starts
        else:
            offset = 0
            for seq, start, n in zip(seqs, starts.tolist(), sched.num_tokens, strict=True):
                input_ids[offset : offset + n] = seq.token_ids[start : start + n]
                positions[offset : offset + n] = np.arange(start, start + n)
                offset += n
        seq_index = np.repeat(np.arange(num_seqs), q_lens)
        slot_mapping[:] = block_tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        p64["last"][:] = last
        p64["sample"][:] = sample
        p64["patch_rows"][:] = patch_rows
        p64["patch_src"][:] = patch_src
        p32["q_start"][:] = q_start_loc
        p32["q_lens"][:] = q_lens
        p32["kv_lens"][:] = kv_lens
        flat64, flat32 = self.staging.to_device(p64.array), self.staging.to_device(p32.array)
        if self.channel is not None:  # tensor parallel: the other ranks run the same step on their shards
            self.channel.send_step((num_tokens, num_seqs, max_blocks, len(sample), n_patch), flat64, flat32)
        return self._context(p64, flat64, p32, flat32, num_seqs, max_blocks, q_lens.tolist(), kv_lens.tolist())

    @staticmethod
    def _packs(num_tokens: int, num_seqs: int, max_blocks: int, n_sample: int, n_patch: int):
        """The two packs of a step. Every segment starts 16-byte aligned, because Triton compiles a kernel
        variant per pointer alignment and a misaligned slice would mean a new variant."""
        p64 = _Pack(
            np.int64,
            {
                "ids": num_tokens,
                "pos": num_tokens,
                "slots": num_tokens,
                "last": num_seqs,
                "sample": n_sample,
                "patch_rows": n_patch,
                "patch_src": n_patch,
            },
        )
        p32 = _Pack(
            np.int32, {"tables": num_seqs * max_blocks, "q_start": num_seqs, "q_lens": num_seqs, "kv_lens": num_seqs}
        )
        return p64, p32

    def _context(self, p64, flat64, p32, flat32, num_seqs, max_blocks, q_lens: list[int], kv_lens: list[int]):
        d64, d32 = p64.views(flat64), p32.views(flat32)
        max_q = max(q_lens)
        meta = AttnMetadata(
            is_decoding=max_q == 1,  # one new token per sequence
            block_tables=d32["tables"].view(num_seqs, max_blocks),
            q_start_loc=d32["q_start"],
            q_seqlens=d32["q_lens"],
            kv_seqlens=d32["kv_lens"],
            slot_mapping=d64["slots"],
            max_q_seqlen=max_q,
            max_kv_seqlen=max(kv_lens),
            block_size=self.block_size,
            q_seqlens_list=q_lens,
            kv_seqlens_list=kv_lens,
        )
        ctx = StepContext(
            input_ids=d64["ids"],
            position_ids=d64["pos"],
            attn_metadata=meta,
            kv_caches=self.kv_caches,
            is_decoding=meta.is_decoding,
            last_token_indices=d64["last"],
        )
        return ctx, {k: d64[k] for k in ("sample", "patch_rows", "patch_src")}

    @torch.inference_mode()
    def forward(self, sched: SchedulerOutput, sample_rows: list[int], patch=None) -> torch.Tensor | None:
        """Run one step; returns float32 logits [len(sample_rows), vocab] for the listed batch rows
        (None when no row samples, e.g. a step of prefill chunks only).

        patch = (rows, src, tokens): input_ids[rows] = tokens[src], on the device, for tokens sampled
        by the previous step that the host has not read yet."""
        rows, src, tokens = patch if patch is not None else ((), (), None)
        ctx, extra = self.build_context(sched, sample_rows, rows, src)
        if tokens is not None:
            ctx.input_ids.index_copy_(0, extra["patch_rows"], tokens.index_select(0, extra["patch_src"]))
        hidden, logits = self._run(ctx)
        if not sample_rows:
            return None
        if logits is not None and len(sample_rows) == len(sched.seqs):  # a decode graph's lm_head: every row
            return logits
        return self.step.logits(hidden, extra["sample"])

    def _run(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, the logits of every row when a CUDA graph computed them, else None)."""
        # every rank decides the same way from the same shapes, so under tensor parallelism all ranks replay
        # their graphs (with the collectives captured in them) or all run eagerly
        if self.graph_runner is not None and self.graph_runner.can_run(ctx):
            return self.graph_runner.run(ctx)
        return self.step.forward(ctx), None

    @torch.inference_mode()
    def follow(self, header: list[int]) -> None:
        """Tensor-parallel ranks > 0: receive the step rank 0 broadcasts (`header` from its STEP message) and
        run the model on this rank's shard; the all-reduces inside meet rank 0's."""
        num_tokens, num_seqs, max_blocks, n_sample, n_patch = header[:5]
        p64, p32 = self._packs(num_tokens, num_seqs, max_blocks, n_sample, n_patch)
        flat64 = torch.empty(p64.array.shape, dtype=torch.int64, device=self.device)
        flat32 = torch.empty(p32.array.shape, dtype=torch.int32, device=self.device)
        self.channel.broadcast(flat64)
        self.channel.broadcast(flat32)
        lens = p32.views(flat32)
        ctx, _ = self._context(
            p64, flat64, p32, flat32, num_seqs, max_blocks, lens["q_lens"].tolist(), lens["kv_lens"].tolist()
        )
        self._run(ctx)


class _Pack:
    """Named segments of one flat host array, each starting on a 16-byte boundary."""

    def __init__(self, dtype, sizes: dict[str, int]):
        align = 16 // np.dtype(dtype).itemsize
        self.offsets, total = {}, 0
        for name, n in sizes.items():
            self.offsets[name] = (total, n)
            total += -(-n // align) * align
        self.array = np.zeros(max(total, 1), dtype=dtype)

    def __getitem__(self, name: str) -> np.ndarray:
        start, n = self.offsets[name]
        return self.array[start : start + n]

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The segments of `flat`, this pack's array on the device."""
        return {name: flat[start : start + n] for name, (start, n) in self.offsets.items()}
