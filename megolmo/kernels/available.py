"""What optional accelerators this process can use. The only module that imports them.

Each probe returns None when usable, else the reason it is not, for error messages and summary.json.
Transformer Engine raises on import without CUDA, and the PyPI package called ``apex`` is an unrelated
web toolkit, so "importable" is not enough: NVIDIA apex is recognised by its fused-kernel submodules.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache

import torch


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - TE raises RuntimeError/OSError without CUDA, not only ImportError
        first_line = str(error).splitlines()[0] if str(error) else ""
        return f"{module} cannot be imported ({type(error).__name__}: {first_line})"
    return None


@cache
def cuda_unavailable() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device is visible"


@cache
def transformer_engine_unavailable() -> str | None:
    return cuda_unavailable() or _import_error("transformer_engine.pytorch")


@cache
def nvidia_apex_unavailable() -> str | None:
    """NVIDIA apex (a source install) provides fused RMSNorm and FusedAdam CUDA kernels."""
    return cuda_unavailable() or _import_error("apex.normalization") or _import_error("apex.optimizers")


@cache
def flash_attn_unavailable() -> str | None:
    """The flash-attn package (its CUDA extension loads at import)."""
    return cuda_unavailable() or _import_error("flash_attn")


@cache
def torchao_float8_unavailable() -> str | None:
    return cuda_unavailable() or _import_error("torchao.float8")


def fp8_tensor_cores_unavailable(device: torch.device) -> str | None:
    """FP8 GEMMs need compute capability 8.9 (Ada) or 9.0 (Hopper) and newer."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no FP8 tensor cores"
    return None


@dataclass(frozen=True)
class Availability:
    """For each optional accelerator on one device: None when usable, else why not."""

    transformer_engine: str | None
    nvidia_apex: str | None
    flash_attn: str | None
    torchao_float8: str | None
    fp8_tensor_cores: str | None

    @classmethod
    def probe(cls, device: torch.device) -> "Availability":
        if device.type != "cuda":
            off = f"this process runs on {device.type}"
            return cls(off, off, off, off, off)
        return cls(transformer_engine_unavailable(), nvidia_apex_unavailable(), flash_attn_unavailable(),
                   torchao_float8_unavailable(), fp8_tensor_cores_unavailable(device))
