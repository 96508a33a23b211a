"""Shared fixtures: tiny models, so the suite stays fast on two CPU cores."""

from __future__ import annotations

import pytest
import torch

from ted_scale.model import GPT, GPTConfig

def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig(vocab_size=101, n_positions=64, n_embd=48, n_layer=4, n_head=4, dropout=0.0)


@pytest.fixture
def tiny_gpt(tiny_config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config).eval()
