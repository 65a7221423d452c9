"""Mapping between ``ModelConfig`` and transformers' ``Olmo2Config`` fields.

Olmo2Config's defaults are not OLMo 2's values, so every field is written explicitly.
"""
from __future__ import annotations

from typing import Any

from megolmo.model.config import ModelConfig


def to_hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["Olmo2ForCausalLM"],
        "model_type": "olmo2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": cfg.eos_token_id,
        "use_cache": True,
    }


def from_hf_config_dict(hf: dict[str, Any], name: str = "converted") -> ModelConfig:
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 500000.0))
    return ModelConfig(
        name=name, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        rope_theta=float(theta), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        initializer_range=hf.get("initializer_range", 0.02), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id")).validate()


def hf_config(cfg: ModelConfig):
    """A transformers ``Olmo2Config`` (imports transformers lazily: it is the optional ``hf`` extra)."""
    from transformers import Olmo2Config

    return Olmo2Config(**{k: v for k, v in to_hf_config_dict(cfg).items() if k not in ("architectures", "model_type")})
