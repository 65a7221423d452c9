"""The ladder's model sizes and the parameter count N its scaling laws are written in.

N counts every parameter except the LM head: the blocks (projections and all RMSNorm weights, QK-norms
included), the final norm and the input embedding over the padded vocabulary. This is the rule that
reproduces OLMo's published ladder counts (190,354,176 ... 3,169,537,280) and its 7B and 13B targets
(6,887,575,552 and 13,202,396,160), so a fit on OLMo's exports and a fit on megolmo runs share one N.
"""
from __future__ import annotations

import re

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
SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def ladder_config(size: str) -> ModelConfig:
    """One ladder size in OLMo 2's architecture (the 1B's other settings: dolma2 ids, RoPE, eps)."""
    if size not in LADDER_SHAPES:
        raise MegolmoConfigError(f"ladder size {size!r}: unknown (sizes: {', '.join(LADDER_SHAPES)})")
    d_model, heads, layers = LADDER_SHAPES[size]
    base = ModelConfig.named("olmo2_1b").to_dict()
    return ModelConfig.from_mapping({**base, "name": f"ladder_{size}", "hidden_size": d_model,
                                     "intermediate_size": 4 * d_model, "num_hidden_layers": layers,
                                     "num_attention_heads": heads, "num_key_value_heads": heads})


def ladder_params(cfg: ModelConfig) -> int:
    """N as OLMo's ladder counts it: all parameters but the LM head (see the module docstring)."""
    return count_parameters(cfg) - cfg.vocab_size * cfg.hidden_size


def target_config(name: str) -> ModelConfig:
    if name not in TARGETS:
        raise MegolmoConfigError(f"target {name!r}: unknown (targets: {', '.join(TARGETS)}; or give --n)")
    return ModelConfig.named(TARGETS[name])


def parse_count(text: str) -> int:
    """``4T``, ``100B``, ``190M``, ``1.5e9`` or a plain integer, for token and parameter counts."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBT]?)\s*", text.upper())
    if not match:
        raise MegolmoConfigError(f"{text!r}: not a count (e.g. 4T, 100B, 190M, 1000000)")
    return round(float(match[1]) * SUFFIXES.get(match[2], 1))
