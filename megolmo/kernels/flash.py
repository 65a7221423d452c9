"""The flash-attn package's kernels as the attention core of the plain-torch back-end (imported only
when installed and on a GPU). It takes q/k/v as ``[batch, seq, heads, head_dim]``, our layout, and
handles grouped-query attention natively; it runs bf16/fp16 only, so fp32 runs keep SDPA."""
from __future__ import annotations

import torch
from flash_attn import flash_attn_func
from torch import nn

from megolmo.kernels.swap import swap_modules
from megolmo.model.attention import SdpaCore


class FlashAttnCore(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, seq, heads, head_dim = q.shape
        return flash_attn_func(q, k, v, causal=True).reshape(batch, seq, heads * head_dim)


def apply_flash_attn(model: nn.Module) -> list[str]:
    return swap_modules(model, lambda _, m: isinstance(m, SdpaCore), lambda _: FlashAttnCore())
