"""NVIDIA apex's fused RMSNorm for the plain-torch back-end (imported only when apex is installed,
which is a source install: the PyPI package of that name is unrelated)."""
from __future__ import annotations

from apex.normalization import FusedRMSNorm
from torch import nn

from megolmo.kernels.swap import carry_parameter, swap_modules
from megolmo.model.norm import RMSNorm
from megolmo.parallel.mappings import group_size


def _fused_rms_norm(old: RMSNorm) -> nn.Module:
    new = FusedRMSNorm(old.weight.shape[0], eps=old.eps).to(device=old.weight.device, dtype=old.weight.dtype)
    carry_parameter(old.weight, new.weight)
    return new


def apply_fused_rms_norm(model: nn.Module) -> list[str]:
    """Swap every norm whose statistic is local (not the QK-norm at TP > 1) for apex's fused kernel."""
    return swap_modules(model, lambda _, m: isinstance(m, RMSNorm) and group_size(m.stat_group) == 1,
                        _fused_rms_norm)
