"""Shared fixtures for model parity tests: tiny random HF models written to a temp folder."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge.messages import PytorchEngineConfig


def save_tiny(model_cls, config, path, seed: int = 0):
    """Instantiate an HF model with random weights (fixed seed), save it as safetensors; returns the model."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # HF initialises some weights (norms) to constants: perturb everything so a wrong mapping shows
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path, safe_serialization=True)
    return model


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def cpu_config(**kw) -> PytorchEngineConfig:
    base = dict(device_type="cpu", dtype="float32", block_size=4, num_cpu_blocks=256)
    base.update(kw)
    return PytorchEngineConfig(**base)


@pytest.fixture
def tiny_dir(tmp_path):
    return str(tmp_path / "model")
