"""Stopping early with a checkpoint: a signal to one rank stops every rank after the same step, and
``trainer.time_limit`` ends a job with a save and exit code 0; the next job continues bit for bit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megolmo.callbacks import PREEMPTED_EXIT_CODE
from megolmo.callbacks.stop_requests import parse_duration
from megolmo.errors import MegolmoConfigError
from tests.conftest import write_tokens
from tests.helpers import ROOT, free_port, run_entry_point


STEPS = 24


def overrides(tokens: str, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=64", "model.vocab_size=300",
            "model.num_hidden_layers=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
            f"trainer.max_steps={STEPS}", "optim.warmup_steps=2", "trainer.save_interval=1000", "trainer.log_interval=1",
            "parallel.timeout_s=60", f"trainer.run_dir={run_dir}", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_step(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoints" / "latest" / "trainer_state.json").read_text())["step"]


def test_durations():
    assert [parse_duration(t) for t in ("3h50m", "90m", "1d2h", "45s", "120", 30)] == [
        13800, 5400, 93600, 45, 120, 30]
    for bad in ("3x", "", "h"):
        with pytest.raises(MegolmoConfigError, match="trainer.time_limit="):
            parse_duration(bad)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    return write_tokens(tmp_path_factory.mktemp("tokens") / "tokens.npy", 60_000, 300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokens) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = run_entry_point(overrides(tokens, run_dir), nproc=2)
    assert result.returncode == 0, result.stderr
    return metrics(run_dir)


def worker_pid(agent: subprocess.Popen, rank: int) -> int:
    """The pid of the worker torchrun started with RANK=rank."""
    children = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, tokens, uninterrupted):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megolmo.train", *overrides(tokens, run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3):
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()
        time.sleep(0.05)
    os.kill(worker_pid(agent, 1), signal.SIGTERM)
    stdout, stderr = agent.communicate(timeout=120)
    step = checkpoint_step(run_dir)
    assert 3 <= step < STEPS, stdout + stderr
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, step + 1))  # every reported step is saved
    assert f"stopping after step {step}: a signal on another rank (checkpoint saved)" in stdout
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in stderr, stderr  # torchrun stops the other rank once one exits
    resumed = run_entry_point(overrides(tokens, run_dir), nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in metrics(run_dir)] == [m["loss"] for m in uninterrupted]  # bit for bit


def test_time_limit_ends_the_job_with_a_checkpoint_and_exit_0(tmp_path, tokens, uninterrupted):
    run_dir = tmp_path / "run"
    first = run_entry_point(overrides(tokens, run_dir, "trainer.time_limit=1s"), nproc=2)
    assert first.returncode == 0, first.stderr
    step = checkpoint_step(run_dir)
    assert 1 <= step < STEPS
    assert f"stopping after step {step}: trainer.time_limit=1s leaves no room for another step and a save" in \
        first.stdout
    second = run_entry_point(overrides(tokens, run_dir), nproc=2)
    assert second.returncode == 0, second.stderr
    assert f"starting at step {step}" in second.stdout
    assert [m["loss"] for m in metrics(run_dir)] == [m["loss"] for m in uninterrupted]
