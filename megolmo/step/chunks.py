"""This rank's model chunks: its share of the layers (all of them without a pipeline), initialised
from the seed and global names alone (layout-independent), or left undrawn when a checkpoint will
fill them (a restart then skips the draw), with the chosen kernels swapped in."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megolmo.kernels.apply import prepare_model
from megolmo.kernels.select import Fp8Settings, KernelChoice
from megolmo.model.config import ModelConfig
from megolmo.model.init import initialize_parameters, zero_padding_rows
from megolmo.model.olmo2 import Olmo2ForCausalLM
from megolmo.parallel.layers import TensorParallel
from megolmo.parallel.mappings import Group
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
    draw_initial_weights: bool = True  # False: a checkpoint load will overwrite every weight


def build_chunk(settings: ChunkSettings, tp: TensorParallel, index: int, device: torch.device | None = None,
                amax_group: Group = None) -> Olmo2ForCausalLM:
    """Chunk ``index`` of the model (layers ``settings.layer_ranges[index]``) as TP rank ``tp`` holds it."""
    chunk = Olmo2ForCausalLM(settings.model, tp, layer_ids=settings.layer_ranges[index], with_embedding=index == 0,
                             with_head=index == len(settings.layer_ranges) - 1, device=device)
    if settings.draw_initial_weights:
        initialize_parameters(chunk, settings.seed, settings.model.initializer_range)
    else:
        zero_padding_rows(chunk)
    return prepare_model(chunk, settings.dtype, settings.kernels, settings.fp8, amax_group, settings.compile_blocks)


def build_chunks(settings: ChunkSettings, ps: ParallelState, schedule: str, virtual: int
                 ) -> list[Olmo2ForCausalLM]:
    """The chunks ``schedule`` places on this pipeline rank, in its local order."""
    tp = TensorParallel(ps.tp_group, settings.sequence_parallel)
    return [build_chunk(settings, tp, index, ps.device, ps.stage_group)
            for index in stage_indexes(schedule, ps.pp_rank, ps.pp, virtual)]
