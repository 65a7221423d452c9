"""State that modules keep beside their parameters, through ``nn.Module.get_extra_state``: Transformer
Engine keeps its FP8 scaling factors and amax histories there. Without it in the checkpoint a resumed
FP8 run (delayed scaling) would restart every scale at 1 and every history at zero, so its first steps
would differ from the run it continues, and gradients would underflow E5M2 until the history refills.

One rank of each pipeline stage writes ``module_state/rank{R}.pt``: its modules' states keyed by name
inside the model chunk (block ids are global, so the names do not depend on the pipeline split). One
rank suffices because TE agrees its amaxes over the stage's TP x DP ranks, so they all hold the same
state. Loading takes each module's state by name from whichever file has it, so any layout reads any
other. Modules with no saved state (a checkpoint from the torch back-end) keep their fresh state; saved
states with no module (a TE checkpoint loaded on the torch back-end) are left unread.

TE keeps delayed-scaling state as a pickle, and TE from mid-2026 refuses to unpickle it unless
``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1``. These are checkpoints this trainer wrote and the user named,
so loading sets it for the duration, unless the user set it themselves (``=0`` keeps TE's refusal).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

MODULE_STATE = "module_state"
TE_PICKLE_OPT_IN = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


def modules_with_state(chunks: Sequence[nn.Module]) -> dict[str, nn.Module]:
    """Every module whose class keeps state outside its parameters, by its name inside its chunk."""
    return {name: module for chunk in chunks for name, module in chunk.named_modules()
            if type(module).get_extra_state is not nn.Module.get_extra_state}


def module_states(chunks: Sequence[nn.Module]) -> dict[str, Any]:
    """This rank's module states, captured now (a save may write them later); empty without stateful modules."""
    return {name: module.get_extra_state() for name, module in modules_with_state(chunks).items()}


def load_module_states(directory: Path, chunks: Sequence[nn.Module]) -> list[str]:
    """Give every stateful module its saved state; returns the names restored."""
    wanted = modules_with_state(chunks)
    found: dict[str, Any] = {}
    for path in sorted((directory / MODULE_STATE).glob("rank*.pt")) if wanted else []:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        found.update({name: state for name, state in saved.items() if name in wanted and name not in found})
    with _trusting_our_own_checkpoint():
        for name, state in found.items():
            wanted[name].set_extra_state(state)
    return sorted(found)


@contextlib.contextmanager
def _trusting_our_own_checkpoint() -> Iterator[None]:
    if TE_PICKLE_OPT_IN in os.environ:
        yield
        return
    os.environ[TE_PICKLE_OPT_IN] = "1"
    try:
        yield
    finally:
        del os.environ[TE_PICKLE_OPT_IN]
