"""The Transformer Engine back-end: TE's ``Linear``, ``RMSNorm`` and ``DotProductAttention`` in place of
ours, and its FP8 autocast around the blocks. Imported only when ``choose_kernels`` picked TE (TE
raises on import without CUDA).

TE's linears run as plain local GEMMs (``parallel_mode=None``): the tensor-parallel collectives stay
in our sublayers, so every layout, the collective counts and the checkpoints are the same on both
back-ends. Norms whose statistic spans TP ranks (the full-width QK-norm at TP > 1) stay ours.
FP8 scaling factors are agreed over ``amax_group`` (the TP x DP ranks of a pipeline stage, as in
Megatron), and blocks in ``bf16_layers`` run with FP8 off. Activation checkpointing goes through
``te.pytorch.checkpoint``, which recomputes under the same FP8 scales as the first forward.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import transformer_engine.pytorch as te
from torch import nn
from transformer_engine.common import recipe as te_recipe

from megolmo.model.attention import SdpaCore
from megolmo.model.norm import RMSNorm
from megolmo.model.olmo2 import LayerExecution, Olmo2ForCausalLM
from megolmo.kernels.swap import carry_parameter, swap_modules
from megolmo.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megolmo.parallel.mappings import Group, group_size


def fp8_recipe(name: str):
    """``fp8.recipe``: delayed scaling (amax history of 1024 steps, max) or per-tensor current scaling;
    E4M3 forward and E5M2 gradients (the HYBRID format) either way."""
    if name == "delayed":
        return te_recipe.DelayedScaling(fp8_format=te_recipe.Format.HYBRID, amax_history_len=1024,
                                        amax_compute_algo="max")
    return te_recipe.Float8CurrentScaling(fp8_format=te_recipe.Format.HYBRID)


def fp8_context(enabled: bool, recipe=None, group: Group = None) -> AbstractContextManager:
    """TE's autocast (``te.autocast`` from TE 2.9, ``fp8_autocast`` before)."""
    if hasattr(te, "autocast"):
        return te.autocast(enabled=enabled, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=enabled, fp8_recipe=recipe, fp8_group=group)


class TeAttentionCore(nn.Module):
    """TE's fused causal attention over ``[batch, seq, heads, head_dim]`` q/k/v (as ``SdpaCore``)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.attention = te.DotProductAttention(heads, head_dim, num_gqa_groups=kv_heads, attention_dropout=0.0,
                                                qkv_format="bshd", attn_mask_type="causal")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attention(q, k, v)


class TeLayerExecution(LayerExecution):
    def __init__(self, checkpointing: bool, recipe, amax_group: Group, bf16_layers: frozenset[int]):
        super().__init__(checkpointing)
        self.recipe = recipe
        self.amax_group = amax_group
        self.bf16_layers = bf16_layers

    def stack(self) -> AbstractContextManager:
        return fp8_context(True, self.recipe, self.amax_group) if self.recipe is not None else nullcontext()

    def run(self, layer_id: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with fp8_context(False) if self.recipe is not None and layer_id in self.bf16_layers else nullcontext():
            if self.checkpointing and torch.is_grad_enabled():
                return te.checkpoint(block, x)
            return block(x)


def _te_linear(old: nn.Linear) -> nn.Module:
    new = te.Linear(old.in_features, old.out_features, bias=False, params_dtype=old.weight.dtype,
                    device=old.weight.device)
    carry_parameter(old.weight, new.weight)
    return new


def _te_rms_norm(old: RMSNorm) -> nn.Module:
    new = te.RMSNorm(old.weight.shape[0], eps=old.eps, device=old.weight.device).to(dtype=old.weight.dtype)
    carry_parameter(old.weight, new.weight)
    return new


def apply_transformer_engine(model: Olmo2ForCausalLM, fp8_recipe_name: str | None, amax_group: Group,
                             bf16_layers: frozenset[int]) -> list[str]:
    """Swap ``model``'s GEMMs, local norms and attention cores for TE's; returns the swapped names."""
    swapped = swap_modules(model, lambda _, m: isinstance(m, (ColumnParallelLinear, RowParallelLinear)), _te_linear)
    swapped += swap_modules(model, lambda _, m: isinstance(m, RMSNorm) and group_size(m.stat_group) == 1,
                            _te_rms_norm)
    for block in model.model.layers.values():
        attention = block.self_attn
        if isinstance(attention.core, SdpaCore):
            attention.core = TeAttentionCore(attention.local_heads, attention.local_kv_heads, attention.head_dim)
    model.model.execution = TeLayerExecution(model.cfg.activation_checkpointing,
                                             fp8_recipe(fp8_recipe_name) if fp8_recipe_name else None,
                                             amax_group, bf16_layers)
    return swapped
