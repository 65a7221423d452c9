"""OLMo 2 architecture hyper-parameters, named like transformers' ``Olmo2Config`` fields."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from megolmo.errors import MegolmoConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


BACKENDS = ("auto", "te", "torch")


def about(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A field with one line of help, shown by ``docs/config.md``."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ModelConfig:
    name: str = about("custom", "the architecture's name (run directories are named after it)")
    vocab_size: int = about(100352, "embedding rows (OLMo 2 pads the dolma2 tokenizer's 100278 to 100352)")
    hidden_size: int = about(2048, "model width")
    intermediate_size: int = about(8192, "SwiGLU hidden width")
    num_hidden_layers: int = about(16, "transformer blocks")
    num_attention_heads: int = about(16, "query heads")
    num_key_value_heads: int = about(16, "key/value heads (fewer than query heads: grouped-query attention)")
    rope_theta: float = about(500000.0, "RoPE base frequency")
    rms_norm_eps: float = about(1e-6, "RMSNorm epsilon")
    max_position_embeddings: int = about(4096, "longest sequence the model is built for")
    initializer_range: float = about(0.02, "standard deviation of the initial weights")
    eos_token_id: int = about(100257, "end-of-document token (dolma2: 100257)")
    pad_token_id: int | None = about(100277, "padding token (dolma2: 100277)")
    vocab_pad_multiple: int = about(128, "the vocabulary is padded to a multiple of this (tensor-parallel splits)")
    activation_checkpointing: bool = about(False, "recompute each block's activations in backward (saves memory)")
    backend: str = about("auto", "kernels: auto (Transformer Engine where available), te, torch",
                         BACKENDS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> "ModelConfig":
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        for key in positive:
            if getattr(self, key) < 1:
                raise MegolmoConfigError(f"model.{key}={getattr(self, key)}: must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise MegolmoConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                                     f"model.num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MegolmoConfigError(f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                                     f"model.num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise MegolmoConfigError(f"model head_dim={self.head_dim} must be even for RoPE")
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MegolmoConfigError(f"model.{unknown[0]}: unknown model field (known: {', '.join(sorted(known))})")
        return cls(**dict(values)).validate()

    @classmethod
    def named(cls, name: str) -> "ModelConfig":
        """A named architecture from ``conf/model/<name>.yaml`` (the same files Hydra uses)."""
        path = CONF_DIR / "model" / f"{name}.yaml"
        if not path.exists():
            choices = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise MegolmoConfigError(f"model={name}: no such named config (choices: {', '.join(choices)})")
        return cls.from_mapping(yaml.safe_load(path.read_text()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
