"""Shared fixtures: small configs and token files; a short process-group timeout for multi-rank tests."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megolmo.model.config import ModelConfig

GQA = ModelConfig(name="test-gqa", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, eos_token_id=0, pad_token_id=None)
PLAIN = ModelConfig(name="test-plain", vocab_size=257, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=4, eos_token_id=0, pad_token_id=None)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def write_tokens(path, n_tokens: int, vocab: int, seed: int = 0, dtype=np.uint16) -> str:
    """A learnable token stream: a noisy repeating pattern, EOS (0) every 50 tokens."""
    rng = np.random.default_rng(seed)
    tokens = (np.arange(n_tokens) * 7 % min(61, vocab - 2) + 1 + rng.integers(0, 2, n_tokens)) % vocab
    tokens[::50] = 0
    tokens.astype(dtype).tofile(path)
    return str(path)


def write_mask(path, n_tokens: int, density: float, seed: int = 1) -> str:
    np.random.default_rng(seed).random(n_tokens).__lt__(density).astype(np.uint8).tofile(path)
    return str(path)
