"""How OLMo 2 layers are cut into pipeline model chunks.

There are ``P x V`` chunks in model order; which rank holds which is the schedule's choice
(``schedules.stage_indexes``). The first chunk also holds the embedding, the last the final norm,
LM head and loss.
"""
from __future__ import annotations

from megolmo.errors import MegolmoConfigError


def chunk_layer_ranges(num_layers: int, pipeline: int, virtual: int = 1,
                       explicit: list[int] | None = None) -> list[range]:
    """Layer ids of every chunk in model order; even by default, ``explicit`` gives each chunk's count."""
    chunks = pipeline * virtual
    if pipeline < 1 or virtual < 1:
        raise MegolmoConfigError(f"parallel.pipeline={pipeline}, parallel.virtual_pipeline={virtual}: must be >= 1")
    if explicit is not None:
        explicit = [int(n) for n in explicit]
        if len(explicit) != chunks:
            raise MegolmoConfigError(f"parallel.pipeline_layers={explicit}: needs {chunks} entries "
                                     f"(parallel.pipeline x parallel.virtual_pipeline)")
        if sum(explicit) != num_layers or min(explicit) < 0:
            raise MegolmoConfigError(f"parallel.pipeline_layers={explicit}: must be non-negative and sum to "
                                     f"model.num_hidden_layers={num_layers}")
        counts = explicit
    else:
        if num_layers % chunks:
            key = "parallel.pipeline x parallel.virtual_pipeline" if virtual > 1 else "parallel.pipeline"
            raise MegolmoConfigError(f"model.num_hidden_layers={num_layers} is not divisible by {key}={chunks}; "
                                     "give an explicit split with parallel.pipeline_layers=[...]")
        counts = [num_layers // chunks] * chunks
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges
