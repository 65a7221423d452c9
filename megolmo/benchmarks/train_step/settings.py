"""What one benchmark run measures: the model, the batch shape, the peers and the groups
(precision x activation checkpointing) they are timed in."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from megolmo.model.config import ModelConfig

PEERS = ("megolmo", "transformers", "olmo_core")
# Parameter dtype per precision: fp8 keeps bf16 parameters and runs the GEMMs in FP8 inside the model.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def bench_model_config() -> ModelConfig:
    """The default benchmark shape: OLMo 2's full vocabulary and a small trunk (about 130M
    parameters, two thirds of them embedding and LM head, as in a real OLMo 2 1B's share at short
    context). A step takes seconds on a couple of CPU cores."""
    return ModelConfig(name="bench", vocab_size=100352, hidden_size=512, intermediate_size=1536,
                       num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                       eos_token_id=0, pad_token_id=None).validate()


def resolve_model(name: str) -> ModelConfig:
    """``bench`` is the default shape above; any other name is a shipped config (conf/model/*.yaml)."""
    return bench_model_config() if name == "bench" else ModelConfig.named(name)


@dataclass
class BenchSettings:
    model: ModelConfig = field(default_factory=bench_model_config)
    seq_len: int = 512
    batch: int = 4
    steps: int = 6
    warmup: int = 2
    precisions: tuple[str, ...] = ("fp32", "bf16")
    checkpointing: tuple[bool, ...] = (False,)
    fp8_recipe: str = "delayed"
    compile: bool = False
    peers: tuple[str, ...] = PEERS
    threads: int | None = None
    device: str = "cpu"
    seed: int = 1234
    mm_size: int | None = None


@dataclass(frozen=True)
class Variant:
    """What every peer of one group runs: a precision, activation checkpointing on or off, and whether
    each peer's transformer blocks go through ``torch.compile`` (as OLMo-core's published figures do)."""

    precision: str
    checkpointing: bool
    fp8_recipe: str = "delayed"
    compile: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def mm_key(self) -> str:
        """The matmul rate this group is measured against: that of its parameter dtype."""
        return DTYPE_NAMES[self.dtype]

    @property
    def label(self) -> str:
        return f"{self.precision} ckpt={'on' if self.checkpointing else 'off'}"


def default_threads() -> int:
    """Every core this process may run on (its affinity mask, not the machine's count, where known)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
