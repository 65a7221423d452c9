"""No silent no-ops: a finished job says so and exits 0 (requeued jobs rely on it); a job told to start
from a checkpoint at or beyond its last step fails in one line naming both numbers."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_tokens
from tests.helpers import run_entry_point


def overrides(tokens: str, run: Path, *extra: str) -> list[str]:
    return [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=32", "model.vocab_size=300",
            "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_steps=3", "optim.lr=2e-3",
            "optim.warmup_steps=1", f"trainer.run_dir={run}", "parallel.timeout_s=60", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[str, Path]:
    """A run directory whose job has trained all its 3 steps."""
    base = tmp_path_factory.mktemp("start")
    tokens = write_tokens(base / "tokens.npy", 20_000, 300)
    result = run_entry_point(overrides(tokens, base / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    return tokens, base / "run"


def test_rerunning_a_finished_job_says_so_and_exits_0(finished):
    tokens, run = finished
    metrics = (run / "metrics.jsonl").read_text()
    result = run_entry_point(overrides(tokens, run), nproc=2)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("megolmo:")]
    assert len(lines) == 1 and lines[0].startswith("megolmo: already finished at step 3 (trainer.max_steps=3; ")
    assert "done:" not in result.stdout and "step      1" not in result.stdout
    assert (run / "metrics.jsonl").read_text() == metrics


def test_a_job_at_its_stop_at_step_has_nothing_to_do(finished, tmp_path):
    tokens, _ = finished
    first = run_entry_point(overrides(tokens, tmp_path / "run", "trainer.stop_at=2"))
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_entry_point(overrides(tokens, tmp_path / "run", "trainer.stop_at=2"))
    assert again.returncode == 0 and "megolmo: already at step 2 (trainer.stop_at=2; " in again.stdout
    rest = run_entry_point(overrides(tokens, tmp_path / "run"))  # the next job of the chain goes on
    assert rest.returncode == 0 and "starting at step 2 from" in rest.stdout and "done: 1 steps" in rest.stdout


def test_starting_from_a_checkpoint_past_the_last_step_is_an_error(finished, tmp_path):
    tokens, run = finished
    result = run_entry_point(overrides(tokens, tmp_path / "new", f"load_path={run}", "trainer.max_steps=2"), nproc=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("megolmo:")]
    assert len(errors) == 1, result.stderr[-2000:]  # printed by rank 0 alone
    assert errors[0].startswith("megolmo: error: load_path=") and \
        "is at step 3, at or beyond trainer.max_steps=2: nothing to train" in errors[0]
    assert not (tmp_path / "new").exists()  # refused before the run directory or the model were made
    fresh = run_entry_point(overrides(tokens, tmp_path / "sft", f"load_path={run}", "trainer.max_steps=2",
                                      "reset_trainer_state=true"))
    assert fresh.returncode == 0 and "done: 2 steps" in fresh.stdout, fresh.stderr[-2000:]
