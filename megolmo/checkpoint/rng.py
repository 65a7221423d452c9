"""Per-rank random-number-generator states in a checkpoint: the CPU generator and this rank's CUDA device.

Only the rank's own device is read and restored: ``torch.cuda.get_rng_state_all`` would create a CUDA
context on every visible GPU from every rank. Checkpoints written before this kept a list of all
devices' states; the entry of the rank's device is taken from it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

RNG_DIR = "rng"


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if device.type != "cuda" or cuda is None:
        return
    if isinstance(cuda, (list, tuple)):  # every device's state (older checkpoints)
        cuda = cuda[device.index or 0]
    torch.cuda.set_rng_state(cuda, device)


def rng_path(directory: Path, rank: int) -> Path:
    return directory / RNG_DIR / f"rank{rank}.pt"
