"""Causal self-attention with OLMo 2's full-width QK-norm, GQA and RoPE, split over heads under TP.

Under TP each rank holds ``heads/tp`` query heads and ``kv_heads/tp`` key/value heads, contiguous, so
local query head ``j`` uses local kv head ``j // (heads/kv_heads)`` exactly as in the unsplit model.
The q/k projections sit inside the TP region (full sequence, head-split, also under sequence
parallelism), so QK-norm's statistic, which spans every head, is a sum of squares all-reduced over
the TP group: ``batch x seq`` fp32 elements for q and as many for k, forward and backward. Its
weights are sharded like the heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megolmo.model.config import ModelConfig
from megolmo.model.norm import RMSNorm
from megolmo.model.rope import RotaryEmbedding
from megolmo.parallel.layers import (ColumnParallelLinear, RowParallelLinear, ShardSpec, TensorParallel,
                                     enter_tensor_parallel_region, exit_tensor_parallel_region)


def _check_divisible(value: int, key: str, tp: int) -> int:
    if value % tp:
        raise ValueError(f"model.{key}={value} is not divisible by parallel.tensor={tp}")
    return value // tp


class SdpaCore(nn.Module):
    """Causal attention over ``[batch, seq, heads, head_dim]`` q/k/v, returning ``[batch, seq, heads * head_dim]``:
    torch's ``scaled_dot_product_attention`` (flash attention on GPUs). Kernel back-ends replace this
    module (Transformer Engine's ``DotProductAttention`` takes the same layout)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, seq, heads, head_dim = q.shape
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             enable_gqa=k.shape[2] != heads)
        return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, rope: RotaryEmbedding, device=None):
        super().__init__()
        self.tp = tp
        self.rope = rope
        self.head_dim = cfg.head_dim
        self.local_heads = _check_divisible(cfg.num_attention_heads, "num_attention_heads", tp.size)
        self.local_kv_heads = _check_divisible(cfg.num_key_value_heads, "num_key_value_heads", tp.size)
        q_width, kv_width = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, q_width, tp, device=device)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, kv_width, tp, device=device)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, kv_width, tp, device=device)
        self.o_proj = RowParallelLinear(q_width, cfg.hidden_size, tp, device=device)
        self.q_norm = RMSNorm(q_width // tp.size, cfg.rms_norm_eps, q_width, tp.group,
                              ShardSpec((q_width,), 0, tp.rank, tp.size), device=device)
        self.k_norm = RMSNorm(kv_width // tp.size, cfg.rms_norm_eps, kv_width, tp.group,
                              ShardSpec((kv_width,), 0, tp.rank, tp.size), device=device)
        self.core = SdpaCore()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tensor_parallel_region(x, self.tp)
        batch, seq, _ = x.shape
        q = self.rope(self.q_norm(self.q_proj(x)).view(batch, seq, self.local_heads, self.head_dim))
        k = self.rope(self.k_norm(self.k_proj(x)).view(batch, seq, self.local_kv_heads, self.head_dim))
        v = self.v_proj(x).view(batch, seq, self.local_kv_heads, self.head_dim)
        return exit_tensor_parallel_region(self.o_proj(self.core(q, k, v)), self.tp)
