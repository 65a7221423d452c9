"""The offline evaluator: a checkpoint, and the same weights as a Hugging Face directory, give the numbers
the in-loop evaluation logged after that step."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megolmo.checkpoint.hf import megolmo_to_hf
from megolmo.config import load_config
from megolmo.evaluation.offline import main
from megolmo.trainer import Trainer
from tests.conftest import write_tokens
from tests.helpers import ROOT

MODEL = ["model.vocab_size=300", "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2"]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def evaluate_here(capsys, *args: str) -> tuple[int, str]:
    """The evaluator's ``main`` in this process (the tool's own start-up is covered below)."""
    code = main(list(args))
    return code, capsys.readouterr().out


def test_checkpoint_and_its_hf_export_give_the_in_loop_numbers(tmp_path, capsys):
    tokens = write_tokens(tmp_path / "tokens.npy", 8_000, 300)
    held = write_tokens(tmp_path / "held.npy", 13 * 32, 300, seed=4)
    Trainer(load_config([*MODEL, f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=32",
                         "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_steps=2",
                         f"trainer.run_dir={tmp_path / 'run'}", f"eval.lm.sets={{held: [{held}]}}"])).fit()
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    megolmo_to_hf(tmp_path / "run" / "checkpoints" / "latest", tmp_path / "hf")
    for source, name in ((tmp_path / "run", "ckpt"), (tmp_path / "hf", "hf")):
        output = tmp_path / f"{name}.json"
        code, stdout = evaluate_here(capsys, str(source), "--lm-sets", f"held={held}", "--output", str(output), "--",
                                     "data.dtype=uint16", "data.seq_len=32", "trainer.global_batch_size=4",
                                     "trainer.micro_batch_size=2")
        assert code == 0
        got = json.loads(output.read_text())["metrics"]
        assert got["eval/held/CE"] == pytest.approx(logged["eval/held/CE"], rel=1e-6), name
        assert got["eval/held/PPL"] == pytest.approx(logged["eval/held/PPL"], rel=1e-6), name
        assert f"held  CE {got['eval/held/CE']:.4f}" in stdout


def test_the_tool_prints_a_malformed_set_in_one_line(tmp_path):
    result = evaluate(str(tmp_path), "--lm-sets", "held")
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "megolmo: error: --lm-sets 'held': expected NAME=FILE[,FILE...]"]
