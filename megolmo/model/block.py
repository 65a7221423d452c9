"""One OLMo 2 block: norms after each sublayer ("reordered norm"), none on the block input.

    h   = x + post_attention_layernorm(self_attn(x))
    out = h + post_feedforward_layernorm(mlp(h))
"""
from __future__ import annotations

import torch
from torch import nn

from megolmo.model.attention import Attention
from megolmo.model.config import ModelConfig
from megolmo.model.mlp import SwiGLU
from megolmo.model.norm import RMSNorm
from megolmo.model.rope import RotaryEmbedding
from megolmo.parallel.layers import TensorParallel


def _residual_norm(cfg: ModelConfig, tp: TensorParallel, device) -> RMSNorm:
    norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device)
    # Under sequence parallelism each TP rank sees a different slice of tokens, so the gradient
    # of this replicated weight is partial and must be summed across the TP group.
    norm.weight.sequence_parallel = tp.sequence_parallel and tp.size > 1
    return norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, rope: RotaryEmbedding, device=None):
        super().__init__()
        self.self_attn = Attention(cfg, tp, rope, device=device)
        self.post_attention_layernorm = _residual_norm(cfg, tp, device)
        self.mlp = SwiGLU(cfg, tp, device=device)
        self.post_feedforward_layernorm = _residual_norm(cfg, tp, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(x))
        return h + self.post_feedforward_layernorm(self.mlp(h))
