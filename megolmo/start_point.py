"""Where a job starts, decided from the checkpoints on disk before anything is allocated, so that a job
with nothing to do never builds a model, and never ends with "done: 0 steps" as if it had trained.

A requeued or retried job whose run directory is already at its last step has finished: it says so and
exits 0 (``RunFinished``). A job told to start from a checkpoint at or beyond its last step is a config
error naming both numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megolmo.checkpoint.manager import CheckpointManager
from megolmo.checkpoint.manifest import TRAINER_STATE, verify_checkpoint
from megolmo.errors import MegolmoConfigError


class RunFinished(Exception):
    """This job's run directory already holds a checkpoint at its last step (exit 0: nothing to do)."""


def check_start_point(run_dir: str | None, load_path: Path | None, reset_trainer_state: bool, max_steps: int,
                      stop_at: int | None) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint this job resumes, with its trainer state (None for a fresh start or a new stage),
    once its files are known to be complete (damage is named first)."""
    last = stop_at or max_steps
    until = f"trainer.stop_at={stop_at}" if stop_at else f"trainer.max_steps={max_steps}"
    latest = CheckpointManager(Path(run_dir), keep_last=1).latest() if run_dir else None
    if latest is not None:
        state = verify_checkpoint(latest)
        if state["step"] >= last:
            done = "already finished" if state["step"] >= max_steps else "already"
            raise RunFinished(f"{done} at step {state['step']} ({until}; {latest}): nothing to do")
        return latest, state
    if load_path is not None and not reset_trainer_state and (load_path / TRAINER_STATE).exists():
        state = verify_checkpoint(load_path)
        step = state["step"]
        if step >= last:
            raise MegolmoConfigError(
                f"load_path={load_path} is at step {step}, at or beyond {until}: nothing to train; raise "
                "trainer.max_steps, or set reset_trainer_state=true to start a new schedule from its weights")
        return load_path, state
    return None


def stage_start_lr(load_path: Path | None) -> float:
    """The learning rate ``load_path``'s schedule stood at at its step (``optim.lr_from_load_path``): where
    OLMo 2's stage 2 starts its linear decay, read rather than typed in."""
    if load_path is None:
        raise MegolmoConfigError("optim.lr_from_load_path=true needs load_path (the stage-1 checkpoint)")
    state = verify_checkpoint(load_path) if (load_path / TRAINER_STATE).exists() else {}
    if "lr" not in state:
        raise MegolmoConfigError(f"load_path={load_path} does not record its learning rate (no trainer state, or "
                                 "saved before megolmo recorded it): give optim.lr instead of optim.lr_from_load_path")
    return float(state["lr"])
