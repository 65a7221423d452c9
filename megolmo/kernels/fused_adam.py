"""Fused AdamW updates over lists of flat fp32 shard ranges: one kernel launch per list instead of
one per element-wise operation. NVIDIA apex's ``multi_tensor_adam`` (what its ``FusedAdam`` runs) when
apex is installed, else torch's own fused AdamW kernel (CUDA and CPU). Both use torch AdamW's maths:
decoupled weight decay ``p *= 1 - lr * wd`` and bias-corrected moments."""
from __future__ import annotations

from typing import Callable

import torch

Tensors = list[torch.Tensor]


def torch_fused_adamw(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, lr: float,
                      betas: tuple[float, float], eps: float, step: int, weight_decay: float) -> None:
    # torch.full fills on the device; torch.tensor(step, device=...) would copy from the host and wait
    steps = [torch.full((), float(step), device=params[0].device)] * len(params)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=betas[0], beta2=betas[1],
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False, grad_scale=None,
                        found_inf=None)


def apex_fused_adam(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, lr: float,
                    betas: tuple[float, float], eps: float, step: int, weight_decay: float) -> None:
    import amp_C
    from apex.multi_tensor_apply import multi_tensor_applier

    no_overflow_check = torch.zeros(1, dtype=torch.int, device=params[0].device)
    multi_tensor_applier(amp_C.multi_tensor_adam, no_overflow_check, [grads, params, exp_avgs, exp_avg_sqs],
                         lr, betas[0], betas[1], eps, step, 1, 1, weight_decay)  # mode 1: AdamW; bias correction on


UPDATES: dict[str, Callable] = {"apex-fused-adam": apex_fused_adam, "torch-fused-adamw": torch_fused_adamw}
