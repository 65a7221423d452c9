"""The Beaker launcher: the spec through beaker-py's own classes, --dry-run, the replica command run for real as two
replicas, and (only with a Beaker token) creating an experiment."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from beaker import BeakerCancelationCode, BeakerDataSource, BeakerExperimentSpec, BeakerJob, BeakerJobPriority
from beaker.config import Config

from megolmo.launch.beaker import CONFIG_ENV, main, next_job, plan
from tests.conftest import write_tokens
from tests.helpers import ROOT, free_port, run_entry_point
from tests.test_trainer import tiny_overrides

RUN_DIR = "/weka/bucket/runs/x"
EVERY_OPTION = [
    "--nodes", "2", "--gpus-per-node", "8", "--cluster", "ai2/jupiter", "--cluster", "ai2/ceres",
    "--image", "beaker://me/megolmo", "--workspace", "ai2/olmo", "--budget", "ai2/oe-training", "--priority", "high",
    "--preemptible", "--env", "NCCL_DEBUG=WARN", "--secret", "WANDB_API_KEY=me_wandb", "--secret", "HF_TOKEN=me_hf",
    "--mount", "weka://bucket:/weka/bucket", "--mount", "beaker://me/tokens:/data/tokens", "--run-dir", RUN_DIR,
    "--name", "olmo2-test", "--description", "a test run", "--retries", "2"]
TRAINING = ["data.paths=[/data/tokens/part-0.npy]", "parallel.tensor=4", "trainer.max_steps=10"]


def launcher(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megolmo.launch.beaker", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def read_back(spec: BeakerExperimentSpec) -> BeakerExperimentSpec:
    """beaker-py 2.8.1 reads a mount's ``source`` back as a plain dict: made a ``BeakerDataSource`` again, after
    checking that it still serialises as written."""
    for task in spec.tasks:
        for i, mount in enumerate(task.datasets or []):
            assert isinstance(mount.source, dict), "beaker-py reads BeakerDataSource back itself now: drop this"
            task.datasets[i] = dataclasses.replace(mount, source=BeakerDataSource.from_json(mount.source))
    return spec


def test_the_spec_of_a_two_node_job_round_trips_with_every_option(tmp_path):
    submission, _ = plan([*EVERY_OPTION, "--", *TRAINING])
    submission.spec.to_file(tmp_path / "spec.yaml")
    assert read_back(BeakerExperimentSpec.from_file(tmp_path / "spec.yaml")) == submission.spec
    spec = submission.spec
    (task,) = spec.tasks
    assert (task.replicas, task.leader_selection, task.host_networking) == (2, True, True)
    assert (task.propagate_failure, task.propagate_preemption) == (True, True)
    assert task.synchronized_start_timeout == 90 * 60 * 10**9  # Beaker's nanoseconds
    assert task.resources.gpu_count == 8 and task.constraints.cluster == ["ai2/jupiter", "ai2/ceres"]
    assert task.image.beaker == "me/megolmo" and task.image.docker is None
    assert (task.context.priority, task.context.min_runtime, task.context.auto_resume) == \
        (BeakerJobPriority.high, 0, True)
    env = {v.name: (v.value, v.secret) for v in task.env_vars}
    assert env["NCCL_DEBUG"] == ("WARN", None)
    assert env["WANDB_API_KEY"] == (None, "me_wandb") and env["HF_TOKEN"] == (None, "me_hf")
    assert [(m.source.weka, m.source.beaker, m.mount_path) for m in task.datasets] == \
        [("bucket", None, "/weka/bucket"), (None, "me/tokens", "/data/tokens")]
    assert (spec.budget, spec.description, submission.workspace, submission.name) == \
        ("ai2/oe-training", "a test run", "ai2/olmo", "olmo2-test")
    assert spec.retry.allowed_task_retries == 2 == submission.retries
    stored = yaml.safe_load(env[CONFIG_ENV][0])
    assert stored["trainer"]["run_dir"] == RUN_DIR and stored["parallel"]["tensor"] == 4
    assert stored["trainer"]["max_steps"] == 10 and stored["data"]["paths"] == ["/data/tokens/part-0.npy"]
    assert task.command[:2] == ["bash", "-c"] and submission.replica_command == (
        'exec torchrun --nnodes="$BEAKER_REPLICA_COUNT" --node-rank="$BEAKER_REPLICA_RANK" '
        '--master-addr="$BEAKER_LEADER_REPLICA_HOSTNAME" --master-port=29500 --nproc-per-node=8 -m megolmo.train '
        f"'data.paths=[/data/tokens/part-0.npy]' parallel.tensor=4 trainer.max_steps=10 trainer.run_dir={RUN_DIR}")


def test_dry_run_prints_the_spec_and_the_replica_command():
    result = launcher(*EVERY_OPTION, "--dry-run", "--", *TRAINING)
    assert result.returncode == 0, result.stderr
    submission, _ = plan([*EVERY_OPTION, "--", *TRAINING])
    assert read_back(BeakerExperimentSpec.from_json(yaml.safe_load(result.stdout))) == submission.spec
    assert result.stdout.splitlines()[-2:] == ["# each replica runs (bash -c):", f"# {submission.replica_command}"]


def test_a_bad_override_fails_in_one_line_before_any_spec():
    result = launcher(*EVERY_OPTION, "--dry-run", "--", *TRAINING, "trainer.max_step=3")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "megolmo: error: trainer.max_step: unknown key in trainer; did you mean trainer.max_steps?"]


@pytest.mark.parametrize("bad, named", [
    (["--nodes", "0"], "argument --nodes"), (["--mount", "/weka/bucket"], "argument --mount"),
    (["--image", "me/megolmo"], "argument --image"), (["--secret", "HF_TOKEN"], "argument --secret"),
    (["--run-dir", "/root/runs/x"], "--run-dir /root/runs/x"),
    (["--", "parallel.tensor=3"], "--nodes 2 x --gpus-per-node 8: world size 16 is not divisible"),
    (["--gpus-per-node", "3", "--", "parallel.tensor=2"], "parallel.tensor=2 does not divide --gpus-per-node 3"),
    (["--", "trainer.run_dir=/x"], "trainer.run_dir"), (["--retries", "-1"], "argument --retries")])
def test_a_bad_option_is_one_line_naming_it(capsys, bad, named):
    assert main([*EVERY_OPTION, *bad]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(f"megolmo: error: {named}"), err


def test_the_readme_command_is_a_valid_submission():
    block = re.search(r"```bash\n(python -m megolmo\.launch\.beaker .*?)```", (ROOT / "README.md").read_text(), re.S)
    argv = shlex.split(block[1].replace("\\\n", " "))[3:]
    submission, args = plan(argv)
    assert args.nodes == 4 and submission.spec.tasks[0].replicas == 4


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_replica_command_as_two_replicas_matches_one_agent(tmp_path):
    """Two torchrun agents of 2 processes each (TP 2 inside each "node", DP 2 across them), started by the exact
    command of the spec, against one agent of 4 processes."""
    tokens = write_tokens(tmp_path / "tokens.npy", 30_000, 300)
    training = tiny_overrides(tmp_path / "single", tokens, "trainer.max_steps=3", "optim.warmup_steps=1",
                              "parallel.tensor=2")
    run_dir = tmp_path / "beaker" / "run"
    submission, _ = plan(["--nodes", "2", "--gpus-per-node", "2", "--cluster", "local", "--image", "docker://megolmo",
                          "--mount", f"host://{tmp_path}:{tmp_path}", "--run-dir", str(run_dir), "--port",
                          str(free_port()), "--", *[o for o in training if not o.startswith("trainer.run_dir=")]])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
               BEAKER_REPLICA_COUNT="2", BEAKER_LEADER_REPLICA_HOSTNAME="127.0.0.1")
    replicas = [subprocess.Popen(submission.spec.tasks[0].command, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env={**env, "BEAKER_REPLICA_RANK": str(rank)})
                for rank in range(2)]
    try:
        outputs = [replica.communicate(timeout=240) for replica in replicas]
    finally:
        for replica in replicas:
            replica.kill()
    assert [r.returncode for r in replicas] == [0, 0], [err[-3000:] for _, err in outputs]
    single = run_entry_point(training, nproc=4)
    assert single.returncode == 0, single.stderr[-3000:]
    layout = json.loads((run_dir / "summary.json").read_text())["layout"]
    assert (layout["world_size"], layout["tensor"], layout["data"]) == (4, 2, 2)
    beaker, reference = _losses(run_dir), _losses(tmp_path / "single" / "run")
    assert len(beaker) == len(reference) == 3
    assert beaker == pytest.approx(reference, rel=1e-5)


HAS_TOKEN = bool(os.environ.get(Config.TOKEN_KEY)) or Config.find_config() is not None


def ended_job(exit_code: int | None = None, canceled: BeakerCancelationCode | None = None) -> BeakerJob:
    """A job as Beaker's API returns it once ended (beaker-py's own protobuf message)."""
    job = BeakerJob(id="01JOB")
    if exit_code is not None:
        job.status.exited.FromSeconds(1)
        job.status.exit_code = exit_code
    if canceled is not None:
        job.status.canceled.FromSeconds(1)
        job.status.canceled_code = canceled
    return job


def test_follow_goes_on_across_preemptions_and_retries_and_ends_with_the_run():
    preempted = ended_job(canceled=BeakerCancelationCode.system_preemption)
    hung = ended_job(exit_code=1)  # the hang watchdog's exit
    assert next_job(preempted, failures=5, retries=0) == \
        "megolmo: the job was preempted; following the leader once Beaker resumes it"
    assert next_job(hung, failures=0, retries=2) == "megolmo: the job failed (exit 1); following Beaker's retry 1 of 2"
    assert next_job(hung, failures=1, retries=2) == "megolmo: the job failed (exit 1); following Beaker's retry 2 of 2"
    assert next_job(hung, failures=2, retries=2) is None
    assert next_job(ended_job(exit_code=0), failures=0, retries=2) is None
    assert next_job(ended_job(canceled=BeakerCancelationCode.manual), failures=0, retries=2) is None


@pytest.mark.skipif(not HAS_TOKEN, reason="no Beaker token (BEAKER_TOKEN or ~/.beaker/config.yml): creating an "
                                          "experiment needs one")
def test_creating_an_experiment():
    """Creates a one-node experiment and cancels it at once. Where to: MEGOLMO_BEAKER_CLUSTER (needed),
    MEGOLMO_BEAKER_WORKSPACE, _BUDGET, _IMAGE and _MOUNT (a writable mount for the run directory)."""
    from beaker import Beaker

    from megolmo.launch.beaker import create

    if not os.environ.get("MEGOLMO_BEAKER_CLUSTER"):
        pytest.skip("a Beaker token but no MEGOLMO_BEAKER_CLUSTER to create the experiment on")
    mount = os.environ.get("MEGOLMO_BEAKER_MOUNT", "host:///tmp:/tmp")
    where = (("--workspace", "MEGOLMO_BEAKER_WORKSPACE"), ("--budget", "MEGOLMO_BEAKER_BUDGET"))
    optional = [arg for flag, var in where if os.environ.get(var) for arg in (flag, os.environ[var])]
    submission, _ = plan(["--gpus-per-node", "1", "--cluster", os.environ["MEGOLMO_BEAKER_CLUSTER"], "--image",
                          os.environ.get("MEGOLMO_BEAKER_IMAGE", "docker://python:3.11-slim"), "--mount", mount,
                          "--run-dir", f"{mount.rpartition(':')[2]}/megolmo-test-run", *optional,
                          "--", "trainer.max_steps=1"])
    with Beaker.from_env(check_for_upgrades=False) as beaker:
        workload = create(beaker, submission)
        try:
            assert beaker.workload.url(workload).startswith("http")
            stored = beaker.experiment.get_spec(workload)
            assert stored.tasks[0].command == submission.spec.tasks[0].command
        finally:
            beaker.workload.cancel(workload)
