"""Model FLOPs per token and known accelerator peaks, for MFU.

Training FLOPs per token = 6 x (matmul parameters, LM head included, embedding excluded)
+ 12 x layers x hidden x sequence (attention scores and values, counted un-masked as PaLM and
Megatron do).
"""
from __future__ import annotations

import torch

from megolmo.model.config import ModelConfig

# Dense BF16 tensor-core peaks (no sparsity), in FLOP/s.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def matmul_parameters(cfg: ModelConfig) -> int:
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * cfg.intermediate_size
    return cfg.num_hidden_layers * per_layer + cfg.vocab_size * h


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 6.0 * matmul_parameters(cfg) + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def device_peak_flops(device: torch.device) -> float | None:
    """The BF16 peak of a known GPU; None on CPUs and unknown devices (MFU is then reported as null)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
