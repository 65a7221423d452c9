"""OLMo 2 architecture hyper-parameters, named like transformers' ``Olmo2Config`` fields."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from megolmo.errors import MegolmoConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 100352
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    eos_token_id: int = 100257
    pad_token_id: int | None = 100277
    vocab_pad_multiple: int = 128
    activation_checkpointing: bool = False
    backend: str = "auto"

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
