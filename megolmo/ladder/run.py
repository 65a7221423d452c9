"""``python -m megolmo.ladder run``: every run of a plan trained through one of megolmo's launchers (local
torchrun, Slurm's ``slurm/train.sbatch``, Beaker's ``megolmo.launch.beaker``), each in its own run directory
``ROOT/<run name>``, so that running the same command again carries on where the ladder stopped.

A run directory whose latest checkpoint is at the run's last step is finished and skipped (the check is
``megolmo.start_point``'s, the one the trainer itself makes); any other run is launched into the same run
directory, from which the trainer resumes on its own. Local runs go one after another, each logged into its run
directory's ``launch.log``; Slurm and Beaker runs are submitted and left to their schedulers, so rerun ``run``
once they have ended (a run still queued or training is not finished, and would be submitted twice).

Batch: OLMo's rule gives any number of sequences (117, 182, 761 of 4096), but a step splits its batch over the
data-parallel ranks and then into micro-batches of ``trainer.micro_batch_size``. ``run`` keeps the configured
micro-batch (its memory is what the user sized for the hardware; ``--override trainer.micro_batch_size=K``)
and rounds the batch to the nearest multiple of data-parallel size x micro-batch (at least one), recounting
steps and warm-up so that the run still trains on its 20 N k tokens (``PlannedRun.with_batch``); the LR stays
the rule's. On 8 data-parallel ranks of 4 sequences, 117 becomes 128, the batch OLMo's published 190M used.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megolmo.config import load_config
from megolmo.errors import MegolmoConfigError
from megolmo.ladder.plan import DEFAULT_TOKENIZER, PlannedRun
from megolmo.parallel.state import check_layout
from megolmo.start_point import RunFinished, check_start_point

LAUNCHERS = ("local", "slurm", "beaker")
SBATCH_SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"
LOG = "launch.log"  # a local run's output, appended to by every launch of it


@dataclass(frozen=True)
class Launcher:
    kind: str  # one of LAUNCHERS
    nodes: int
    procs_per_node: int  # training processes (GPUs) per node
    args: tuple[str, ...] = ()  # sbatch's options (slurm) or megolmo.launch.beaker's (beaker)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@dataclass(frozen=True)
class Job:
    run: PlannedRun  # with the batch the layout can split
    run_dir: Path
    overrides: list[str]  # megolmo.train's, without trainer.run_dir
    batch_note: str

    @property
    def training(self) -> list[str]:
        return [*self.overrides, f"trainer.run_dir={self.run_dir}"]


def prepare(run: PlannedRun, root: Path, launcher: Launcher, extra: list[str], tokenizer: str = DEFAULT_TOKENIZER
            ) -> Job:
    """The run's overrides (the plan's, then ``extra``, which win) at a batch the layout splits, composed once
    here so that a bad override fails before anything is launched."""
    if any(o.lstrip("+~").partition("=")[0] == "trainer.run_dir" for o in extra):
        raise MegolmoConfigError("trainer.run_dir: `run` sets it to ROOT/<run name> (give --root)")
    cfg = load_config([*run.overrides(tokenizer), *extra])
    try:
        dp = check_layout(launcher.world_size, cfg.parallel.tensor, cfg.parallel.pipeline)
    except MegolmoConfigError as error:
        raise MegolmoConfigError(f"--nodes {launcher.nodes} x --nproc-per-node {launcher.procs_per_node}: {error}"
                                 ) from None
    multiple = dp * cfg.trainer.micro_batch_size
    batch = max(1, round(run.batch / multiple)) * multiple
    fitted = run.with_batch(batch) if batch != run.batch else run
    note = (f"batch {run.batch}" + (f" -> {batch}" if batch != run.batch else "") + f" sequences (data-parallel {dp} "
            f"x micro-batch {cfg.trainer.micro_batch_size} x {batch // multiple}), {fitted.max_steps} steps")
    return Job(fitted, root / run.name, [*fitted.overrides(tokenizer), *extra], note)


def status(job: Job) -> str | None:
    """None when the run is finished; else whether it starts or resumes."""
    try:
        start = check_start_point(str(job.run_dir), None, False, job.run.max_steps, None)
    except RunFinished:
        return None
    return f"resumes from step {start[1]['step']}" if start else "starts"


def local_command(job: Job, launcher: Launcher) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={launcher.procs_per_node}", "-m", "megolmo.train", *job.training]


def sbatch_command(job: Job, launcher: Launcher) -> list[str]:
    """``slurm/train.sbatch`` with the run directory in ``RUN_DIR`` (as the script expects) and its log inside it;
    the launcher's arguments come last, so that they win over the layout's."""
    return ["env", f"RUN_DIR={job.run_dir}", "sbatch", f"--job-name={job.run.name}", f"--nodes={launcher.nodes}",
            f"--ntasks-per-node={launcher.procs_per_node}", f"--gpus-per-node={launcher.procs_per_node}",
            f"--output={job.run_dir}/slurm-%j.out", *launcher.args, str(SBATCH_SCRIPT), *job.overrides]


def beaker_argv(job: Job, launcher: Launcher) -> list[str]:
    """``python -m megolmo.launch.beaker``'s command line for the run (the launcher's arguments win)."""
    return ["--nodes", str(launcher.nodes), "--gpus-per-node", str(launcher.procs_per_node), "--run-dir",
            str(job.run_dir), "--description", f"megolmo ladder run {job.run.name} ({job.run_dir})", *launcher.args,
            "--", *job.overrides]


def launch(job: Job, launcher: Launcher, dry_run: bool) -> int:
    """Print the command (or Beaker spec); unless ``dry_run``, run or submit it. The exit code of the launch."""
    if launcher.kind == "beaker":
        from megolmo.launch import beaker  # beaker-py is an optional extra: only this launcher needs it

        submission, _ = beaker.plan(beaker_argv(job, launcher))
        if dry_run:
            print(beaker.dry_run_text(submission), end="", flush=True)
            return 0
        try:
            return beaker.submit(submission, follow_logs=False)
        except beaker.BeakerError as error:
            print(f"megolmo: error: Beaker: {beaker.first_line(error)}", file=sys.stderr)
            return 1
    command = local_command(job, launcher) if launcher.kind == "local" else sbatch_command(job, launcher)
    print(shlex.join(command), flush=True)
    if dry_run:
        return 0
    job.run_dir.mkdir(parents=True, exist_ok=True)
    if launcher.kind == "slurm":
        try:
            return subprocess.run(command).returncode
        except FileNotFoundError:
            raise MegolmoConfigError("--launcher slurm: sbatch is not on PATH (run on a Slurm login node)") from None
    with open(job.run_dir / LOG, "a") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


def run_ladder(runs: list[PlannedRun], root: Path, launcher: Launcher, extra: list[str], dry_run: bool = False,
               tokenizer: str = DEFAULT_TOKENIZER) -> int:
    """Every unfinished run, in the plan's order; the first failure stops the ladder (a rerun resumes it)."""
    if launcher.kind == "local" and launcher.nodes != 1:
        raise MegolmoConfigError(f"--nodes {launcher.nodes}: --launcher local runs on this machine (use slurm or "
                                 "beaker for more nodes)")
    if launcher.kind != "beaker":  # Beaker's run directories are paths inside its containers
        root = root.resolve()
    jobs = [prepare(run, root, launcher, extra, tokenizer) for run in runs]
    print(f"ladder: {len(jobs)} runs under {root}, launcher {launcher.kind} ({launcher.nodes} node(s) x "
          f"{launcher.procs_per_node} process(es))", flush=True)
    for job in jobs:
        state = status(job)
        if state is None:
            print(f"# {job.run.name}: finished, skipped ({job.run_dir})", flush=True)
            continue
        print(f"# {job.run.name}: {state}; {job.batch_note}", flush=True)
        started = time.perf_counter()
        code = launch(job, launcher, dry_run)
        if code != 0:
            where = f"; log: {job.run_dir / LOG}" if launcher.kind == "local" else ""
            print(f"megolmo: error: {job.run.name} exited {code}{where}; rerun `run` to resume it", file=sys.stderr)
            if launcher.kind == "local":
                print((job.run_dir / LOG).read_text()[-3000:], file=sys.stderr)
            return 1
        if launcher.kind == "local" and not dry_run:
            print(f"# {job.run.name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0
