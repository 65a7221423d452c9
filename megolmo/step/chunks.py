"""This rank's model chunks: its share of the layers (all of them without a pipeline), initialised
from the seed and global names alone (layout-independent), with the chosen kernels swapped in."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megolmo.kernels.apply import prepare_model
from megolmo.kernels.select import Fp8Settings, KernelChoice
from megolmo.model.config import ModelConfig
from megolmo.model.init import initialize_parameters
from megolmo.model.olmo2 import Olmo2ForCausalLM
from megolmo.parallel.layers import TensorParallel
from megolmo.parallel.state import ParallelState
from megolmo.pipeline.schedules import stage_indexes


@dataclass(frozen=True)
class ChunkSettings:
    model: ModelConfig
    dtype: torch.dtype
    kernels: KernelChoice
    fp8: Fp8Settings
    seed: int
    layer_ranges: tuple[range, ...]  # every chunk's layer ids, in model order
    sequence_parallel: bool = False
    compile_blocks: bool = False


def build_chunks(settings: ChunkSettings, ps: ParallelState, schedule: str, virtual: int
                 ) -> list[Olmo2ForCausalLM]:
    """The chunks ``schedule`` places on this pipeline rank, in its local order."""
    tp = TensorParallel(ps.tp_group, settings.sequence_parallel)
    last = len(settings.layer_ranges) - 1
    chunks = []
    for index in stage_indexes(schedule, ps.pp_rank, ps.pp, virtual):
        chunk = Olmo2ForCausalLM(settings.model, tp, layer_ids=settings.layer_ranges[index],
                                 with_embedding=index == 0, with_head=index == last, device=ps.device)
        initialize_parameters(chunk, settings.seed, settings.model.initializer_range)
        chunks.append(prepare_model(chunk, settings.dtype, settings.kernels, settings.fp8, ps.stage_group,
                                    settings.compile_blocks))
    return chunks
