"""A ladder run's evaluations, from OLMo's published CSV exports or from a megolmo run directory.

Either becomes a ``LadderRun``: N (``sizes.ladder_params``), and per evaluation its tokens, each task's loss
and, for the downstream tasks, its accuracy. Held-out LM sets of a megolmo run (``eval/<set>/CE``) come as
loss-only tasks, so step 1 can be fitted on LM loss as well.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from megolmo.errors import MegolmoConfigError
from megolmo.ladder.sizes import LADDER_SHAPES, TARGETS, ladder_config, ladder_params, target_config
from megolmo.ladder.tasks import TASKS
from megolmo.model.config import ModelConfig
from megolmo.plots import read_run

TOKENS_COLUMN = "throughput/total_tokens"
LM_CE_KEY = re.compile(r"eval/(?!downstream/)([^/]+)/CE")


@dataclass
class LadderRun:
    name: str
    n: int
    tokens: list[float]  # of each evaluation, ascending
    loss: dict[str, list[float]] = field(default_factory=dict)  # task -> one value per evaluation (nan: missing)
    accuracy: dict[str, list[float]] = field(default_factory=dict)

    @property
    def final_tokens(self) -> float:
        return self.tokens[-1]


def read_input(path: Path) -> LadderRun:
    if path.is_dir():
        return read_run_dir(path)
    if path.suffix == ".csv" and path.is_file():
        return read_olmo_csv(path)
    raise MegolmoConfigError(f"{path}: neither a megolmo run directory nor an OLMo ladder .csv file")


def size_params(prefix: str, path: Path) -> int:
    """N of OLMo's model named by a file's prefix: a ladder size (``190M``) or a target (``7B``)."""
    if prefix in LADDER_SHAPES:
        return ladder_params(ladder_config(prefix))
    if prefix in TARGETS:
        return ladder_params(target_config(prefix))
    raise MegolmoConfigError(f"{path.name}: unknown size prefix {prefix!r} (known: "
                             f"{', '.join(dict.fromkeys([*LADDER_SHAPES, *TARGETS]))})")


def read_olmo_csv(path: Path) -> LadderRun:
    """One row per in-loop evaluation: tokens from ``throughput/total_tokens``, task loss from
    ``eval/downstream_bpb/<label>_bpb``, accuracy from ``eval/downstream/<label>_len_norm``."""
    n = size_params(path.stem.split("-")[0], path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = set(reader.fieldnames or [])
        rows = list(reader)
    needed = [TOKENS_COLUMN] + [column for task in TASKS.values() for label, _ in task.labels
                                for column in (_bpb_column(label), _len_norm_column(label))]
    missing = [column for column in needed if column not in header]
    if missing:
        raise MegolmoConfigError(f"{path}: no column {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                                         if len(missing) > 1 else ""))
    rows = sorted((row for row in rows if row[TOKENS_COLUMN]), key=lambda row: float(row[TOKENS_COLUMN]))
    if not rows:
        raise MegolmoConfigError(f"{path}: no evaluation rows")
    run = LadderRun(path.stem, n, [float(row[TOKENS_COLUMN]) for row in rows])
    for task in TASKS.values():
        run.loss[task.name] = [_weighted(row, task.labels, _bpb_column) for row in rows]
        run.accuracy[task.name] = [_weighted(row, task.labels, _len_norm_column) for row in rows]
    return run


def read_run_dir(path: Path) -> LadderRun:
    """The evaluation rows of ``metrics.jsonl``: ``eval/downstream/<label>/{bpb,len_norm}_v1`` and
    ``eval/<set>/CE``; N from the model in ``summary.json`` (else ``config.yaml``)."""
    rows = [row for row in read_run(path).rows if any(key.startswith("eval/") for key in row)]
    if not rows:
        raise MegolmoConfigError(f"{path}: no evaluation rows in metrics.jsonl (train with eval.interval set)")
    run = LadderRun(path.resolve().name, ladder_params(_model_config(path)), [float(row["tokens"]) for row in rows])
    for task in TASKS.values():
        if all(f"eval/downstream/{label}/bpb_v1" in rows[-1] for label, _ in task.labels):
            run.loss[task.name] = [_weighted(row, task.labels, lambda label: f"eval/downstream/{label}/bpb_v1")
                                   for row in rows]
            run.accuracy[task.name] = [_weighted(row, task.labels, lambda label: f"eval/downstream/{label}/len_norm_v1")
                                       for row in rows]
    for key in sorted(key for key in rows[-1] if LM_CE_KEY.fullmatch(key)):
        run.loss[LM_CE_KEY.fullmatch(key)[1]] = [float(row.get(key, math.nan)) for row in rows]
    if not run.loss:
        raise MegolmoConfigError(f"{path}: its last evaluation has neither a ladder task nor an eval/<set>/CE")
    return run


def _model_config(path: Path) -> ModelConfig:
    summary, config = path / "summary.json", path / "config.yaml"
    if summary.is_file():
        return ModelConfig.from_mapping(json.loads(summary.read_text())["model"])
    if config.is_file():
        return ModelConfig.from_mapping(yaml.safe_load(config.read_text())["model"])
    raise MegolmoConfigError(f"{path}: neither summary.json nor config.yaml, so no model to count N from")


def _bpb_column(label: str) -> str:
    return f"eval/downstream_bpb/{label}_bpb"


def _len_norm_column(label: str) -> str:
    return f"eval/downstream/{label}_len_norm"


def _weighted(row: dict, labels: tuple[tuple[str, float], ...], key: Callable[[str], str]) -> float:
    """The weighted mean over a task's labels (MMLU's categories); nan where a value is missing."""
    values = [row.get(key(label)) for label, _ in labels]
    if any(value in (None, "") for value in values):
        return math.nan
    return sum(float(value) * weight for value, (_, weight) in zip(values, labels))
