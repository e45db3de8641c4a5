"""ModelRunner: SchedulerOutput -> StepContext -> model forward -> logits of the sampled rows.

Host-side inputs are built with numpy and moved in one copy per tensor. Decode batches go
through CUDA graphs when the backend captured them (engine/cuda_graph.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lmforge.model_inputs import AttnMetadata, StepContext, StepContextManager

from .scheduler import SchedulerOutput


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
        self._pin = device.type == "cuda"

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True) if self._pin else t.to(self.device)

    def build_context(self, sched: SchedulerOutput) -> StepContext:
        bs = self.block_size
        q_lens = np.asarray(sched.num_tokens, dtype=np.int64)
        starts = np.asarray([s.num_computed_tokens for s in sched.seqs], dtype=np.int64)
        kv_lens = starts + q_lens
        num_tokens = int(q_lens.sum())
        input_ids = np.empty(num_tokens, dtype=np.int64)
        positions = np.empty(num_tokens, dtype=np.int64)
        max_blocks = max(len(s.block_ids) for s in sched.seqs)
        block_tables = np.zeros((len(sched.seqs), max_blocks), dtype=np.int32)
        offset = 0
        for i, (seq, start, n) in enumerate(zip(sched.seqs, starts, q_lens, strict=True)):
            input_ids[offset : offset + n] = seq.token_ids[start : start + n]
            positions[offset : offset + n] = np.arange(start, start + n)
            block_tables[i, : len(seq.block_ids)] = seq.block_ids
            offset += n
        seq_index = np.repeat(np.arange(len(sched.seqs)), q_lens)
        slot_mapping = block_tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        q_start_loc = np.cumsum(q_lens) - q_lens
        meta = AttnMetadata(
            is_decoding=bool((q_lens == 1).all()),
            block_tables=self._to_device(block_tables),
            q_start_loc=self._to_device(q_start_loc.astype(np.int32)),
            q_seqlens=self._to_device(q_lens.astype(np.int32)),
            kv_seqlens=self._to_device(kv_lens.astype(np.int32)),
            slot_mapping=self._to_device(slot_mapping),
            max_q_seqlen=int(q_lens.max()),
            max_kv_seqlen=int(kv_lens.max()),
            block_size=bs,
            q_seqlens_list=q_lens.tolist(),
            kv_seqlens_list=kv_lens.tolist(),
        )
        return StepContext(
            input_ids=self._to_device(input_ids),
            position_ids=self._to_device(positions),
            attn_metadata=meta,
            kv_caches=self.kv_caches,
            is_decoding=meta.is_decoding,
            last_token_indices=self._to_device(q_start_loc + q_lens - 1),
        )

    @torch.inference_mode()
    def forward(self, sched: SchedulerOutput, sample_rows: list[int], patch=None) -> torch.Tensor | None:
        """Run one step; returns float32 logits [len(sample_rows), vocab] for the listed batch rows
        (None when no row samples, e.g. a step of prefill chunks only).

        patch = (rows, src, tokens): input_ids[rows] = tokens[src], on the device, for tokens sampled
        by the previous step that the host has not read yet."""
        ctx = self.build_context(sched)
        if patch is not None:
            rows, src, tokens = patch
            dst = torch.as_tensor(rows, device=self.device)
            ctx.input_ids.index_copy_(0, dst, tokens.index_select(0, torch.as_tensor(src, device=self.device)))
        if self.graph_runner is not None and self.graph_runner.can_run(ctx):
            hidden = self.graph_runner.run(ctx)
        else:
            with self.ctx_mgr.context(ctx):
                inputs = self.model.prepare_inputs_for_generation(self.kv_caches, context=ctx)
                hidden = self.model(**inputs)
        if not sample_rows:
            return None
        rows = ctx.last_token_indices
        if len(sample_rows) != len(sched.seqs):
            rows = rows[torch.as_tensor(sample_rows, device=rows.device)]
        if self.has_get_logits:
            return self.model.get_logits(hidden.index_select(0, rows))
        if hidden.dim() == 3:  # a seed-style model returning [1, num_tokens, vocab]
            hidden = hidden[0]
        return hidden.index_select(0, rows).float()
