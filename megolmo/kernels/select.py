"""The one place that decides which kernels a run uses (``model.backend=auto|te|torch``, ``precision``
and ``fp8.*``), checked at start-up so that an impossible request fails in one line before anything
is built.

* ``torch``: plain PyTorch; attention through the flash-attn package when it is installed (bf16 and
  fp8 runs on a GPU), else ``scaled_dot_product_attention`` (flash attention on GPUs); NVIDIA apex's
  fused RMSNorm replaces ours when apex is installed and the blocks are not compiled (``torch.compile``
  fuses our norm itself, and cannot trace into apex's extension).
* The AdamW update: apex's fused Adam kernel when apex is installed, torch's fused AdamW kernel on
  other GPUs, the reference element-wise maths on CPUs.
* ``te``: Transformer Engine's ``Linear``, ``RMSNorm`` and ``DotProductAttention`` (CUDA only).
* FP8: Transformer Engine's autocast with a delayed or current scaling recipe on the ``te`` backend;
  on the ``torch`` backend, torchao's float8 training (dynamic, i.e. current, tensor-wise scaling).
  FP8 needs a GPU with FP8 tensor cores (compute capability 8.9 or newer): elsewhere it is refused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from megolmo.errors import MegolmoConfigError
from megolmo.kernels.available import Availability
from megolmo.model.config import BACKENDS, ModelConfig

PRECISIONS = ("fp32", "bf16", "fp8")
FP8_RECIPES = ("delayed", "current")


@dataclass(frozen=True)
class Fp8Settings:
    """``fp8.recipe`` and ``fp8.bf16_first_last`` (keep the model's first and last blocks in BF16)."""

    recipe: str = "delayed"
    bf16_first_last: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "Fp8Settings":
        values = dict(values or {})
        unknown = sorted(set(values) - {"recipe", "bf16_first_last"})
        if unknown:
            raise MegolmoConfigError(f"fp8.{unknown[0]}: unknown key (known: recipe, bf16_first_last)")
        settings = cls(**values)
        if settings.recipe not in FP8_RECIPES:
            raise MegolmoConfigError(f"fp8.recipe={settings.recipe}: choose one of {', '.join(FP8_RECIPES)}")
        return settings

    def bf16_layers(self, num_layers: int) -> frozenset[int]:
        """Global ids of the blocks that run in BF16 under FP8."""
        return frozenset({0, num_layers - 1}) if self.bf16_first_last else frozenset()


@dataclass(frozen=True)
class KernelChoice:
    backend: str    # what model.backend resolved to: "te" or "torch"
    attention: str  # "te-dot-product-attention", "flash-attn", "flash-sdpa" (torch on CUDA) or "sdpa"
    norm: str       # "te", "apex" or "torch"
    fp8: str | None  # None, "te-delayed", "te-current" or "torchao-tensorwise"
    optimizer: str  # "apex-fused-adam", "torch-fused-adamw" (CUDA without apex) or "reference" (element-wise)
    accelerators: dict[str, str]  # optional library -> "available" or why it is not (reported in summary.json)

    def to_dict(self) -> dict:
        return asdict(self)


def _fp8_kind(backend: str, fp8: Fp8Settings, device_type: str, can: Availability) -> str:
    if device_type != "cuda":
        raise MegolmoConfigError(f"precision=fp8 needs a CUDA GPU with FP8 tensor cores; this process runs on "
                                 f"{device_type}: use precision=bf16")
    if can.fp8_tensor_cores:
        raise MegolmoConfigError(f"precision=fp8: {can.fp8_tensor_cores}: use precision=bf16")
    if backend == "te":
        return f"te-{fp8.recipe}"
    if can.torchao_float8:
        te_state = can.transformer_engine or "Transformer Engine is not chosen (model.backend=torch)"
        raise MegolmoConfigError(f"precision=fp8 needs Transformer Engine or torchao: {te_state}; "
                                 f"{can.torchao_float8}")
    if fp8.recipe != "current":
        raise MegolmoConfigError(f"fp8.recipe={fp8.recipe} needs Transformer Engine; without it FP8 runs through "
                                 "torchao float8, which scales dynamically: set fp8.recipe=current")
    return "torchao-tensorwise"


def decide_kernels(backend: str, precision: str, device_type: str, fp8: Fp8Settings, can: Availability,
                   compiled: bool = False) -> KernelChoice:
    """The decision itself, from what is available on the device (``Availability.probe``)."""
    if backend not in BACKENDS:
        raise MegolmoConfigError(f"model.backend={backend}: choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise MegolmoConfigError(f"precision={precision}: choose one of {', '.join(PRECISIONS)}")
    if backend == "te" and can.transformer_engine:
        raise MegolmoConfigError(f"model.backend=te: Transformer Engine cannot be used: {can.transformer_engine}; "
                                 "use model.backend=torch")
    resolved = "te" if backend == "te" or (backend == "auto" and not can.transformer_engine) else "torch"
    fp8_kind = _fp8_kind(resolved, fp8, device_type, can) if precision == "fp8" else None
    accelerators = {name: reason or "available" for name, reason in asdict(can).items()}
    optimizer = ("apex-fused-adam" if not can.nvidia_apex else
                 "torch-fused-adamw" if device_type == "cuda" else "reference")
    if resolved == "te":
        return KernelChoice("te", "te-dot-product-attention", "te", fp8_kind, optimizer, accelerators)
    attention = ("flash-attn" if not can.flash_attn and precision != "fp32" else
                 "flash-sdpa" if device_type == "cuda" else "sdpa")
    norm = "apex" if not can.nvidia_apex and not compiled else "torch"
    return KernelChoice("torch", attention, norm, fp8_kind, optimizer, accelerators)


def choose_kernels(backend: str, precision: str, device: torch.device, fp8: Fp8Settings | None = None,
                   compiled: bool = False) -> KernelChoice:
    """What this process runs, given what its device has (``compiled``: ``trainer.compile``)."""
    return decide_kernels(backend, precision, device.type, fp8 or Fp8Settings(), Availability.probe(device),
                          compiled)


FP8_ALIGNMENT = 16  # FP8 GEMMs (cuBLASLt, TE, torchao) need both matrix dimensions to be multiples of 16


def check_fp8_shapes(cfg: ModelConfig, tp: int, tokens_per_micro_batch: int) -> None:
    """Every FP8 GEMM's dimensions, checked before anything is built (TE would assert mid-step)."""
    q_width, kv_width = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    sizes = {"trainer.micro_batch_size x data.seq_len": tokens_per_micro_batch,
             "model.hidden_size": cfg.hidden_size,
             "model.num_attention_heads x head_dim / parallel.tensor": q_width // tp,
             "model.num_key_value_heads x head_dim / parallel.tensor": kv_width // tp,
             "model.intermediate_size / parallel.tensor": cfg.intermediate_size // tp}
    for what, size in sizes.items():
        if size % FP8_ALIGNMENT:
            raise MegolmoConfigError(f"precision=fp8: {what} = {size} is not a multiple of {FP8_ALIGNMENT}, "
                                     "which FP8 matrix multiplies need")
