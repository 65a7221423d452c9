"""Saving, finding and loading run checkpoints.

A checkpoint is a directory ``checkpoints/<name>/`` holding torch.distributed.checkpoint files (every
tensor under its global name and shape), ``trainer_state.json``, ``model_config.json``, per-rank RNG
states and, written last, ``manifest.json`` with the size and checksum of every file
(``manifest.py``). It is written under a temporary name and renamed when complete, then
``checkpoints/latest`` (a symlink) is moved to it, so a save killed half-way can never be taken for a
complete checkpoint; the manifest also catches files truncated, lost or rotted later.

A save is synchronous, or asynchronous (``trainer.async_save``): the state is copied to host memory
(``staging.py``) while training waits, then DCP's asynchronous save writes it on a thread over a gloo
group of its own, and the checkpoint is published on a second thread once every rank's part is
written; training goes on meanwhile. At most one save is in flight: the next one, and the end of the
job, wait for it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from megolmo.checkpoint.manifest import MANIFEST, TRAINER_STATE, describe, verify_checkpoint, verify_checksums, \
    write_manifest
from megolmo.checkpoint.module_state import MODULE_STATE, load_module_states, module_states
from megolmo.checkpoint.rng import capture_rng_state, restore_rng_state, rng_path
from megolmo.checkpoint.staging import AlreadyStaged, HostStaging
from megolmo.checkpoint.state import EXP_AVG, MODEL, checkpoint_tensors, expected_shapes, optimizer_flats, \
    reset_moments
from megolmo.errors import MegolmoConfigError
from megolmo.optim.adamw import DistributedAdamW
from megolmo.parallel.agree import agree_on_errors
from megolmo.parallel.collectives import all_gather_objects, barrier

MODEL_CONFIG = "model_config.json"
TMP_PREFIX = ".tmp-"
REPLACED_PREFIX = ".replaced-"  # a checkpoint being re-saved under its name, until the new one is in place


def checkpoint_name(step: int, tokens: int, stage: int, ingredient: int | None) -> str:
    """OLMo 2's released names: ``stage1-step{STEP}-tokens{N}B`` / ``stage2-ingredient{K}-step...``."""
    billions = round(tokens / 1e9)
    if ingredient is not None:
        return f"stage{stage}-ingredient{ingredient}-step{step}-tokens{billions}B"
    return f"stage{stage}-step{step}-tokens{billions}B"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Silence DCP's warning that a run without a process group saves in one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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


@dataclass
class SaveReport:
    path: Path           # where the checkpoint is (or, while an asynchronous save is in flight, will be)
    blocked_s: float     # how long training waited: for the previous save, staging, and a synchronous write
    asynchronous: bool


@dataclass
class SaveJob:
    """Everything one save writes, captured when the save is made: the writing may happen later."""

    name: str
    tensors: dict[str, Any]             # this rank's GlobalPieces, over live or staged storage
    rng: dict[str, Any]
    module_states: dict[str, Any] | None
    trainer_state: dict[str, Any]
    model_config: dict[str, Any]
    started: float                      # time.monotonic() when the save was made


class CheckpointManager:
    """``on_published(path, seconds)`` is called on global rank 0 once a checkpoint is complete (for an
    asynchronous save, on the publishing thread)."""

    def __init__(self, run_dir: Path, keep_last: int, keep_steps: list[int] | None = None,
                 on_published: Callable[[Path, float], None] | None = None):
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.keep_steps = set(keep_steps or [])
        self.on_published = on_published
        self.longest_save_s = 0.0  # wall time of the longest complete save, written in the background or not
        self._group: dist.ProcessGroup | None = None
        self._started = False
        self._staging = HostStaging()
        self._publisher: ThreadPoolExecutor | None = None
        self._in_flight: Future | None = None

    # -- saving ----------------------------------------------------------------------------------
    def save(self, optimizer: DistributedAdamW, name: str, trainer_state: dict[str, Any],
             model_config: dict[str, Any], chunks: Sequence[nn.Module] = (), writes_module_state: bool = True,
             asynchronous: bool = False) -> SaveReport:
        """Collective. ``chunks``: this rank's model chunks, whose module states ``writes_module_state`` ranks
        save (one rank per pipeline stage suffices, see ``module_state.py``). An asynchronous save returns once
        the state is staged; a synchronous one once the checkpoint is published."""
        started = time.monotonic()
        self.wait()
        self._start_once()
        flats = optimizer_flats(optimizer)
        staged = self._staging.stage(flats) if asynchronous else None
        device = optimizer.buffers.params.device
        job = SaveJob(name, checkpoint_tensors(optimizer, flats=staged), capture_rng_state(device),
                      module_states(chunks) if writes_module_state else None, trainer_state, model_config, started)
        tmp = self.root / f"{TMP_PREFIX}{name}"
        if asynchronous:
            with _single_process_is_intended():
                written = dcp.async_save(job.tensors, checkpoint_id=str(tmp), process_group=self._group,
                                         async_stager=AlreadyStaged(), no_dist=self._group is None)
            self._publisher = self._publisher or ThreadPoolExecutor(1, thread_name_prefix="megolmo-checkpoint")
            self._in_flight = self._publisher.submit(self._finish, job, written)
        else:
            with _single_process_is_intended():
                dcp.save(job.tensors, checkpoint_id=str(tmp), process_group=self._group,
                         no_dist=self._group is None)
            self._finish(job, None)
        return SaveReport(self.root / name, time.monotonic() - started, asynchronous)

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; its error, if it failed, is raised here."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def _start_once(self) -> None:
        """Before the first save: the checkpoint group, and no half-written save of an earlier attempt left."""
        if self._started:
            return
        self._started = True
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)
        if dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # saves never interleave with training's collectives
            barrier(self._group)

    def _finish(self, job: SaveJob, written: Future | None) -> None:
        """After this rank's DCP files are written: its own small files and checksums; global rank 0 then
        publishes the checkpoint, and no rank starts another save until it has."""
        if written is not None:
            written.result()
        tmp, rank = self.root / f"{TMP_PREFIX}{job.name}", _rank()
        own = [rng_path(tmp, rank)]
        own[0].parent.mkdir(parents=True, exist_ok=True)
        torch.save(job.rng, own[0])
        if job.module_states:
            own.append(tmp / MODULE_STATE / f"rank{rank}.pt")
            own[-1].parent.mkdir(exist_ok=True)
            torch.save(job.module_states, own[-1])
        own += sorted(tmp.glob(f"__{rank}_*"))  # DCP names each rank's data files __<rank>_<n>.distcp
        described = describe(tmp, [str(p.relative_to(tmp)) for p in own])
        everyone = all_gather_objects(described, self._group)
        if rank == 0:
            (tmp / TRAINER_STATE).write_text(json.dumps(job.trainer_state, indent=1) + "\n")
            (tmp / MODEL_CONFIG).write_text(json.dumps(job.model_config, indent=1) + "\n")
            write_manifest(tmp, {name: entry for part in everyone for name, entry in part.items()})
            self._publish(tmp, job.name)
        barrier(self._group)
        seconds = time.monotonic() - job.started
        self.longest_save_s = max(self.longest_save_s, seconds)
        if rank == 0 and self.on_published is not None:
            self.on_published(self.root / job.name, seconds)

    def _publish(self, tmp: Path, name: str) -> None:
        """Rename into place and point ``latest`` at it. A checkpoint re-saved under its name is first moved
        aside, so that a complete copy exists at every moment (``latest`` falls back to it)."""
        final, aside = self.root / name, self.root / f"{REPLACED_PREFIX}{name}"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        self._point_latest_at(name)
        shutil.rmtree(aside, ignore_errors=True)
        self._prune()

    def _point_latest_at(self, name: str) -> None:
        link = self.root / "latest.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(name)
        os.replace(link, self.root / "latest")

    def _complete(self) -> list[Path]:
        """Complete checkpoints (the manifest is written last), oldest first, whatever their directory's name."""
        found = [d for d in self.root.iterdir() if d.is_dir() and not d.is_symlink() and (d / MANIFEST).exists()]
        return sorted(found, key=lambda d: json.loads((d / TRAINER_STATE).read_text())["step"])

    def _prune(self) -> None:
        published = [d for d in self._complete() if not d.name.startswith((TMP_PREFIX, REPLACED_PREFIX))]
        removable = [d for d in published
                     if json.loads((d / TRAINER_STATE).read_text())["step"] not in self.keep_steps]
        for directory in removable[: max(0, len(removable) - self.keep_last)]:
            shutil.rmtree(directory)
        for leftover in [*self.root.glob(f"{TMP_PREFIX}*"), *self.root.glob(f"{REPLACED_PREFIX}*")]:
            shutil.rmtree(leftover, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """What ``latest`` points at; if it points nowhere (a kill while a checkpoint was being replaced or
        first published), the newest complete checkpoint, moved aside or not yet renamed."""
        link = self.root / "latest"
        if link.exists():
            return link.resolve()
        complete = self._complete() if self.root.is_dir() else []
        return complete[-1] if complete else None

    @staticmethod
    def load(directory: Path, optimizer: DistributedAdamW, weights_only: bool, chunks: Sequence[nn.Module] = ()
             ) -> LoadedState:
        """Collective. Load into the current layout; ``weights_only`` (or a checkpoint without optimizer state)
        starts the moments afresh. The trainer state comes back either way: whether the step continues is the
        trainer's choice (``reset_trainer_state``). The module states of ``chunks`` are loaded either way: like
        the weights, they describe the model (FP8 scales fitted to its activations and gradients). Every file's
        checksum is verified first, each rank checking a share."""
        state = verify_checkpoint(directory)
        error = None
        try:
            verify_checksums(directory, _rank(), dist.get_world_size() if dist.is_initialized() else 1)
        except MegolmoConfigError as raised:
            error = raised
        agree_on_errors(error)
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
            rng = rng_path(directory, _rank())
            if rng.exists():
                restore_rng_state(torch.load(rng, weights_only=True), optimizer.buffers.params.device)
        return LoadedState(state.get("step", 0), state.get("tokens", 0), weights_only, state)
