"""The run directory of DESIGN.md, written by global rank 0 only.

One directory is shared by all ranks: its default name is chosen on rank 0 and broadcast, because
a per-process timestamp (Hydra's ``${now:}``) would give every rank a different directory.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from megolmo.parallel.collectives import broadcast_object, world_group


def choose_run_dir(requested: str | None, model_name: str) -> Path:
    if requested:
        return Path(requested)
    return Path(broadcast_object(f"runs/{model_name}-{time.strftime('%Y%m%d-%H%M%S')}", 0, world_group()))


class RunDirectory:
    def __init__(self, path: Path, is_writer: bool):
        self.path = path
        self.is_writer = is_writer
        if is_writer:
            path.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: DictConfig) -> None:
        if self.is_writer:
            (self.path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_writer:
            tmp = self.path / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, self.path / "summary.json")

    def truncate_metrics(self, last_step: int) -> None:
        """Drop metrics of steps after ``last_step``: a resumed run recomputes them. A line torn by a kill in the
        middle of its write goes too."""
        path = self.path / "metrics.jsonl"
        if self.is_writer and path.exists():
            kept = [line for line in path.read_text().splitlines() if complete_row_up_to(line, last_step)]
            path.write_text("".join(line + "\n" for line in kept))

    def append_metrics(self, record: dict[str, Any]) -> None:
        if self.is_writer:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def complete_row_up_to(line: str, last_step: int) -> bool:
    try:
        return json.loads(line)["step"] <= last_step
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
