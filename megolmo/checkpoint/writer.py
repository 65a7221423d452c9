"""Writing a weights-only megolmo checkpoint from any ``TensorSource``, one tensor in memory at a time.

The checkpoint is an ordinary one (DCP files with ``model/<name>`` fp32 global tensors, ``trainer_state.json``
at step 0, ``model_config.json``, ``manifest.json`` last), so ``load_path=DIR`` loads it under any layout.

Streaming: DCP plans the save from a state dict of ``meta`` tensors (right shape and dtype, no storage),
and ``StreamingSavePlanner.resolve_data`` reads each real tensor from the source only when the writer
asks for it. ``FileSystemWriter`` (one file, one thread, no copy-ahead) resolves and writes items strictly
one after another, but keeps every tensor it has written referenced until the file is closed; so before
reading the next tensor the planner frees the storage of the previous one, which has been fully written
by then. Peak memory is about one tensor (plus its source-dtype copy), not the model.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.planner import WriteItem

from megolmo.checkpoint.manager import MODEL_CONFIG, TMP_PREFIX
from megolmo.checkpoint.manifest import TRAINER_STATE, write_manifest
from megolmo.checkpoint.reader import TensorSource, return_freed_memory_promptly
from megolmo.checkpoint.state import MODEL
from megolmo.errors import MegolmoConfigError


class StreamingSavePlanner(DefaultSavePlanner):
    """Plans from meta tensors; produces each tensor's data from the source on demand."""

    def __init__(self, source: TensorSource):
        super().__init__()
        self.source = source
        self._previous: torch.Tensor | None = None
        self.peak_tensor_bytes = 0

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        self.release()
        name = write_item.index.fqn.removeprefix(MODEL)
        tensor = self.source.read(name)
        chunk = write_item.tensor_data.chunk
        if tuple(tensor.shape) != tuple(chunk.sizes) or any(chunk.offsets):
            raise ValueError(f"{name}: read {list(tensor.shape)}, planned a chunk {list(chunk.sizes)} at "
                             f"{list(chunk.offsets)}")
        if tensor.untyped_storage().nbytes() != tensor.nbytes:  # DCP would clone it, and we could not free it
            tensor = tensor.clone()
        self.peak_tensor_bytes = max(self.peak_tensor_bytes, tensor.nbytes)
        self._previous = tensor
        return tensor

    def release(self) -> None:
        """Free the last tensor handed to the writer (it is written: items are resolved one by one)."""
        if self._previous is not None:
            self._previous.untyped_storage().resize_(0)
            self._previous = None


def prepare_output(directory: Path) -> Path:
    """Refuse to overwrite; returns the temporary sibling the output is built in (renamed at the end)."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise MegolmoConfigError(f"output {directory} already exists and is not empty (refusing to overwrite)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f"{TMP_PREFIX}{directory.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def finish_output(tmp: Path, directory: Path) -> None:
    if directory.exists():
        directory.rmdir()  # empty, checked by prepare_output
    os.replace(tmp, directory)


def write_megolmo(source: TensorSource, directory: Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``source``'s weights as a weights-only megolmo checkpoint at ``directory`` (step 0)."""
    directory = Path(directory)
    tmp = prepare_output(directory)
    return_freed_memory_promptly()
    try:
        state_dict = {MODEL + name: torch.empty(shape, dtype=torch.float32, device="meta")
                      for name, shape in source.shapes.items()}
        planner = StreamingSavePlanner(source)
        writer = FileSystemWriter(str(tmp), single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
            dcp.save(state_dict, storage_writer=writer, planner=planner, no_dist=True)
        planner.release()
        state = {"step": 0, "tokens": 0, "optimizer_steps": 0, "data_seed": None, "layout": None,
                 **(provenance or {})}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1) + "\n")
        (tmp / MODEL_CONFIG).write_text(json.dumps(source.config.to_dict(), indent=1) + "\n")
        write_manifest(tmp)
        finish_output(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
