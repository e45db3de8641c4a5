"""The static inputs that CUDA graphs and recorded CPU steps read (engine/decode_inputs.py)."""

from __future__ import annotations

import torch

from lmforge.engine.decode_inputs import StaticDecodeInputs
from lmforge.model_inputs import AttnMetadata, StepContext


def _step(tables, kv_lens, slots, ids, pos) -> StepContext:
    n = len(ids)
    meta = AttnMetadata(
        is_decoding=True,
        block_tables=torch.tensor(tables, dtype=torch.int32),
        q_start_loc=torch.arange(n, dtype=torch.int32),
        q_seqlens=torch.ones(n, dtype=torch.int32),
        kv_seqlens=torch.tensor(kv_lens, dtype=torch.int32),
        slot_mapping=torch.tensor(slots),
        max_q_seqlen=1,
        max_kv_seqlen=max(kv_lens),
        block_size=4,
    )
    return StepContext(torch.tensor(ids), torch.tensor(pos), meta, [], True, torch.arange(n))


def test_a_step_is_copied_in_padded_and_read_back_as_a_context():
    inputs = StaticDecodeInputs(4, 3, 4, torch.device("cpu"), trash_block=9)
    assert inputs.block_tables.eq(9).all() and inputs.slot_mapping.eq(36).all() and inputs.max_kv_len == 12
    bs = inputs.load(_step([[2, 5], [7, 1]], [6, 5], [21, 4], [11, 12], [5, 4]))
    assert bs == 2
    inputs.pad(2, 3)
    ctx = inputs.context(3, ["cache"], [1] * 3, [12] * 3)
    meta = ctx.attn_metadata
    assert ctx.input_ids.tolist()[:2] == [11, 12] and ctx.position_ids.tolist()[:2] == [5, 4]
    assert meta.block_tables.tolist() == [[2, 5, 9], [7, 1, 9], [9, 9, 9]]  # the step's width, then the trash block
    assert meta.kv_seqlens.tolist() == [6, 5, 1] and meta.slot_mapping.tolist() == [21, 4, 36]
    assert meta.num_seqs == 3 and meta.max_kv_seqlen == 12 and ctx.last_token_indices.tolist() == [0, 1, 2]
    assert ctx.kv_caches == ["cache"] and meta.kv_seqlens_list == [12] * 3
    # the context's tensors are views of the buffers: a later load shows through
    inputs.load(_step([[3]], [2], [13], [99], [1]))
    assert ctx.input_ids[0] == 99 and meta.block_tables[0, 0] == 3
