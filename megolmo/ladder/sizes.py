"""The ladder's model sizes and the parameter count N its scaling laws are written in.

N counts every parameter except the LM head: the blocks (projections and all RMSNorm weights, QK-norms
included), the final norm and the input embedding over the padded vocabulary. This is the rule that
reproduces OLMo's published ladder counts (190,354,176 ... 3,169,537,280) and its 7B and 13B targets
(6,887,575,552 and 13,202,396,160), so a fit on OLMo's exports and a fit on megolmo runs share one N.
"""
from __future__ import annotations

from typing import Any, Mapping

from megolmo.errors import MegolmoConfigError
from megolmo.model.config import ModelConfig
from megolmo.model.params import count_parameters

# name: (d_model, heads, layers); SwiGLU hidden 4 x d_model, vocab 100278 padded to 100352.
LADDER_SHAPES = {
    "190M": (768, 12, 12),
    "370M": (1024, 16, 16),
    "600M": (1344, 16, 16),
    "760M": (1536, 16, 16),
    "1B": (2048, 16, 16),
    "3B": (3328, 16, 16),
}
# Named targets: OLMo 2's released architectures (conf/model/).
TARGETS = {"1B": "olmo2_1b", "7B": "olmo2_7b", "13B": "olmo2_13b", "32B": "olmo2_32b"}


def ladder_shape(size: str) -> dict[str, int]:
    """One ladder size's fields over OLMo 2 1B (its other settings: dolma2 ids, RoPE, eps)."""
    if size not in LADDER_SHAPES:
        raise MegolmoConfigError(f"ladder size {size!r}: unknown (sizes: {', '.join(LADDER_SHAPES)})")
    return dict(zip(("hidden_size", "num_attention_heads", "num_hidden_layers"), LADDER_SHAPES[size]))


def ladder_config(size: str) -> ModelConfig:
    return shape_config(size, ladder_shape(size))


def shape_config(name: str, shape: Mapping[str, Any], base: str = "olmo2_1b") -> ModelConfig:
    """A ladder size given by its model fields over a named base (``conf/model/<base>.yaml``), with the
    ladder's rules where the shape is silent: SwiGLU hidden 4 x d_model, as many key/value heads as heads."""
    fields = {**ModelConfig.named(base).to_dict(), "name": f"ladder_{name}", **shape}
    if "intermediate_size" not in shape:
        fields["intermediate_size"] = 4 * fields["hidden_size"]
    if "num_key_value_heads" not in shape:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    try:
        return ModelConfig.from_mapping(fields)
    except MegolmoConfigError as error:
        raise MegolmoConfigError(f"ladder size {name!r}: {error}") from None


def ladder_params(cfg: ModelConfig) -> int:
    """N as OLMo's ladder counts it: all parameters but the LM head (see the module docstring)."""
    return count_parameters(cfg) - cfg.vocab_size * cfg.hidden_size


def target_config(name: str) -> ModelConfig:
    if name not in TARGETS:
        raise MegolmoConfigError(f"target {name!r}: unknown (targets: {', '.join(TARGETS)}; or give --n)")
    return ModelConfig.named(TARGETS[name])

