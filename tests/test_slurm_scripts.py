"""The ready-made Slurm scripts for OLMo 2's released sizes: their directives are train.sbatch's (which
Slurm would not read through ``exec``), and their layouts are valid for their node count."""
from __future__ import annotations

import re
import shlex

import pytest

from megolmo.config import load_config
from megolmo.model.config import ModelConfig
from megolmo.trainer import check_model_layout
from tests.helpers import ROOT

SCRIPTS = sorted((ROOT / "slurm").glob("olmo2_*.sbatch"))
GPUS_PER_NODE = 8


def directives(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, re.M))


def overrides(text: str) -> list[str]:
    command = text.split('slurm/train.sbatch"', 1)[1].replace("\\\n", " ")
    return [word for word in shlex.split(command) if word != "$@"]


def test_there_is_a_script_per_released_size():
    assert [p.stem for p in SCRIPTS] == ["olmo2_13b", "olmo2_1b", "olmo2_32b", "olmo2_7b"]


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script_directives_and_layout(script):
    text = script.read_text()
    own, base = directives(text), directives((ROOT / "slurm" / "train.sbatch").read_text())
    assert {k: v for k, v in own.items() if k not in ("job-name", "nodes")} == {
        k: v for k, v in base.items() if k != "job-name"}
    cfg = load_config(overrides(text))
    assert cfg.model.name == script.stem and cfg.precision == "bf16"
    world = int(own["nodes"]) * GPUS_PER_NODE
    p, t = cfg.parallel, cfg.trainer
    assert GPUS_PER_NODE % p.tensor == 0  # a tensor-parallel group stays inside a node
    assert world % (p.tensor * p.pipeline) == 0
    dp = world // (p.tensor * p.pipeline)
    assert t.global_batch_size % (dp * t.micro_batch_size) == 0
    check_model_layout(ModelConfig.from_mapping(cfg.model), p.tensor, cfg.data.seq_len, p.sequence_parallel)
