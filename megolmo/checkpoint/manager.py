"""Saving, finding and loading run checkpoints.

A checkpoint is a directory ``checkpoints/<name>/`` holding torch.distributed.checkpoint files (every
tensor under its global name and shape), ``trainer_state.json``, ``model_config.json``, per-rank RNG
states and, written last, ``manifest.json`` with the size of every file. It is written under a
temporary name and renamed when complete, then ``checkpoints/latest`` (a symlink) is moved to it, so
a save killed half-way can never be taken for a complete checkpoint; the manifest also catches files
truncated or lost later.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from megolmo.checkpoint.module_state import load_module_states, save_module_states
from megolmo.checkpoint.state import EXP_AVG, MODEL, checkpoint_tensors, expected_shapes, reset_moments
from megolmo.errors import MegolmoConfigError
from megolmo.optim.adamw import DistributedAdamW
from megolmo.parallel.collectives import barrier, world_group

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int, tokens: int, stage: int, ingredient: int | None) -> str:
    """OLMo 2's released names: ``stage1-step{STEP}-tokens{N}B`` / ``stage2-ingredient{K}-step...``."""
    billions = round(tokens / 1e9)
    if ingredient is not None:
        return f"stage{stage}-ingredient{ingredient}-step{step}-tokens{billions}B"
    return f"stage{stage}-step{step}-tokens{billions}B"


def _barrier() -> None:
    barrier(world_group())


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Silence DCP's warning that a run without a process group saves in one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def write_manifest(directory: Path) -> None:
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check the directory is a complete checkpoint; returns its trainer state. One-line errors name the file."""
    if not directory.exists():
        raise MegolmoConfigError(f"checkpoint {directory}: no such directory")
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise MegolmoConfigError(f"checkpoint {directory}: {MANIFEST} is missing (incomplete or not a megolmo "
                                 "checkpoint)")
    for name, size in json.loads(manifest_path.read_text())["files"].items():
        path = directory / name
        if not path.exists():
            raise MegolmoConfigError(f"checkpoint {directory}: shard {path} is missing")
        if path.stat().st_size != size:
            raise MegolmoConfigError(f"checkpoint {directory}: shard {path} is truncated or damaged "
                                     f"({path.stat().st_size} bytes, expected {size})")
    return json.loads((directory / TRAINER_STATE).read_text())


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, a run's ``checkpoints/`` directory, or a run directory: follow ``latest``."""
    for candidate in (path, path / "checkpoints"):
        if (candidate / "latest").exists():
            return (candidate / "latest").resolve()
    return path


def check_architecture(directory: Path, expected: dict[str, tuple[int, ...]]) -> set[str]:
    """Compare saved global shapes with the model's; returns the keys the checkpoint holds."""
    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    for key, shape in expected.items():
        if key not in saved:
            raise MegolmoConfigError(f"checkpoint {directory}: tensor {key.removeprefix(MODEL)} is missing "
                                     f"(the model expects shape {list(shape)})")
        saved_shape = tuple(saved[key].size)
        if saved_shape != shape:
            raise MegolmoConfigError(f"checkpoint {directory}: tensor {key.removeprefix(MODEL)} has shape "
                                     f"{list(saved_shape)} but the model expects {list(shape)}")
    return set(saved)


@dataclass
class LoadedState:
    step: int
    tokens: int
    weights_only: bool  # the moments were not loaded (asked for, or the checkpoint has none)
    trainer_state: dict[str, Any]  # the checkpoint's trainer_state.json


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int, keep_steps: list[int] | None = None):
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.keep_steps = set(keep_steps or [])

    # -- saving ----------------------------------------------------------------------------------
    def save(self, optimizer: DistributedAdamW, name: str, trainer_state: dict[str, Any],
             model_config: dict[str, Any], chunks: Sequence[nn.Module] = (), writes_module_state: bool = True
             ) -> Path:
        """``chunks``: this rank's model chunks, whose module states ``writes_module_state`` ranks save
        (one rank per pipeline stage suffices, see ``module_state.py``)."""
        final = self.root / name
        tmp = self.root / f"{TMP_PREFIX}{name}"
        if _is_writer():
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        _barrier()
        with _single_process_is_intended():
            dcp.save(checkpoint_tensors(optimizer), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp / "rng" / f"rank{rank}.pt")
        if writes_module_state:
            save_module_states(tmp, chunks, rank)
        _barrier()
        if _is_writer():
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")
            (tmp / MODEL_CONFIG).write_text(json.dumps(model_config, indent=1) + "\n")
            write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._point_latest_at(name)
            self._prune()
        _barrier()
        return final

    def _point_latest_at(self, name: str) -> None:
        link = self.root / "latest.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(name)
        os.replace(link, self.root / "latest")

    def _prune(self) -> None:
        complete = sorted((d for d in self.root.iterdir() if d.is_dir() and not d.is_symlink()
                           and not d.name.startswith(TMP_PREFIX) and (d / MANIFEST).exists()),
                          key=lambda d: json.loads((d / TRAINER_STATE).read_text())["step"])
        removable = [d for d in complete
                     if json.loads((d / TRAINER_STATE).read_text())["step"] not in self.keep_steps]
        for directory in removable[: max(0, len(removable) - self.keep_last)]:
            shutil.rmtree(directory)
        for leftover in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        link = self.root / "latest"
        return link.resolve() if link.exists() else None

    @staticmethod
    def load(directory: Path, optimizer: DistributedAdamW, weights_only: bool, chunks: Sequence[nn.Module] = ()
             ) -> LoadedState:
        """Load into the current layout; ``weights_only`` (or a checkpoint without optimizer state) starts
        the moments afresh. The trainer state comes back either way: whether the step continues is the
        trainer's choice (``reset_trainer_state``). The module states of ``chunks`` are loaded either way: like the
        weights, they describe the model (FP8 scales fitted to its activations and gradients)."""
        state = verify_checkpoint(directory)
        saved = check_architecture(directory, expected_shapes(optimizer))
        has_optimizer = any(key.startswith(EXP_AVG) for key in saved)
        weights_only = weights_only or not has_optimizer
        with _single_process_is_intended():
            dcp.load(checkpoint_tensors(optimizer, with_optimizer=not weights_only), checkpoint_id=str(directory),
                     no_dist=not dist.is_initialized())
        optimizer.write_back_parameters()
        load_module_states(directory, chunks)
        if weights_only:
            reset_moments(optimizer)
        else:
            optimizer.step_count = state["optimizer_steps"]
            rng = directory / "rng" / f"rank{dist.get_rank() if dist.is_initialized() else 0}.pt"
            if rng.exists():
                torch.set_rng_state(torch.load(rng, weights_only=True)["cpu"])
        return LoadedState(state.get("step", 0), state.get("tokens", 0), weights_only, state)
