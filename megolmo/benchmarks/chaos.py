"""A chaos run: a job under ``torchrun --max-restarts`` whose training processes are SIGKILLed, one random rank
at a random moment, a given number of times; torchrun restarts them and the job resumes from its newest
complete checkpoint. ``tests/test_checkpoint_faults.py`` checks what it ends with, and
``megolmo/benchmarks/checkpoint_faults.py`` times it against the uninterrupted job.

The moments: before each kill, a target step is drawn, and the kill falls a random fraction of a second
after the job's console shows that step (from the attempt started after the previous kill). Before each
kill the newest complete checkpoint is noted, to compare with the one the next attempt resumes from.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from megolmo.benchmarks.launch import ROOT, free_port
from megolmo.checkpoint.manager import CheckpointManager
from megolmo.checkpoint.manifest import TRAINER_STATE

STEP_LINE = re.compile(r"step\s+(\d+)/")
RESUME_LINE = re.compile(r"starting at step (\d+) from (\S+)")


@dataclass
class Kill:
    completed: int        # the last step the console had shown when the kill fell
    newest_complete: int  # the step of the newest complete checkpoint at that moment (0: none)


@dataclass
class ChaosRun:
    seed: int
    returncode: int
    seconds: float
    kills: list[Kill] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    @property
    def resumes(self) -> list[tuple[int, Path | None]]:
        """(step, checkpoint) each restarted attempt started from, in order; (0, None) for a fresh start (a kill
        before the first checkpoint). The console's start-up block says it right after the kernels' line."""
        lines = list(self.stdout)
        starts = [i for i, line in enumerate(lines) if line.startswith("kernels:")][1:]
        found = [RESUME_LINE.match(lines[i + 1]) if i + 1 < len(lines) else None for i in starts]
        return [(int(m.group(1)), Path(m.group(2))) if m else (0, None) for m in found]


def training_pids(agent: int) -> list[int]:
    """The live training processes torchrun's agent started (its children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if int(parent) == agent and state != "Z":
            pids.append(int(entry.name))
    return pids


def newest_complete_step(run_dir: Path) -> int:
    latest = CheckpointManager(run_dir, keep_last=1).latest()
    try:
        return json.loads((latest / TRAINER_STATE).read_text())["step"] if latest else 0
    except OSError:
        return -1  # renamed or pruned as we looked


def run_chaos(nproc: int, overrides: list[str], run_dir: Path, kills: int, last_target: int,
              seed: int | None = None, timeout: float = 600) -> ChaosRun:
    """Train under torchrun, killing a random rank ``kills`` times at target steps drawn from 2..``last_target``."""
    seed = random.randrange(1 << 30) if seed is None else seed
    chance = random.Random(seed)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--max-restarts",
           str(kills + 2), "--monitor-interval", "0.1", "--master-port", str(free_port()), "-m", "megolmo.train",
           f"trainer.run_dir={run_dir}", "trainer.log_interval=1", *overrides]
    started = time.monotonic()
    job = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = ChaosRun(seed, -1, 0.0)
    readers = [threading.Thread(target=run.stdout.extend, args=(job.stdout,), daemon=True),
               threading.Thread(target=run.stderr.extend, args=(job.stderr,), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        for target in sorted(chance.sample(range(2, last_target + 1), kills)):
            wait_for_step(job, run, target, started + timeout)
            time.sleep(chance.uniform(0, 0.4))
            pids = training_pids(job.pid)
            if len(pids) != nproc:
                raise RuntimeError(f"chaos seed {seed}: expected {nproc} training processes, found {pids}")
            run.kills.append(Kill(current_attempt(run)[1], newest_complete_step(run_dir)))
            os.kill(chance.choice(pids), signal.SIGKILL)
        run.returncode = job.wait(timeout=max(started + timeout - time.monotonic(), 1))
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        for reader in readers:
            reader.join(timeout=5)
    run.seconds = time.monotonic() - started
    return run


def current_attempt(run: ChaosRun) -> tuple[int, int]:
    """How many attempts have started, and the last step the latest one has shown (0: none yet)."""
    attempts, step = 0, 0
    for line in list(run.stdout):
        if line.startswith("kernels:"):  # the console's start-up block, once per attempt
            attempts, step = attempts + 1, 0
        elif m := STEP_LINE.match(line):
            step = int(m.group(1))
    return attempts, step


def wait_for_step(job: subprocess.Popen, run: ChaosRun, target: int, deadline: float) -> None:
    """Wait until the attempt started after the last kill has shown ``target`` (or a later step)."""
    while True:
        attempts, step = current_attempt(run)
        if attempts > len(run.kills) and step >= target:
            return
        if job.poll() is not None or time.monotonic() > deadline:
            tail = "".join(run.stderr[-20:])
            raise RuntimeError(f"chaos seed {run.seed}: the job stopped making progress before step {target}:\n{tail}")
        time.sleep(0.02)
