"""The fixed-address inputs of a decode step that is replayed rather than run through the model's Python: a CUDA
graph (engine/cuda_graph.py) or recorded CPU kernel calls (engine/cpu_graph.py). Both read their step's ids,
positions and attention metadata from these buffers, which each step's inputs are copied into."""

from __future__ import annotations

import torch

from lmforge.model_inputs import AttnMetadata, StepContext


class StaticDecodeInputs:
    """Buffers for up to n sequences of up to max_blocks blocks; a table starts filled with `trash_block` and the
    slots with its first slot (where a padding row's key is written unread)."""

    def __init__(self, n: int, max_blocks: int, block_size: int, device: torch.device, trash_block: int = 0):
        self.block_size, self.max_blocks = block_size, max_blocks
        self.max_kv_len = max_blocks * block_size
        self.trash_slot = trash_block * block_size
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.block_tables = torch.full((n, max_blocks), trash_block, dtype=torch.int32, device=device)
        self.kv_seqlens = torch.ones(n, dtype=torch.int32, device=device)
        self.q_seqlens = torch.ones(n, dtype=torch.int32, device=device)
        self.q_start_loc = torch.arange(n, dtype=torch.int32, device=device)
        self.last_rows = torch.arange(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), self.trash_slot, dtype=torch.long, device=device)

    def context(self, bs: int, kv_caches: list, q_seqlens_list: list, kv_seqlens_list: list) -> StepContext:
        """The first bs rows as a decode step's context; the host lists are the caller's (what a replay may assume
        of lengths it cannot see)."""
        meta = AttnMetadata(
            is_decoding=True,
            block_tables=self.block_tables[:bs],
            q_start_loc=self.q_start_loc[:bs],
            q_seqlens=self.q_seqlens[:bs],
            kv_seqlens=self.kv_seqlens[:bs],
            slot_mapping=self.slot_mapping[:bs],
            max_q_seqlen=1,
            max_kv_seqlen=self.max_kv_len,
            block_size=self.block_size,
            q_seqlens_list=q_seqlens_list,
            kv_seqlens_list=kv_seqlens_list,
        )
        return StepContext(self.input_ids[:bs], self.position_ids[:bs], meta, kv_caches, True, self.last_rows[:bs])

    def load(self, ctx: StepContext) -> int:
        """Copy a decode step's inputs into the first rows; returns its number of sequences."""
        meta = ctx.attn_metadata
        bs = meta.num_seqs
        self.input_ids[:bs].copy_(ctx.input_ids)
        self.position_ids[:bs].copy_(ctx.position_ids)
        self.block_tables[:bs, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.kv_seqlens[:bs].copy_(meta.kv_seqlens)
        self.slot_mapping[:bs].copy_(meta.slot_mapping)
        return bs

    def pad(self, bs: int, bucket: int) -> None:
        """Rows bs..bucket as padding: one key each, in the trash block."""
        self.kv_seqlens[bs:bucket].fill_(1)
        self.slot_mapping[bs:bucket].fill_(self.trash_slot)
        self.block_tables[bs:bucket, 0].fill_(self.trash_slot // self.block_size)
