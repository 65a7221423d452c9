"""Test helpers: run the real entry point in subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE_MARKER = "=== case "  # tests/workers/runs.py's line before each job's console output


def run_entry_point(overrides: list[str], nproc: int = 1, timeout: float = 240,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m megolmo.train`` (under torchrun when nproc > 1), one thread per rank. Without the end-of-job
    pictures unless a test asks for them (``trainer.plots=true`` after it wins): matplotlib costs each job
    about a second; ``tests/test_plots.py`` and the in-process runs of ``tests/test_trainer.py`` draw them."""
    overrides = ["trainer.plots=false", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "megolmo.train", *overrides]
        return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
    return run_torchrun(["-m", "megolmo.train", *overrides], nproc, timeout, env)


def run_jobs(cases: dict[str, tuple[int, list[str]]], timeout_per_job: float = 120) -> dict[str, str]:
    """Each case's training job (``name: (ranks, overrides)``), the cases of one world size one after another
    in one launch (``tests/workers/runs.py``), in the order given; each case's console output. Fails naming
    the cases of a launch that failed."""
    by_ranks: dict[int, list[tuple[str, list[str]]]] = defaultdict(list)
    for name, (ranks, overrides) in cases.items():
        by_ranks[ranks].append((name, ["trainer.plots=false", *overrides]))
    consoles = {}
    for ranks, jobs in sorted(by_ranks.items()):
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="jobs-", delete=False) as listing:
            json.dump(jobs, listing)
        timeout = timeout_per_job * len(jobs)
        if ranks == 1:
            result = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "runs.py"), listing.name],
                                    cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                                    capture_output=True, text=True, timeout=timeout)
        else:
            result = run_worker("runs", [listing.name], ranks, timeout)
        os.unlink(listing.name)
        assert result.returncode == 0, f"{ranks} ranks, {[name for name, _ in jobs]}: {result.stderr[-4000:]}"
        for part in result.stdout.split(CASE_MARKER)[1:]:
            name, _, console = part.partition("\n")
            consoles[name] = console
    return consoles


def run_worker(name: str, args: list[str], nproc: int, timeout: float = 240,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``tests/workers/<name>.py`` under torchrun, one thread per rank."""
    return run_torchrun([str(ROOT / "tests" / "workers" / f"{name}.py"), *args], nproc, timeout, env)


def run_torchrun(program: list[str], nproc: int, timeout: float, env: dict[str, str] | None
                 ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), *program]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_root_cause(stderr: str) -> str:
    """The ``traceback :`` line of the failure torchrun's summary names as the root cause."""
    section = stderr.split("Root Cause (first observed failure):", 1)[1]
    return next(line for line in section.splitlines() if line.strip().startswith("traceback :")
                ).split("traceback :", 1)[1].strip()
