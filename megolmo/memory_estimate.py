"""Per-GPU memory of a config on a number of ranks, from the config alone: what a recipe's layout needs
before a cluster is booked.

    python -m megolmo.memory_estimate --ranks 64 +recipe=olmo2_7b_stage1

Weights, gradients and optimizer state follow megolmo's buffers exactly (the start-up block's numbers):
compute-dtype weights, fp32 gradients, fp32 master copy (unless the weights are fp32) and Adam moments,
sharded over DP with the distributed optimizer. Activations are an estimate: Megatron's
``s*b*h*(34 + 5*a*s/h) / t`` bytes per layer with sequence parallelism, without the attention-score term
(flash attention), plus 8*s*b*h/t for OLMo 2's extra norms (QK-norm, post-norms); with activation
checkpointing only each layer's input (2*s*b*h/t). A 1F1B pipeline's first stage holds up to PP micro-batches
in flight. The logits add their compute-dtype tensor and the cross-entropy's fp32 chunks (at most 1 GiB).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from megolmo.config.load import CONF_DIR, compose_config
from megolmo.model.config import ModelConfig
from megolmo.parallel.cross_entropy import CHUNK_ELEMENTS

GB = 1e9
BYTES = {"fp32": 4, "bf16": 2, "fp8": 2}


@dataclass
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits


def parameters_per_rank(cfg: ModelConfig, tp: int, pp: int) -> int:
    """The most parameters a rank holds: its stage's layers split over TP, plus the embedding or the head."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    layer = (2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size) // tp + h + kv + 2 * h
    padded_vocab = math.ceil(cfg.vocab_size / (cfg.vocab_pad_multiple * tp)) * cfg.vocab_pad_multiple * tp
    ends = padded_vocab // tp * h * (2 if pp == 1 else 1) + h
    return math.ceil(cfg.num_hidden_layers / pp) * layer + ends


def estimate(cfg, ranks: int) -> MemoryEstimate:
    model = ModelConfig.from_mapping(cfg.model)
    p, t = cfg.parallel, cfg.trainer
    tp, pp = p.tensor, p.pipeline
    dp = ranks // (tp * pp)
    params = parameters_per_rank(model, tp, pp)
    compute = BYTES[cfg.precision]
    optimizer_bytes = (8 if compute == 4 else 12) / (dp if p.distributed_optimizer else 1)
    s, b, h = cfg.data.seq_len, t.micro_batch_size, model.hidden_size
    per_layer = (2 if model.activation_checkpointing else 42) * s * b * h / tp * compute / 2
    in_flight = min(pp, t.global_batch_size // dp // b) if pp > 1 else 1
    layers = math.ceil(model.num_hidden_layers / pp)
    logits_elements = s * b * math.ceil(model.vocab_size / tp)
    logits = logits_elements * compute * 2 + min(logits_elements, CHUNK_ELEMENTS) * 4
    return MemoryEstimate(params * compute / GB, params * 4 / GB, params * optimizer_bytes / GB,
                          per_layer * layers * in_flight / GB, logits / GB)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, required=True, help="GPUs in the job (nodes x GPUs per node)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. +recipe=olmo2_7b_stage1")
    args = parser.parse_args(argv)
    cfg = compose_config(args.overrides, CONF_DIR)  # a recipe's ??? values are not needed here
    e = estimate(cfg, args.ranks)
    p = cfg.parallel
    print(f"{args.ranks} ranks = TP {p.tensor} x PP {p.pipeline} x DP {args.ranks // (p.tensor * p.pipeline)}: "
          f"{e.weights:.1f} GB weights + {e.grads:.1f} GB grads + {e.optimizer:.1f} GB optimizer + "
          f"{e.activations:.1f} GB activations + {e.logits:.1f} GB logits = {e.total:.1f} GB per GPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
