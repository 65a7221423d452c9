"""Parameter counts from a config alone (no allocation), as transformers would count them."""
from __future__ import annotations

from megolmo.model.config import ModelConfig


def count_parameters(cfg: ModelConfig) -> int:
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    attention = 2 * h * h + 2 * h * kv + h + kv  # q, o, k, v projections; q_norm, k_norm
    mlp = 3 * h * cfg.intermediate_size
    norms = 2 * h
    return cfg.num_hidden_layers * (attention + mlp + norms) + 2 * cfg.vocab_size * h + h
