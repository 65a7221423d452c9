"""Run the real entry point under torchrun for a benchmark and read back what it wrote."""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunResult:
    metrics: list[dict]
    summary: dict

    def median_step_seconds(self, skip: int) -> float:
        timed = self.metrics[skip:] or self.metrics
        return statistics.median(1.0 / m["tokens_per_sec"] for m in timed) * (
            self.metrics[0]["tokens"] / self.metrics[0]["step"])


def run_training(nproc: int, overrides: list[str], run_dir: Path, timeout: float = 900) -> RunResult:
    """``torchrun --nproc-per-node N -m megolmo.train ...`` with one thread per rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "megolmo.train", f"trainer.run_dir={run_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return RunResult(metrics, json.loads((run_dir / "summary.json").read_text()))


def write_benchmark_tokens(path: Path, n_tokens: int, vocab: int) -> str:
    import numpy as np

    np.random.default_rng(0).integers(0, vocab, n_tokens, dtype=np.uint32).astype(np.uint16).tofile(path)
    return str(path)


def run_logged(cmd: list[str], log: Path, append: bool = False) -> None:
    """One command from the repository root, one thread per process, its output kept in ``log``; a failure
    ends the demo with the command and the log's tail."""
    with open(log, "a" if append else "w") as out:
        result = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
