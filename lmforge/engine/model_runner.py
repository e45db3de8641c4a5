"""ModelRunner: SchedulerOutput -> StepContext -> model forward -> logits of the sampled rows.

Host-side inputs are built with numpy and packed into two arrays (int64, int32) so a step costs
two host-to-device copies, queued without a sync behind the previous step. Decode batches go
through CUDA graphs when they were captured (engine/cuda_graph.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lmforge.model_inputs import AttnMetadata, StepContext, StepContextManager

from .scheduler import SchedulerOutput
from .staging import PinnedStaging


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        ctx_mgr: StepContextManager,
        kv_caches: list,
        block_size: int,
        device: torch.device,
        graph_runner=None,
    ):
        self.model, self.ctx_mgr, self.kv_caches = model, ctx_mgr, kv_caches
        self.block_size, self.device = block_size, device
        self.has_get_logits = callable(getattr(model, "get_logits", None))
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
        num_seqs = len(sched.seqs)
        q_lens = np.asarray(sched.num_tokens, dtype=np.int64)
        starts = np.fromiter((s.num_computed_tokens for s in sched.seqs), dtype=np.int64, count=num_seqs)
        kv_lens = starts + q_lens
        num_tokens = int(q_lens.sum())
        max_blocks = max(len(s.block_ids) for s in sched.seqs)
        q_start_loc = np.cumsum(q_lens) - q_lens
        last = q_start_loc + q_lens - 1
        sample = last if sample_rows is None or len(sample_rows) == num_seqs else last[sample_rows]
        # int64 pack: input ids | positions | slot mapping | last rows | sample rows | patch rows | patch sources
        n_patch = len(patch_rows)
        i64 = np.empty(3 * num_tokens + num_seqs + len(sample) + 2 * n_patch, dtype=np.int64)
        input_ids, positions = i64[:num_tokens], i64[num_tokens : 2 * num_tokens]
        slot_mapping = i64[2 * num_tokens : 3 * num_tokens]
        # int32 pack: block tables | q start | q lens | kv lens
        i32 = np.zeros(num_seqs * max_blocks + 3 * num_seqs, dtype=np.int32)
        block_tables = i32[: num_seqs * max_blocks].reshape(num_seqs, max_blocks)
        if num_tokens == num_seqs:  # decode: one token per sequence, no per-sequence slicing
            for i, seq in enumerate(sched.seqs):
                input_ids[i] = seq.token_ids[seq.num_computed_tokens]
                block_tables[i, : len(seq.block_ids)] = seq.block_ids
            positions[:] = starts
        else:
            offset = 0
            for i, (seq, start, n) in enumerate(zip(sched.seqs, starts, q_lens, strict=True)):
                input_ids[offset : offset + n] = seq.token_ids[start : start + n]
                positions[offset : offset + n] = np.arange(start, start + n)
                block_tables[i, : len(seq.block_ids)] = seq.block_ids
                offset += n
        seq_index = np.repeat(np.arange(num_seqs), q_lens)
        slot_mapping[:] = block_tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        tail = 3 * num_tokens
        i64[tail : tail + num_seqs] = last
        i64[tail + num_seqs : tail + num_seqs + len(sample)] = sample
        sample_at = tail + num_seqs
        tail = sample_at + len(sample)
        i64[tail : tail + n_patch] = patch_rows
        i64[tail + n_patch :] = patch_src
        i32[num_seqs * max_blocks :] = np.concatenate([q_start_loc, q_lens, kv_lens]).astype(np.int32)
        d64, d32 = self.staging.to_device(i64), self.staging.to_device(i32)
        base = num_seqs * max_blocks
        meta = AttnMetadata(
            is_decoding=num_tokens == num_seqs,
            block_tables=d32[:base].view(num_seqs, max_blocks),
            q_start_loc=d32[base : base + num_seqs],
            q_seqlens=d32[base + num_seqs : base + 2 * num_seqs],
            kv_seqlens=d32[base + 2 * num_seqs :],
            slot_mapping=d64[2 * num_tokens : 3 * num_tokens],
            max_q_seqlen=int(q_lens.max()),
            max_kv_seqlen=int(kv_lens.max()),
            block_size=bs,
            q_seqlens_list=q_lens.tolist(),
            kv_seqlens_list=kv_lens.tolist(),
        )
        ctx = StepContext(
            input_ids=d64[:num_tokens],
            position_ids=d64[num_tokens : 2 * num_tokens],
            attn_metadata=meta,
            kv_caches=self.kv_caches,
            is_decoding=meta.is_decoding,
            last_token_indices=d64[3 * num_tokens : 3 * num_tokens + num_seqs],
        )
        extra = {
            "sample": d64[sample_at : sample_at + len(sample)],
            "patch_rows": d64[tail : tail + n_patch],
            "patch_src": d64[tail + n_patch :],
        }
        return ctx, extra

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
        if self.graph_runner is not None and self.graph_runner.can_run(ctx):
            hidden = self.graph_runner.run(ctx)
        else:
            with self.ctx_mgr.context(ctx):
                inputs = self.model.prepare_inputs_for_generation(self.kv_caches, context=ctx)
                hidden = self.model(**inputs)
        if not sample_rows:
            return None
        rows = extra["sample"]
        if self.has_get_logits:
            return self.model.get_logits(hidden.index_select(0, rows))
        if hidden.dim() == 3:  # a seed-style model returning [1, num_tokens, vocab]
            hidden = hidden[0]
        return hidden.index_select(0, rows).float()
