"""AdamW with Megatron-style mixed precision: the model computes in its own dtype (fp32 or bf16),
gradients accumulate in a contiguous fp32 buffer, and AdamW updates fp32 master weights that are
copied back into the model after each step.

Weight decay applies to every parameter except the embeddings, as in OLMo 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megolmo.optim.clip import clip_factor, global_grad_norm
from megolmo.optim.grad_buffer import GradBuffer
from megolmo.parallel.mappings import Group


@dataclass(frozen=True)
class AdamWSettings:
    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad_norm: float = 1.0


def decays(name: str) -> bool:
    return "embed_tokens" not in name


class MixedPrecisionAdamW:
    def __init__(self, model: nn.Module, settings: AdamWSettings, tp_rank: int = 0,
                 norm_groups: list[Group] | None = None):
        self.settings = settings
        self.tp_rank = tp_rank
        self.norm_groups = norm_groups or []
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model_params = [p for _, p in named]
        self.grads = GradBuffer(self.model_params)
        self.master_params = [self._master_copy(p) for p in self.model_params]
        groups = [
            {"params": [m for (n, _), m in zip(named, self.master_params) if decays(n)],
             "weight_decay": settings.weight_decay},
            {"params": [m for (n, _), m in zip(named, self.master_params) if not decays(n)], "weight_decay": 0.0},
        ]
        self.inner = torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr, betas=settings.betas,
                                       eps=settings.eps, foreach=True)

    @staticmethod
    def _master_copy(param: nn.Parameter) -> nn.Parameter:
        if param.dtype == torch.float32:
            return param
        master = nn.Parameter(param.detach().float().clone())
        master.grad = param.main_grad
        return master

    def zero_grad(self) -> None:
        self.grads.zero()

    @torch.no_grad()
    def step(self, lr: float) -> float:
        """Clip, update and copy back; returns the pre-clip global gradient norm."""
        norm = global_grad_norm(self.model_params, self.tp_rank, self.norm_groups)
        self.grads.data.mul_(clip_factor(norm, self.settings.clip_grad_norm))
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.step()
        for param, master in zip(self.model_params, self.master_params):
            if param is not master:
                param.copy_(master)
        return float(norm)

    def state_bytes(self) -> int:
        """Bytes of optimizer state: Adam moments plus fp32 master copies that are not the model itself."""
        moments = sum(t.numel() * t.element_size() for s in self.inner.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
        masters = sum(m.numel() * 4 for p, m in zip(self.model_params, self.master_params) if p is not m)
        return moments + masters
