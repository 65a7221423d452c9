"""Replacing a model's modules by a back-end's equivalents after it is built, keeping every
parameter's global name, value and megolmo attributes (so checkpoints move freely between back-ends)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

CARRIED_ATTRIBUTES = ("shard_spec", "sequence_parallel")


def carry_parameter(old: nn.Parameter, new: nn.Parameter) -> None:
    """Give ``new`` the value and the sharding attributes of ``old``."""
    if new.shape != old.shape:
        raise ValueError(f"replacement parameter has shape {tuple(new.shape)}, expected {tuple(old.shape)}")
    with torch.no_grad():
        new.copy_(old)
    for attribute in CARRIED_ATTRIBUTES:
        if hasattr(old, attribute):
            setattr(new, attribute, getattr(old, attribute))


def swap_modules(model: nn.Module, wanted: Callable[[str, nn.Module], bool],
                 build: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Replace every submodule for which ``wanted(qualified_name, module)`` holds by ``build(module)``;
    returns the replaced names."""
    targets = [(name, module) for name, module in model.named_modules() if name and wanted(name, module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, build(module))
    return [name for name, _ in targets]


def layer_id(qualified_name: str) -> int | None:
    """The global block id in a name like ``model.layers.7.mlp.up_proj``; None outside the blocks."""
    parts = qualified_name.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts):
        return int(parts[parts.index("layers") + 1])
    return None
