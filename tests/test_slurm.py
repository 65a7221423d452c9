"""slurm/train.sbatch under a real one-node Slurm cluster: sbatch -> srun -> the entry point on every
task, with ranks, world size and the rendezvous host taken from Slurm's own variables."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megolmo.config import load_config
from megolmo.trainer import Trainer
from tests.conftest import write_tokens
from tests.helpers import ROOT, free_port
from tests.slurm_cluster import SlurmCluster, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

# The script asks for a GPU node's resources; a CPU test node overrides them on the command line.
CPU_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield slurm
    slurm.stop()


def overrides(tokens: str, *extra: str) -> list[str]:
    return [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=64", "model.vocab_size=300",
            "model.num_hidden_layers=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
            "trainer.max_steps=4", "optim.warmup_steps=1", "parallel.timeout_s=60", *extra]


def job_env(cluster: SlurmCluster, run_dir: Path, **extra: str) -> dict[str, str]:
    return {**cluster.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "RUN_DIR": str(run_dir), "MASTER_PORT": str(free_port()), **extra}


def submit(cluster: SlurmCluster, out: Path, args: list[str], env: dict[str, str]) -> str:
    """Submit the real script; its job id."""
    submitted = subprocess.run(["sbatch", "--parsable", *CPU_NODE, f"--output={out}", "slurm/train.sbatch", *args],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def wait_for_end(cluster: SlurmCluster, job_id: str, out: Path, timeout: float = 240) -> dict[str, str]:
    """The job's final state. Polled here: ``sbatch --wait`` polls ever more slowly (up to 30 s late here),
    and a requeued job outlives it."""
    deadline = time.monotonic() + timeout
    while (state := job_state(cluster, job_id)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"):
        assert time.monotonic() < deadline, (state, out.read_text() if out.exists() else "")
        time.sleep(0.2)
    return state


def sbatch(cluster: SlurmCluster, workdir: Path, args: list[str]) -> tuple[int, str]:
    """Submit the real script and wait for the job; returns its exit code and output."""
    out = workdir / "job.out"
    state = wait_for_end(cluster, submit(cluster, out, args, job_env(cluster, workdir / "run")), out)
    return int(state["ExitCode"].split(":")[0]), out.read_text() if out.exists() else ""


def test_sbatch_trains_on_two_tasks_like_one_process(cluster, tmp_path):
    tokens = write_tokens(tmp_path / "tokens.npy", 40_000, 300)
    code, log = sbatch(cluster, tmp_path, overrides(tokens))
    assert code == 0, log[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["layout"]["world_size"] == 2 and summary["layout"]["data"] == 2
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    single = Trainer(load_config(overrides(tokens, f"trainer.run_dir={tmp_path / 'single'}"))).fit()
    assert losses == pytest.approx([r.loss for r in single], rel=1e-5)


def test_a_bad_config_fails_the_job_with_one_line(cluster, tmp_path):
    tokens = write_tokens(tmp_path / "tokens.npy", 40_000, 300)
    code, log = sbatch(cluster, tmp_path, overrides(tokens, "parallel.tensor=3"))
    assert code == 2, log  # the config error's code, not that of the other task's SIGTERM
    errors = [line for line in log.splitlines() if line.startswith("megolmo: error:")]
    assert errors == ["megolmo: error: world size 2 is not divisible by parallel.tensor=3 x parallel.pipeline=1"], log
    assert not (tmp_path / "run").exists()


def job_state(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=cluster.env, capture_output=True, text=True)
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def test_usr1_saves_requeues_and_resumes_bit_for_bit(cluster, tmp_path, split_by_time_limit):
    """Preemption: USR1 to the batch shell mid-run -> every task saves after the same step and exits 75 ->
    the script requeues the job -> the requeued job (restart 1) resumes from latest and ends as an
    uninterrupted job does."""
    tokens, args, continued = split_by_time_limit
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    submit_time = time.monotonic()
    job_id = submit(cluster, out, args, job_env(cluster, run_dir))
    deadline = time.monotonic() + 180
    metrics = run_dir / "metrics.jsonl"
    first_step = None
    while not (metrics.exists() and len(lines := metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else job_state(cluster, job_id)
        first_step = first_step or (time.monotonic() if metrics.exists() and metrics.read_text() else None)
        time.sleep(0.05)
    signalled = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=cluster.env, check=True)
    resumed_step = None
    while (state := job_state(cluster, job_id)).get("JobState") != "COMPLETED" or state.get("Restarts") != "1":
        assert state.get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT") and time.monotonic() < deadline + 120, \
            (state, out.read_text())
        if resumed_step is None and "restart 1" in out.read_text() and \
                len(metrics.read_text().splitlines()) > int(re.findall(r"stopping after step (\d+)", out.read_text())[0]):
            resumed_step = time.monotonic()
        time.sleep(0.05)
    log = out.read_text()
    print(f"submission -> first step {first_step - submit_time:.1f} s; signal -> requeued job's first step "
          f"{(resumed_step or time.monotonic()) - signalled:.1f} s\n{log}")
    assert "restart 0" in log and "restart 1" in log and f"requeueing job {job_id}" in log, log
    stopped = int(re.search(r"stopping after step (\d+): SIGUSR1", log).group(1))
    assert 3 <= stopped < 40 and f"starting at step {stopped} from" in log, log
    assert [json.loads(line)["loss"] for line in metrics.open()] == continued  # as the uninterrupted one


@pytest.fixture(scope="module")
def split_by_time_limit(cluster, tmp_path_factory) -> tuple[str, list[str], list[float]]:
    """A 40-step run split in two jobs by an expired trainer.time_limit; its losses (one resume, bit for bit
    the uninterrupted run's: tests/test_preemption.py) are the preemption test's reference."""
    work = tmp_path_factory.mktemp("time_limit")
    tokens = write_tokens(work / "tokens.npy", 40_000, 300)
    args = overrides(tokens, "trainer.max_steps=40", "trainer.save_interval=1000")
    code, log = sbatch(cluster, work, [*args, "trainer.time_limit=1s"])
    assert code == 0, log[-3000:]
    stopped = int(re.search(r"stopping after step (\d+): trainer.time_limit=1s", log).group(1))
    assert stopped < 40 and "requeueing" not in log, log
    code, log = sbatch(cluster, work, args)
    assert code == 0 and f"starting at step {stopped} from" in log, log[-3000:]
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, 41))
    return tokens, args, [r["loss"] for r in records]


def test_an_expired_time_limit_ends_the_job_with_a_checkpoint_and_the_next_job_continues(split_by_time_limit):
    assert len(split_by_time_limit[2]) == 40  # the checks are the fixture's, shared with the preemption test


def test_a_hang_requeues_the_job_until_it_hangs_again_with_no_new_checkpoint(cluster, tmp_path):
    """Rank 1 sleeps in step 3 (checkpoint at 2): the watchdog ends the tasks and the job is requeued; the
    requeued job resumes at step 2 and hangs in step 3 again, with nothing gained, so the job fails.
    (A hang after a newer checkpoint is requeued again: tests/test_after_hang.py.)"""
    tokens = write_tokens(tmp_path / "tokens.npy", 40_000, 300)
    args = overrides(tokens, "trainer.max_steps=10", "trainer.save_interval=2", "trainer.step_timeout_s=6")
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    job_id = submit(cluster, out, args, job_env(cluster, run_dir, MEGOLMO_ENTRY="tests.workers.hung_step",
                                                MEGOLMO_TEST_HANG_RANK="1", MEGOLMO_TEST_HANG_STEP="3,3"))
    state = wait_for_end(cluster, job_id, out)
    log = out.read_text()
    assert state["JobState"] == "FAILED" and state["Restarts"] == "1", (state, log)
    hung = [line for line in log.splitlines() if line.startswith("megolmo: hung")]
    # the first dump's header (every rank was in the step), then where all of them are
    dumps = (r"rank [01]: step 3, started \S+ \(trainer.step_timeout_s=6\); "
             rf"stacks of ranks [01, ]+ in {re.escape(str(run_dir))}/hangs")
    assert len(hung) == 2, log
    assert re.fullmatch(rf"megolmo: hung \({dumps}\); a requeued job resumes from stage1-step2-tokens0B", hung[0])
    assert re.fullmatch(r"megolmo: hung again with no checkpoint since the last requeue \(stage1-step2-tokens0B\): "
                        rf"not requeueing; {dumps}", hung[1]), hung
    assert log.count(f"requeueing job {job_id} at") == 1 and "starting at step 2 from" in log, log
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()] == [1, 2]
