"""Beaker launcher: one command submits a multi-node training run as a Beaker experiment.

    python -m megolmo.launch.beaker --nodes 4 --gpus-per-node 8 --cluster ai2/jupiter \\
        --image beaker://me/megolmo --workspace ai2/olmo --budget ai2/oe-training --priority high --preemptible \\
        --mount weka://oe-training-default:/weka/oe-training-default --secret WANDB_API_KEY=me_WANDB_API_KEY \\
        --run-dir /weka/oe-training-default/me/runs/olmo2-7b -- model=olmo2_7b parallel.tensor=4 ...

The spec is one task of ``--nodes`` replicas, built with beaker-py's own classes. Beaker selects a leader replica
and gives every replica its rank, the replica count and the leader's host name; each replica runs one torchrun
agent, one process per GPU, with a static rendezvous on the leader (host networking, so that the leader's host
name and port reach it). A torch job cannot lose a rank, so one replica's failure or preemption ends them all
and Beaker's auto-resume restarts all of them; as the run directory lies on a shared mount, the restarted
replicas resume from its ``latest`` checkpoint without being told. The training config is composed here first,
so a bad override fails before anything is submitted.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable, NoReturn, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

try:
    from beaker import (Beaker, BeakerCancelationCode, BeakerConstraints, BeakerDataMount, BeakerEnvVar,
                        BeakerExperimentSpec, BeakerImageSource, BeakerJob, BeakerJobPriority, BeakerRetrySpec,
                        BeakerTaskContext, BeakerTaskResources, BeakerTaskSpec, BeakerWorkload)
    from beaker.common import to_nanoseconds
    from beaker.exceptions import BeakerError
except ModuleNotFoundError:  # beaker-py is the optional extra `beaker`
    raise SystemExit("megolmo: error: the Beaker launcher needs beaker-py: pip install -e '.[beaker]'") from None

from megolmo.config import load_config
from megolmo.errors import MegolmoConfigError
from megolmo.parallel.state import check_layout

# The resolved training config travels in the spec as this variable (see `experiment_spec`).
CONFIG_ENV = "MEGOLMO_CONFIG_YAML"
TASK_NAME = "train"
# --mount SCHEME://SOURCE:PATH -> the BeakerDataSource field that SOURCE fills; only the first two are writable.
MOUNT_SOURCES = {"weka": "weka", "host": "host_path", "beaker": "beaker"}
WRITABLE_MOUNTS = ("weka", "host")
IMAGE_SOURCES = ("beaker", "docker")
PREEMPTED = (BeakerCancelationCode.system_preemption, BeakerCancelationCode.user_preemption,
             BeakerCancelationCode.sibling_task_preemption)
POLL_S = 10.0
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
BEAKER_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")  # beaker-py's own rule, checked before submission

EPILOG = """\
training overrides follow `--` and are those of `python -m megolmo.train`; trainer.run_dir comes from --run-dir.

--image  beaker://IMAGE (a Beaker image, e.g. beaker://me/megolmo) or docker://REF (e.g. docker://ghcr.io/org/img:tag)
--mount  weka://BUCKET:/PATH    a Weka bucket, read-write (e.g. weka://oe-training-default:/weka/oe-training-default)
         beaker://DATASET:/PATH a Beaker dataset, read-only (e.g. beaker://me/tokens:/data/tokens)
         host:///DIR:/PATH      a directory of the node, read-write (e.g. host:///net/nfs:/net/nfs)
--run-dir must lie under a read-write mount, so that a preempted and restarted job finds its `latest` checkpoint.

Each replica runs `exec torchrun --nnodes=$BEAKER_REPLICA_COUNT --node-rank=$BEAKER_REPLICA_RANK
--master-addr=$BEAKER_LEADER_REPLICA_HOSTNAME --master-port=PORT --nproc-per-node=GPUS -m megolmo.train
OVERRIDES trainer.run_dir=RUN_DIR` (shown exactly by --dry-run)."""


@dataclass(frozen=True)
class Submission:
    """What ``--dry-run`` shows and a launch creates: the spec, and the workspace and name it is created under
    (Beaker takes both beside the spec, not in it)."""
    spec: BeakerExperimentSpec
    workspace: str | None
    name: str | None

    @property
    def replica_command(self) -> str:
        return self.spec.tasks[0].command[-1]

    @property
    def retries(self) -> int:
        return self.spec.retry.allowed_task_retries if self.spec.retry is not None else 0


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing its usage, so that every mistake is one ``megolmo: error:`` line."""

    def error(self, message: str) -> NoReturn:
        hint = " (training overrides go after --)" if message.startswith("unrecognized arguments") else ""
        raise MegolmoConfigError(message + hint)


# -- option values ----------------------------------------------------------------------------------------
def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``."""
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(text)
    return parse


def duration(text: str) -> str:
    """A Beaker duration (``90m``, ``1h30m``), checked here rather than by the server after submission."""
    try:
        if to_nanoseconds(text) >= 0:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a duration such as 90m or 1h30m, got {text!r}")


def beaker_name(text: str) -> str:
    if not BEAKER_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: Beaker names hold letters, digits, '.', '-' and '_' and do "
                                         "not start with '-'")
    return text


def assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not ENV_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME a variable name, got {text!r}")
    return name, value


def secret_assignment(text: str) -> tuple[str, str]:
    name, secret = assignment(text)
    if not secret:
        raise argparse.ArgumentTypeError(f"expected NAME=SECRET, SECRET naming a Beaker secret, got {text!r}")
    return name, secret


def image(text: str) -> BeakerImageSource:
    scheme, sep, ref = text.partition("://")
    if not sep or scheme not in IMAGE_SOURCES or not ref:
        raise argparse.ArgumentTypeError(f"expected beaker://IMAGE or docker://REF, got {text!r}")
    return BeakerImageSource(**{scheme: ref})


def mount(text: str) -> BeakerDataMount:
    scheme, sep, rest = text.partition("://")
    source, _, path = rest.rpartition(":")
    if not sep or scheme not in MOUNT_SOURCES or not source or not path.startswith("/"):
        raise argparse.ArgumentTypeError(
            f"expected weka://BUCKET:/PATH, beaker://DATASET:/PATH or host:///DIR:/PATH, got {text!r}")
    return BeakerDataMount.new(path, **{MOUNT_SOURCES[scheme]: source})


def parser() -> Parser:
    p = Parser(prog="python -m megolmo.launch.beaker", allow_abbrev=False, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter,
               usage="%(prog)s [options] -- [training overrides]",
               description="Submit a multi-node megolmo training run as one Beaker experiment.")
    p.add_argument("--nodes", type=at_least(1), default=1, help="replicas, one per node (default 1)")
    p.add_argument("--gpus-per-node", type=at_least(1), default=8,
                   help="GPUs of each replica, one training process each (default 8)")
    p.add_argument("--cluster", action="append", required=True, help="a cluster the job may run on (repeatable)")
    p.add_argument("--image", type=image, required=True, help="beaker://IMAGE or docker://REF, with megolmo installed")
    p.add_argument("--run-dir", required=True,
                   help="the run directory (trainer.run_dir) on a read-write --mount, where a restart resumes")
    p.add_argument("--mount", type=mount, action="append", default=[], metavar="SOURCE:PATH",
                   help="weka://BUCKET:/PATH, beaker://DATASET:/PATH or host:///DIR:/PATH (repeatable)")
    p.add_argument("--env", type=assignment, action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable of every replica (repeatable)")
    p.add_argument("--secret", type=secret_assignment, action="append", default=[], metavar="NAME=SECRET",
                   help="the variable NAME set from the workspace's Beaker secret SECRET, e.g. "
                        "WANDB_API_KEY=my_wandb_key or HF_TOKEN=my_hf_token (repeatable)")
    p.add_argument("--workspace", help="the Beaker workspace (default: the one in the Beaker config)")
    p.add_argument("--budget", help="the budget the job is charged to")
    p.add_argument("--priority", choices=[priority.name for priority in BeakerJobPriority], help="the job's priority")
    preemption = p.add_mutually_exclusive_group()
    preemption.add_argument("--preemptible", action="store_true",
                            help="the job may be preempted at any time (minimum runtime 0); it resumes on its own")
    preemption.add_argument("--min-runtime", type=duration, metavar="DURATION",
                            help="the time the job runs before it may be preempted, e.g. 4h")
    p.add_argument("--retries", type=at_least(0), default=0, metavar="N",
                   help="Beaker reruns a failed job up to N times, resuming from latest: for a hang, which the "
                        "watchdog (trainer.step_timeout_s) turns into a failure, or a node lost (default 0)")
    p.add_argument("--name", type=beaker_name, help="the experiment's name (default: chosen by Beaker)")
    p.add_argument("--description", help="the experiment's description (default: nodes, GPUs and run directory)")
    p.add_argument("--port", type=at_least(1), default=29500, help="the rendezvous port on the leader (default 29500)")
    p.add_argument("--synchronized-start-timeout", type=duration, default="90m", metavar="DURATION",
                   help="how long scheduled replicas wait for all the others before the job fails (default 90m)")
    p.add_argument("--shared-memory", default="10GiB", help="/dev/shm of each replica, for NCCL (default 10GiB)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true",
                        help="print the spec as YAML and the command of each replica; needs no network or token")
    action.add_argument("--follow", action="store_true",
                        help="after submitting, stream the leader's logs and exit with the job's exit code")
    return p


# -- the spec ---------------------------------------------------------------------------------------------
def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Options before ``--``, training overrides after it (which may look like options to argparse)."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def check_run_dir(run_dir: str, mounts: list[BeakerDataMount]) -> None:
    """The run directory must outlive the job: on the container's own disk a preempted job loses its checkpoints
    and the restarted one would start over."""
    writable = [m.mount_path for m in mounts if m.source.weka or m.source.host_path]
    if not any(PurePosixPath(run_dir).is_relative_to(path) for path in writable):
        under = f"one of {', '.join(writable)}" if writable else "a weka:// or host:// --mount"
        raise MegolmoConfigError(f"--run-dir {run_dir}: not under {under}; a run directory on the container's own "
                                 "disk is lost when the job is preempted, so the restarted job could not resume")


def training_config(overrides: list[str], run_dir: str, nodes: int, gpus_per_node: int) -> DictConfig:
    """The config every replica will compose, checked now: a mistake costs a second here, not a queue wait."""
    if any(o.lstrip("+~").partition("=")[0] == "trainer.run_dir" for o in overrides):
        raise MegolmoConfigError("trainer.run_dir: set it with --run-dir (the launcher passes it to every replica)")
    cfg = load_config([*overrides, f"trainer.run_dir={run_dir}"])
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    try:
        check_layout(nodes * gpus_per_node, tp, pp)
    except MegolmoConfigError as error:
        raise MegolmoConfigError(f"--nodes {nodes} x --gpus-per-node {gpus_per_node}: {error}") from None
    if gpus_per_node % tp:
        raise MegolmoConfigError(f"parallel.tensor={tp} does not divide --gpus-per-node {gpus_per_node}: a "
                                 "tensor-parallel group would span nodes")
    return cfg


def replica_command(overrides: list[str], run_dir: str, gpus_per_node: int, port: int) -> str:
    """One torchrun agent per replica, meeting the others on the leader (torchrun's static rendezvous); ``exec``
    so that Beaker's stop signal reaches torchrun, which passes it on to the ranks."""
    training = shlex.join(["-m", "megolmo.train", *overrides, f"trainer.run_dir={run_dir}"])
    return ('exec torchrun --nnodes="$BEAKER_REPLICA_COUNT" --node-rank="$BEAKER_REPLICA_RANK" '
            f'--master-addr="$BEAKER_LEADER_REPLICA_HOSTNAME" --master-port={port} '
            f"--nproc-per-node={gpus_per_node} {training}")


def env_vars(env: list[tuple[str, str]], secrets: list[tuple[str, str]], config_yaml: str) -> list[BeakerEnvVar]:
    variables = [BeakerEnvVar(name=name, value=value) for name, value in env]
    variables += [BeakerEnvVar(name=name, secret=secret) for name, secret in secrets]
    variables.append(BeakerEnvVar(name=CONFIG_ENV, value=config_yaml))
    names = [v.name for v in variables]
    for name in names:
        if names.count(name) > 1:
            held = " (it holds the training config)" if name == CONFIG_ENV else ""
            raise MegolmoConfigError(f"--env/--secret {name}: the variable is set more than once{held}")
    return variables


def task_context(args: argparse.Namespace) -> BeakerTaskContext:
    """Always auto-resume: the restarted replicas find ``latest`` in the run directory. ``--preemptible`` is a
    minimum runtime of 0 (beaker-py 2.x deprecates the old ``preemptible`` field for these two)."""
    return BeakerTaskContext(priority=args.priority, min_runtime=0 if args.preemptible else args.min_runtime,
                             auto_resume=True)


def experiment_spec(args: argparse.Namespace, overrides: list[str], config_yaml: str) -> BeakerExperimentSpec:
    """One task of ``nodes`` replicas. The resolved config is an environment variable because the spec has no
    other field for data: the description is the one-line label of Beaker's lists, and results are written by
    the job. In the spec it is stored with the experiment (``beaker experiment spec``), travels with every job
    and restart of it, and can be read inside the container."""
    task = BeakerTaskSpec(
        name=TASK_NAME, image=args.image, context=task_context(args),
        constraints=BeakerConstraints(cluster=args.cluster),
        command=["bash", "-c", replica_command(overrides, args.run_dir, args.gpus_per_node, args.port)],
        env_vars=env_vars(args.env, args.secret, config_yaml), datasets=args.mount or None,
        resources=BeakerTaskResources(gpu_count=args.gpus_per_node, shared_memory=args.shared_memory),
        host_networking=True, replicas=args.nodes, leader_selection=True, propagate_failure=True,
        propagate_preemption=True, synchronized_start_timeout=args.synchronized_start_timeout)
    description = args.description or f"megolmo: {args.nodes} x {args.gpus_per_node} GPUs, run directory {args.run_dir}"
    retry = BeakerRetrySpec(allowed_task_retries=args.retries) if args.retries else None
    return BeakerExperimentSpec(description=description, budget=args.budget, tasks=[task], retry=retry)


def plan(argv: Sequence[str]) -> tuple[Submission, argparse.Namespace]:
    """Parse the command line and build the submission; every mistake is a ``MegolmoConfigError``."""
    options, overrides = split_overrides(list(argv))
    args = parser().parse_args(options)
    check_run_dir(args.run_dir, args.mount)
    cfg = training_config(overrides, args.run_dir, args.nodes, args.gpus_per_node)
    spec = experiment_spec(args, overrides, OmegaConf.to_yaml(cfg))
    return Submission(spec, args.workspace, args.name), args


class SpecDumper(yaml.SafeDumper):
    """Multi-line strings (the stored config) as literal blocks, so that ``--dry-run`` stays readable."""


SpecDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, "|" if "\n" in text else None))


def dry_run_text(submission: Submission) -> str:
    """The spec as YAML, with the rest as comments: the output is itself a spec file for ``beaker``'s CLI."""
    workspace = submission.workspace or "the Beaker config's default"
    return (f"# Beaker experiment spec (workspace: {workspace}, name: {submission.name or 'chosen by Beaker'})\n"
            + yaml.dump(submission.spec.to_json(), Dumper=SpecDumper, sort_keys=False)
            + f"# each replica runs (bash -c):\n# {submission.replica_command}\n")


# -- Beaker, over the network -----------------------------------------------------------------------------
def create(beaker: Beaker, submission: Submission) -> BeakerWorkload:
    """The experiment, in the named workspace (beaker-py resolves the name) or the Beaker config's default."""
    return beaker.experiment.create(spec=submission.spec, name=submission.name, workspace=submission.workspace)


def leader_job(beaker: Beaker, workload: BeakerWorkload, seen: set[str]) -> BeakerJob:
    """The leader replica's job not yet followed; Beaker creates jobs as it schedules them, so wait for it."""
    while True:
        for job in beaker.job.list(task=workload.experiment.tasks[0]):
            if job.id not in seen and job.system_details.replica_group_details.is_leader_replica:
                return job
        time.sleep(POLL_S)


def exit_code(job: BeakerJob) -> int:
    """The job's exit code; a job that was canceled, or never exited, failed even without one."""
    if job.status.HasField("canceled") or not job.status.HasField("exited"):
        return job.status.exit_code or 1
    return job.status.exit_code


def next_job(job: BeakerJob, failures: int, retries: int) -> str | None:
    """After the leader's ``job`` ended, having failed ``failures`` times before: the line announcing the job
    Beaker starts next (after a preemption, or a failed exit with retries left), or None when the run has ended.
    A job canceled otherwise (by hand, say) is not retried."""
    if job.status.canceled_code in PREEMPTED:
        return "megolmo: the job was preempted; following the leader once Beaker resumes it"
    if not job.status.HasField("canceled") and exit_code(job) != 0 and failures < retries:
        return f"megolmo: the job failed (exit {exit_code(job)}); following Beaker's retry {failures + 1} of {retries}"
    return None


def follow(beaker: Beaker, workload: BeakerWorkload, retries: int) -> int:
    """Stream the leader's logs, across the new jobs of preemptions and retries, until the run ends."""
    seen: set[str] = set()
    failures = 0
    while True:
        job = leader_job(beaker, workload, seen)
        for log in beaker.job.logs(job, follow=True):
            sys.stdout.write(log.message.decode(errors="replace"))
        job = beaker.job.get(job.id)
        if (line := next_job(job, failures, retries)) is None:
            return exit_code(job)
        failures += job.status.canceled_code not in PREEMPTED
        seen.add(job.id)
        print(line, flush=True)


def submit(submission: Submission, follow_logs: bool) -> int:
    with Beaker.from_env(check_for_upgrades=False) as beaker:
        workload = create(beaker, submission)
        print(beaker.workload.url(workload), flush=True)
        return follow(beaker, workload, submission.retries) if follow_logs else 0


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    try:
        submission, args = plan(sys.argv[1:] if argv is None else argv)
    except MegolmoConfigError as error:
        print(f"megolmo: error: {error}", file=sys.stderr, flush=True)
        return 2
    if args.dry_run:
        print(dry_run_text(submission), end="", flush=True)
        return 0
    try:
        return submit(submission, args.follow)
    except BeakerError as error:
        print(f"megolmo: error: Beaker: {first_line(error)}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
