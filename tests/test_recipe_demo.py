"""``make recipe-demo``'s driver end to end, scaled down (one rank, a few steps; the make target runs TP2 x PP2 x
DP2): stage 1, three stage-2 ingredients on different data orders, their soup as the exact mean, SFT, the
Hugging Face export answering through ``apply_chat_template`` + ``generate``."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megolmo.checkpoint.hf import open_checkpoint
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("recipe-demo")
    result = subprocess.run([sys.executable, "tools/recipe_demo.py", "--ranks", "1", "--steps", "4", "3", "3",
                             "--documents", "0.05", "--batch", "4", "--output", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result.stdout


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ingredients_see_different_data_and_are_named_as_released(demo):
    out, _ = demo
    first_losses = {rows(out / f"stage2-ingredient{k}")[0]["loss"] for k in (1, 2, 3)}
    assert len(first_losses) == 3  # the same weights on three different first batches
    for k in (1, 2, 3):
        latest = (out / f"stage2-ingredient{k}" / "checkpoints" / "latest").resolve().name
        assert latest == f"stage2-ingredient{k}-step3-tokens0B"
        state = json.loads((out / f"stage2-ingredient{k}" / "checkpoints" / "latest" / "trainer_state.json").read_text())
        assert state["data_seed"] == k and state["stage"] == 2


def test_the_soup_is_the_exact_mean_of_the_ingredients(demo):
    out, stdout = demo
    soup = open_checkpoint(out / "soup" / "stage2-soup-step3-tokens0B")
    ingredients = [open_checkpoint(out / f"stage2-ingredient{k}") for k in (1, 2, 3)]
    for name in soup.shapes:
        tensors = [source.read(name).double() for source in ingredients]
        mean, scale = sum(tensors) / 3, sum(t.abs() for t in tensors) / 3
        # the soup accumulates w * x in fp32: within a few fp32 roundings of the exact mean, element by element
        assert bool(((soup.read(name).double() - mean).abs() <= 4 * torch.finfo(torch.float32).eps * scale).all()), name
    table = re.search(r"model\s+held/CE\n((?:.+\n){4})", stdout)
    assert table and [line.split()[0] for line in table.group(1).splitlines()] == [
        "ingredient1", "ingredient2", "ingredient3", "soup"]


def test_the_export_answers_a_chat_message(demo):
    out, stdout = demo
    assert re.search(r"assistant \(.*sft-hf, ([1-9]\d*) new tokens\)", stdout), stdout[-1500:]
    config = json.loads((out / "sft-hf" / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in config["chat_template"]
    sft = rows(out / "sft")
    assert len(sft) == 3 and all(r["loss"] > 0 for r in sft)
