"""Every tensor a checkpoint holds, read whole (test helper)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp


def checkpoint_contents(directory: Path) -> dict[str, torch.Tensor]:
    metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    tensors = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype) for key, entry in metadata.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(tensors, checkpoint_id=str(directory), no_dist=True)
    return tensors


def assert_same_contents(a: Path, b: Path) -> None:
    left, right = checkpoint_contents(a), checkpoint_contents(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), f"{key} differs between {a} and {b}"
