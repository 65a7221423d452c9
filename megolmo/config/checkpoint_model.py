"""A run that starts from a checkpoint takes its architecture from the checkpoint's ``model_config.json``.

Fine-tuning or resuming then needs no ``model.*`` overrides; explicit ones (``model=NAME`` or
``model.FIELD=...``) must agree with the checkpoint, and a disagreement is one line listing every differing
field, instead of a shape error naming a tensor later. Runtime settings (``activation_checkpointing``,
``backend``) are the run's own choice.

A Hugging Face directory given as ``load_path`` is refused with the converter's command rather than
converted on the fly: conversion writes the whole fp32 model (128 GB for 32B), which every job of a run
would repeat into its run directory while the other ranks wait, whereas converting once gives a
checkpoint that every later job, soup and evaluation can share.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from omegaconf import DictConfig

from megolmo.checkpoint.hf import is_hf_dir
from megolmo.checkpoint.manager import MODEL_CONFIG, CheckpointManager, resolve_checkpoint
from megolmo.checkpoint.manifest import MANIFEST
from megolmo.errors import MegolmoConfigError
from megolmo.model.config import ModelConfig

RUNTIME_FIELDS = ("name", "activation_checkpointing", "backend")
ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in RUNTIME_FIELDS)


def explicit_model_fields(overrides: list[str]) -> tuple[set[str], str | None]:
    """The model fields the command line sets, and the ``model=NAME`` option if one is chosen."""
    fields: set[str] = set()
    option = None
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "model":
            option = value
            fields.update(f.name for f in dataclasses.fields(ModelConfig))
        elif key.startswith("model."):
            fields.add(key.removeprefix("model."))
    return fields, option


def start_checkpoint(cfg: DictConfig) -> tuple[Path, str] | None:
    """The checkpoint the run will start from (its own latest, else ``load_path``) and how it was named."""
    if cfg.trainer.run_dir:
        latest = CheckpointManager(Path(cfg.trainer.run_dir), keep_last=1).latest()
        if latest is not None:
            return latest, f"trainer.run_dir={cfg.trainer.run_dir} (resuming from {latest.name})"
    if not cfg.load_path:
        return None
    path = Path(cfg.load_path)
    if path.exists() and not (resolve_checkpoint(path) / MANIFEST).exists() and is_hf_dir(path):
        target = path.with_name(f"{path.name}-megolmo")
        raise MegolmoConfigError(
            f"load_path={cfg.load_path} is a Hugging Face directory, not a megolmo checkpoint; convert it once "
            f"with `python tools/convert_checkpoint.py hf-to-megolmo {path} {target}` and pass load_path={target}")
    return resolve_checkpoint(path), f"load_path={cfg.load_path}"


def take_model_from_checkpoint(cfg: DictConfig, overrides: list[str]) -> None:
    """Write the checkpoint's architecture into ``cfg.model``, after checking explicit values against it."""
    start = start_checkpoint(cfg)
    if start is None or not (start[0] / MODEL_CONFIG).is_file():
        return  # no checkpoint, or not one: the trainer names what is wrong with load_path
    checkpoint, named = start
    saved = json.loads((checkpoint / MODEL_CONFIG).read_text())
    explicit, option = explicit_model_fields(overrides)
    differing = [key for key in ARCHITECTURE_FIELDS
                 if key in explicit and key in saved and cfg.model[key] != saved[key]]
    if differing:
        given = f"model={option}" if option else "the model.* overrides"
        listed = ", ".join(f"{key} (checkpoint {saved[key]}, given {cfg.model[key]})" for key in differing)
        raise MegolmoConfigError(f"{named}: the checkpoint's {MODEL_CONFIG} differs from {given} in {listed}; "
                                 "leave the model settings out to use the checkpoint's")
    for key in ARCHITECTURE_FIELDS:
        if key in saved:
            cfg.model[key] = saved[key]
    if "name" not in explicit and "name" in saved:
        cfg.model.name = saved["name"]
