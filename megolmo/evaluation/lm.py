"""Held-out perplexity: one forward-only pass over each named set of token files, under the training layout.

A set's instances are read in batches shaped exactly like a training step's (global batch, data-parallel
split, micro-batches), so the pass runs through the same chunks and pipeline schedule as training, and its
sums are the same for every layout. The last batch is padded with rows that carry no labels. Cross-entropy
is the mean over label tokens (1..seq_len-1 of each instance, as in training) and perplexity its exp.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megolmo.data.dataset import TokenDataset
from megolmo.data.loader import GlobalBatchLoader
from megolmo.data.sources import resolve_sources
from megolmo.errors import MegolmoConfigError
from megolmo.parallel.collectives import all_reduce_values
from megolmo.parallel.state import ParallelState
from megolmo.step.train_step import TrainStep


@dataclass
class HeldOutSet:
    name: str
    batches: GlobalBatchLoader  # padded past the set's last instance
    num_batches: int


def build_held_out_sets(sets: Mapping[str, Any], data_cfg: Mapping[str, Any], trainer_cfg: Mapping[str, Any],
                        vocab_size: int, eos_token_id: int | None, ps: ParallelState) -> list[HeldOutSet]:
    """``eval.lm.sets`` (name -> token files, rooted and typed like ``data.paths``), checked at start-up."""
    held_out = []
    for name, paths in sets.items():
        if not paths:
            raise MegolmoConfigError(f"eval.lm.sets.{name} is empty: give its token files")
        sources = resolve_sources({"paths": list(paths), "root": data_cfg.get("root"), "dtype": data_cfg.get("dtype")})
        dataset = TokenDataset(sources.paths, int(data_cfg["seq_len"]), sources.dtype, vocab_size, seed=0,
                               eos_token_id=eos_token_id)
        gbs = int(trainer_cfg["global_batch_size"])
        loader = GlobalBatchLoader(dataset, gbs, int(trainer_cfg["micro_batch_size"]), ps.dp_rank, ps.dp,
                                   limit=len(dataset))
        held_out.append(HeldOutSet(str(name), loader, math.ceil(len(dataset) / gbs)))
    return held_out


def evaluate_set(step_fn: TrainStep, held_out: HeldOutSet, ps: ParallelState) -> dict[str, float]:
    """``CE`` and ``PPL`` of one set; one epoch of its instances covers each exactly once."""
    ce_sum = 0.0
    local_tokens = 0
    for b in range(held_out.num_batches):
        batch = held_out.batches.read_step(b)
        ce_sum += float(step_fn.evaluate(batch.micro_batches).sum())
        local_tokens += batch.loss_tokens
    tokens = all_reduce_values([local_tokens], "sum", ps.dp_group)[0]
    ce = ce_sum / max(tokens, 1)
    return {"CE": ce, "PPL": math.exp(min(ce, 700.0))}
