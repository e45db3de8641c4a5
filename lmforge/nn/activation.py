"""Activations. Gated: [..., 2 * d] -> [..., d]; plain: [..., d] -> [..., d]. `build_act` maps an HF `hidden_act`
name onto either kind."""

import torch
from torch import nn

from lmforge.backends.registry import get_op

# HF hidden_act names -> the backend's plain activation kinds (gelu_new / gelu_fast / gelu_pytorch_tanh are all
# the tanh approximation, written three ways)
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "relu2": "relu2",
}


class SiluAndMul(nn.Module):
    """silu(gate) * up for x = [gate | up]."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.inplace = inplace
        self.op = get_op("silu_and_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, inplace=self.inplace)


class GeluAndMul(nn.Module):
    """gelu(gate) * up; approximate='tanh' is the gelu_pytorch_tanh of Gemma."""

    def __init__(self, approximate: str = "none", inplace: bool = False):
        super().__init__()
        self.approximate = approximate
        self.op = get_op("gelu_and_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, approximate=self.approximate)


class Activation(nn.Module):
    """A plain activation, act(x): kind is 'silu', 'gelu', 'gelu_tanh', 'relu' or 'relu2' (ReLU squared)."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in set(HF_ACTIVATIONS.values()):
            raise ValueError(f"unknown activation {kind!r}; known: {sorted(set(HF_ACTIVATIONS.values()))}")
        self.kind = kind
        self.op = get_op("activation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.kind)


def build_act(hidden_act: str, gated: bool = False) -> nn.Module:
    """The module for an HF `hidden_act` name: gated (act(gate) * up over [gate | up]) or plain."""
    kind = HF_ACTIVATIONS.get(hidden_act)
    if kind is None:
        raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
    if not gated:
        return Activation(kind)
    if kind == "silu":
        return SiluAndMul()
    if kind in ("gelu", "gelu_tanh"):
        return GeluAndMul(approximate="tanh" if kind == "gelu_tanh" else "none")
    raise ValueError(f"a gated {hidden_act!r} MLP is not supported; gated MLPs take silu or gelu")
