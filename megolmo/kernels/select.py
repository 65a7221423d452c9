"""The one place that decides which kernels a run uses (``model.backend=auto|te|torch`` and
``precision``), checked at start-up so that an impossible request fails before anything is built.

Wired today: ``torch`` (plain PyTorch; attention through ``scaled_dot_product_attention``, which is flash
attention on GPUs). The Transformer Engine path (TE linears, RMSNorm, DotProductAttention, FP8 through
``fp8_autocast``) and torchao float8 plug in here; until they are wired and validated on a GPU,
requests for them are refused with the reason instead of silently running something else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from megolmo.errors import MegolmoConfigError
from megolmo.kernels import available

BACKENDS = ("auto", "te", "torch")
PRECISIONS = ("fp32", "bf16", "fp8")


@dataclass(frozen=True)
class KernelChoice:
    backend: str    # what model.backend resolved to
    attention: str  # "flash-sdpa" on CUDA, "sdpa" on CPU
    accelerators: dict[str, str]  # optional library -> "available" or why it is not (reported in summary.json)

    def to_dict(self) -> dict:
        return asdict(self)


def choose_kernels(backend: str, precision: str, device: torch.device) -> KernelChoice:
    if backend not in BACKENDS:
        raise MegolmoConfigError(f"model.backend={backend}: choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise MegolmoConfigError(f"precision={precision}: choose one of {', '.join(PRECISIONS)}")
    te_missing = available.transformer_engine_unavailable() if device.type == "cuda" else \
        f"this process runs on {device.type}"
    if backend == "te":
        reason = te_missing or "megolmo's Transformer Engine path is not wired in this version"
        raise MegolmoConfigError(f"model.backend=te: Transformer Engine cannot be used: {reason}; "
                                 "use model.backend=torch")
    if precision == "fp8":
        reason = (f"this process runs on {device.type}" if device.type != "cuda" else
                  "megolmo's FP8 path (Transformer Engine or torchao float8) is not wired in this version")
        raise MegolmoConfigError(f"precision=fp8: {reason}; use precision=bf16")
    accelerators = {
        "transformer_engine": te_missing or "available",
        "nvidia_apex": available.nvidia_apex_unavailable() or "available",
        "torchao_float8": available.torchao_float8_unavailable() or "available",
    }
    return KernelChoice("torch", "flash-sdpa" if device.type == "cuda" else "sdpa", accelerators)
