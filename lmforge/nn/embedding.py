"""Token embedding (replicated across TP ranks)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.backends.registry import current_build_context, get_op
from lmforge.nn.linear import default_weight_loader


class Embedding(nn.Module):
    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, dtype=None, device=None
    ):
        super().__init__()
        ctx = current_build_context()
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim, dtype=dtype or ctx.dtype, device=device or ctx.device), False
        )
        self.weight.weight_loader = default_weight_loader
        self.padding_idx = padding_idx
        self.embedding = get_op("embedding", ctx.device_type)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids, self.weight)


def build_embedding(
    num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, dtype=None, device=None
) -> Embedding:
    return Embedding(num_embeddings, embedding_dim, padding_idx, dtype, device)
