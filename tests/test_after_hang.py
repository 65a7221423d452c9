"""The requeue decision after a hang (``megolmo/launch/after_hang.py``), on run directories laid out as the
watchdog and the checkpoint manager leave them; ``tests/test_slurm.py`` runs it inside the real script."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megolmo.checkpoint.manifest import MANIFEST, TRAINER_STATE
from megolmo.launch.after_hang import decide, main


def dump(run_dir: Path, rank: int, step: int, fired: bool = True, age_s: float = 0.0) -> None:
    path = run_dir / "hangs" / f"rank{rank}-pid{100 + rank}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"rank {rank}: step {step}, started 2026-12-02T00:00:00 (trainer.step_timeout_s=6)\n"
                    + ("Timeout (0:00:06)!\nThread 0x1 (most recent call first):\n" if fired else ""))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def checkpoint(run_dir: Path, step: int) -> None:
    directory = run_dir / "checkpoints" / f"stage1-step{step}-tokens0B"
    directory.mkdir(parents=True)
    (directory / TRAINER_STATE).write_text(json.dumps({"step": step}))
    (directory / MANIFEST).write_text("{}")
    latest = run_dir / "checkpoints" / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(directory.name)


def test_no_dump_of_this_attempt_is_no_hang(tmp_path):
    since = time.time()
    dump(tmp_path, 0, 3, age_s=60)  # an earlier attempt's
    dump(tmp_path, 1, 3, fired=False)  # armed, never fired: the process was killed
    assert decide(tmp_path, since - 1) == (False, None)
    assert main([str(tmp_path), "--since", str(since - 1)]) == 1


def test_a_hang_requeues_once_per_checkpoint(tmp_path, capsys):
    since = time.time() - 1
    dump(tmp_path, 1, 1)
    requeue, line = decide(tmp_path, since)  # before any checkpoint: from the start, once
    assert requeue and line.endswith("a requeued job resumes from the start (no checkpoint yet)")
    assert not decide(tmp_path, since)[0]
    checkpoint(tmp_path, 2)
    dump(tmp_path, 0, 3)
    assert main([str(tmp_path), "--since", str(since)]) == 0
    assert capsys.readouterr().out == (
        "megolmo: hung (rank 0: step 3, started 2026-12-02T00:00:00 (trainer.step_timeout_s=6); stacks of ranks "
        f"0, 1 in {tmp_path}/hangs); a requeued job resumes from stage1-step2-tokens0B\n")
    assert main([str(tmp_path), "--since", str(since)]) == 1
    assert capsys.readouterr().out.startswith(
        "megolmo: hung again with no checkpoint since the last requeue (stage1-step2-tokens0B): not requeueing; "
        "rank 0: step 3")
