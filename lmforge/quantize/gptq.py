"""GPTQ (Frantar et al., 2022): quantize a linear layer column by column, each rounding error compensated on the
columns not yet quantized through the inverse of the layer's Hessian H = 2 X^T X / n over calibration inputs.

`HessianAccumulator` sums X^T X from forward hooks; `gptq_quantize` runs the blocked, lazy-batch update with
dampening, groups (parameters fixed when the sweep reaches a group's first column) and optional act-order
(columns sorted by decreasing diag(H); `g_idx` then records each column's group).
"""

from __future__ import annotations

import torch

from lmforge.quantize.qparams import IntWeight, QuantSpec, group_params, quantize_int


class HessianAccumulator:
    """Running H = 2 / n * sum_x x^T x over every input row seen, in float32 on the layer's device."""

    def __init__(self, in_features: int, device: torch.device):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        # keep H the mean over all rows so far, scaled by 2: rescale the old mean, add the new rows
        self.h.mul_(self.num_rows / (self.num_rows + n))
        self.num_rows += n
        x = x * (2 / self.num_rows) ** 0.5
        self.h.addmm_(x.t(), x)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; more dampening when H is still singular."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = torch.diag(h).mean()
    for attempt in range(6):
        try:
            factor = torch.linalg.cholesky(h + (damp * 10**attempt) * mean_diag * eye)
            hinv = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(hinv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with 1e5x dampening; more calibration data?")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> IntWeight:
    """Quantize `weight [N, K]` given `hessian [K, K]`; returns the integer codes with their group grid."""
    w = weight.detach().float().clone()
    h = hessian.clone()
    n, k = w.shape
    g = spec.group_len(k)
    dead = torch.diag(h) == 0  # inputs never active: any value is free, pin them to zero
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp)

    q = torch.zeros(n, k, dtype=torch.int32, device=w.device)
    scales, zeros = [], []
    scale = zero = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # a group starts: its grid comes from the columns as updated so far
                group = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :g]
                scale, zero = group_params(group, spec)
                scales.append(scale)
                zeros.append(zero)
            wcol = w1[:, i : i + 1]
            qcol = quantize_int(wcol, scale, zero, spec.maxq)
            q[:, col : col + 1] = qcol
            err = (wcol - (qcol.float() - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err @ hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    g_idx = (torch.arange(k, device=w.device, dtype=torch.int32) // g)[inv]  # group of each original column
    return IntWeight(q[:, inv], torch.cat(scales, 1), torch.cat(zeros, 1), g_idx.to(torch.int32), spec)
