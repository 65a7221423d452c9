"""Faults without losses: asynchronous saves, a kill while one is in flight, a hang, and a chaos run in which
ranks are killed at random and the job still ends bit-identical to an uninterrupted one."""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megolmo.benchmarks.chaos import run_chaos
from megolmo.checkpoint.manager import REPLACED_PREFIX, TMP_PREFIX, CheckpointManager
from megolmo.checkpoint.manifest import MANIFEST, TRAINER_STATE, file_checksum, manifest_entries
from megolmo.checkpoint.rng import capture_rng_state, restore_rng_state
from megolmo.run_dir import RunDirectory
from tests.checkpoint_contents import assert_same_contents
from tests.conftest import write_tokens
from tests.helpers import ROOT, free_port, run_entry_point, run_jobs, run_worker


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    return write_tokens(tmp_path_factory.mktemp("faults-data") / "tokens.npy", 40_000, 300)


def overrides(run_dir: Path, tokens: str, steps: int, *extra: str) -> list[str]:
    return [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=32", "model.vocab_size=300",
            "model.hidden_size=64", "model.intermediate_size=128", "model.num_attention_heads=4",
            "model.num_key_value_heads=2", "model.num_hidden_layers=2", "trainer.global_batch_size=8",
            "trainer.micro_batch_size=2", f"trainer.max_steps={steps}", "optim.lr=2e-3", "optim.warmup_steps=2",
            f"trainer.run_dir={run_dir}", "parallel.timeout_s=60", "parallel.distributed_optimizer=true",
            "trainer.log_interval=1", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir)]


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((p for p in (run_dir / "checkpoints").iterdir() if p.is_dir() and not p.is_symlink()),
                  key=lambda p: json.loads((p / TRAINER_STATE).read_text())["step"])


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


# -- asynchronous saves -----------------------------------------------------------------------------
INTERVAL_RUN = ["trainer.save_interval=5", "trainer.keep_last=10"]


@pytest.fixture(scope="module")
def interval_runs(tmp_path_factory, tokens) -> tuple[Path, dict[str, str]]:
    """20 steps on 2 ranks with a save every 5, synchronous and asynchronous, in one launch; the consoles."""
    base = tmp_path_factory.mktemp("interval")
    asynchronous = overrides(base / "async", tokens, 20, *INTERVAL_RUN, "trainer.async_save=true")
    return base, run_jobs({"sync": (2, overrides(base / "sync", tokens, 20, *INTERVAL_RUN)), "async": (2, asynchronous)})


@pytest.fixture(scope="module")
def synchronous(interval_runs) -> Path:
    return interval_runs[0] / "sync"


def test_asynchronous_saves_change_nothing_but_the_wait(interval_runs, synchronous):
    run, console = interval_runs[0] / "async", interval_runs[1]["async"]
    assert losses(run) == losses(synchronous)
    saved, reference = checkpoints(run), checkpoints(synchronous)
    assert [p.name for p in saved] == [p.name for p in reference] == [
        f"stage1-step{s}-tokens0B" for s in (5, 10, 15, 20)]
    for mine, theirs in zip(saved, reference):
        assert_same_contents(mine, theirs)
    for step in (5, 10, 15):
        assert f"saving checkpoint {run}/checkpoints/stage1-step{step}-tokens0B in the background" in console
        assert f"checkpoint {run}/checkpoints/stage1-step{step}-tokens0B complete" in console
    assert f"saved checkpoint {run}/checkpoints/stage1-step20-tokens0B (training blocked" in console
    blocked = {m["step"]: m["checkpoint_blocked_s"] for m in metrics(run) if "checkpoint_blocked_s" in m}
    assert sorted(blocked) == [6, 11, 16] and all(0 < s < 60 for s in blocked.values())
    assert not (run / "hangs").exists()
    summary = json.loads((run / "summary.json").read_text())["checkpoints"]
    assert summary["saves"] == 4 and summary["asynchronous"] and summary["blocked_s_max"] >= max(blocked.values())


def test_a_rotted_shard_is_refused_by_the_rank_that_checks_it(tmp_path, tokens, synchronous):
    """Each rank checksums a share of the files; the one that finds the damage names it, and every rank stops."""
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoints(synchronous)[-1], damaged)
    shard = damaged / "__0_0.distcp"  # the manifest's second file, in rank 1's share of two
    rotted = bytearray(shard.read_bytes())
    rotted[-5] ^= 0x01
    shard.write_bytes(bytes(rotted))
    result = run_entry_point(overrides(tmp_path / "run", tokens, 2, f"load_path={damaged}", "reset_trainer_state=true"),
                             nproc=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("megolmo:")]
    assert errors == [f"megolmo: error: checkpoint {damaged}: shard {shard} is corrupt (xxh3_64 "
                      f"{file_checksum(shard)}, the manifest records {manifest_entries(damaged)[shard.name]['xxh3_64']}"
                      "); load an earlier checkpoint (on rank 1)"], result.stderr[-2000:]


def test_a_kill_while_an_asynchronous_save_is_in_flight_resumes_from_the_previous_one(tmp_path, tokens,
                                                                                    synchronous):
    run = tmp_path / "killed"
    args = overrides(run, tokens, 20, *INTERVAL_RUN, "trainer.async_save=true", "trainer.plots=false")
    killed = run_worker("killed_during_async_save", args, nproc=2, env={"MEGOLMO_TEST_KILL_RANK": "1"})
    assert killed.returncode != 0
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert (run / "checkpoints" / "latest").resolve().name == "stage1-step5-tokens0B"
    assert f"{TMP_PREFIX}stage1-step10-tokens0B" in names  # written, never published
    assert max(m["step"] for m in metrics(run)) > 10  # training went on while the save was in flight
    resumed = run_entry_point(overrides(run, tokens, 20, *INTERVAL_RUN, "trainer.async_save=true"), nproc=2)
    ok(resumed)
    assert f"starting at step 5 from {run}/checkpoints/stage1-step5-tokens0B" in resumed.stdout
    assert losses(run) == losses(synchronous)
    assert_same_contents(checkpoints(run)[-1], checkpoints(synchronous)[-1])
    assert not any(p.name.startswith(TMP_PREFIX) for p in (run / "checkpoints").iterdir())


# -- the hang watchdog ----------------------------------------------------------------------------------
def test_a_hung_rank_ends_every_rank_with_a_stack_dump(tmp_path, tokens):
    timeout_s = 6
    run = tmp_path / "hung"
    args = overrides(run, tokens, 10, f"trainer.step_timeout_s={timeout_s}", "trainer.plots=false")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2", "MEGOLMO_TEST_HANG_RANK": "1",
           "MEGOLMO_TEST_HANG_STEP": "3"}
    worker = [sys.executable, str(ROOT / "tests" / "workers" / "hung_step.py"), *args]
    ranks = [subprocess.Popen(worker, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    ended: dict[int, float] = {}
    while len(ended) < 2:  # every rank must end on its own: no launcher stops the others here
        for rank, process in enumerate(ranks):
            if rank not in ended and process.poll() is not None:
                ended[rank] = time.time()
        time.sleep(0.05)
        if len(ended) < 2 and any(time.time() - t > 4 * timeout_s for t in ended.values()):
            for process in ranks:
                process.kill()
            pytest.fail(f"a rank is still running {4 * timeout_s} s after another ended")
    assert all(process.returncode != 0 for process in ranks), [p.stderr.read()[-2000:] for p in ranks]
    dumps = sorted((run / "hangs").glob("rank*-pid*.txt"))
    assert [d.name.split("-")[0] for d in dumps] == ["rank0", "rank1"]
    for rank, dump in enumerate(dumps):
        text = dump.read_text()
        header = re.match(rf"rank {rank}: step 3, started (\S+) \(trainer.step_timeout_s={timeout_s}\)", text)
        assert header, text[:300]
        started = datetime.datetime.fromisoformat(header.group(1)).timestamp()
        assert "Timeout (0:00:06)!" in text and "most recent call first" in text
        assert ended[rank] - started <= 2 * timeout_s + 1, (rank, ended[rank] - started)
    assert "in run_and_hang" in dumps[1].read_text()  # the hung rank's stack shows where it sleeps


# -- unit checks -----------------------------------------------------------------------------------------
def test_latest_falls_back_to_a_complete_checkpoint_while_one_is_replaced(tmp_path):
    """The moments of a re-save under an existing name: the old copy moved aside, the new one not yet renamed."""
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(tmp_path, keep_last=2)
    for name, step in ((f"{REPLACED_PREFIX}stage1-step4-tokens0B", 4), (f"{TMP_PREFIX}stage1-step4-tokens0B", 4),
                       ("stage1-step2-tokens0B", 2)):
        (root / name).mkdir(parents=True)
        (root / name / TRAINER_STATE).write_text(json.dumps({"step": step}))
        (root / name / MANIFEST).write_text(json.dumps({"files": {}}))
    (root / "latest").symlink_to("stage1-step4-tokens0B")  # dangling: the published copy is moved aside
    assert manager.latest().name in (f"{REPLACED_PREFIX}stage1-step4-tokens0B", f"{TMP_PREFIX}stage1-step4-tokens0B")
    (root / f"{TMP_PREFIX}stage1-step4-tokens0B" / MANIFEST).unlink()  # a save still being written is not complete
    assert manager.latest().name == f"{REPLACED_PREFIX}stage1-step4-tokens0B"


def test_cuda_rng_state_is_restored_on_the_ranks_own_device(monkeypatch):
    """By construction (no GPU here): the CUDA state read and restored is the rank's device's, never all devices'."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(3))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, state)))
    device = torch.device("cuda", 3)
    state = capture_rng_state(device)
    restore_rng_state(state, device)
    restore_rng_state({"cpu": state["cpu"], "cuda": [torch.zeros(3)] * 3 + [torch.full((3,), 7.0)]}, device)
    assert calls[0] == ("get", device) and calls[1][:2] == ("set", device) and torch.equal(calls[1][2], torch.ones(3))
    assert torch.equal(calls[2][2], torch.full((3,), 7.0))  # an older checkpoint's list: this device's entry


# -- chaos ---------------------------------------------------------------------------------------------
CHAOS_STEPS, CHAOS_INTERVAL, KILLS = 30, 3, 5
CHAOS = ["parallel.tensor=2", f"trainer.save_interval={CHAOS_INTERVAL}", "trainer.async_save=true",
         "trainer.keep_last=3", "trainer.plots=false"]  # and ZeRO-1, in every run of this file


def test_chaos_random_kills_end_bit_identical(tmp_path, tokens):
    reference = tmp_path / "reference"
    ok(run_entry_point(overrides(reference, tokens, CHAOS_STEPS, *CHAOS), nproc=4, timeout=300))
    run = tmp_path / "chaos"
    chaos = run_chaos(4, overrides(run, tokens, CHAOS_STEPS, *CHAOS), run, KILLS, CHAOS_STEPS - 8)
    (tmp_path / "chaos.log").write_text("".join(chaos.stdout + chaos.stderr))
    seed = f"chaos seed {chaos.seed}, log {tmp_path / 'chaos.log'}"
    assert chaos.returncode == 0, seed
    assert len(chaos.kills) == len(chaos.resumes) == KILLS, seed
    for kill, (step, path) in zip(chaos.kills, chaos.resumes):
        assert path is None and step == 0 or re.fullmatch(rf"stage1-step{step}-tokens0B", path.name), seed
        assert step % CHAOS_INTERVAL == 0, seed
        assert step >= kill.newest_complete, seed  # never older than the newest complete checkpoint
        # redone: the steps since that checkpoint; a save still in flight at the kill adds up to one interval
        assert kill.completed - step <= 2 * CHAOS_INTERVAL - 1, seed
    assert losses(run) == losses(reference), seed
    assert_same_contents(checkpoints(run)[-1], checkpoints(reference)[-1])
    assert not any(p.name.startswith((TMP_PREFIX, REPLACED_PREFIX)) for p in (run / "checkpoints").iterdir())


def test_metrics_of_a_killed_attempt_are_cut_back_torn_line_included(tmp_path):
    """A kill in the middle of a metrics write leaves a torn last line; the next attempt drops it with the rest."""
    run_dir = RunDirectory(tmp_path, is_writer=True)
    for step in (1, 2, 3):
        run_dir.append_metrics({"step": step, "loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    run_dir.truncate_metrics(2)
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (tools/gpu_validate.sh tests runs it)")
def test_gpu_asynchronous_save_stages_pinned_and_restores_the_cuda_generator(tmp_path, tokens):
    """On a GPU: the host copy is pinned, the checkpoint equals a synchronous one, and the CUDA generator of the
    rank's device comes back on resume."""
    from megolmo.config import load_config
    from megolmo.trainer import Trainer

    trainer = Trainer(load_config(overrides(tmp_path / "gpu", tokens, 4, "parallel.distributed_optimizer=false")))
    trainer.fit()
    trainer.save(5, asynchronous=True)
    trainer.checkpoints.wait()
    staged = trainer.checkpoints._staging.copies
    assert all(t.is_pinned() for shards in staged.values() for t in shards)
    expected = torch.cuda.get_rng_state(trainer.ps.device)
    torch.cuda.manual_seed(12345)
    resumed = Trainer(load_config(overrides(tmp_path / "gpu", tokens, 6, "parallel.distributed_optimizer=false")))
    assert resumed.start_step == 5
    assert torch.equal(torch.cuda.get_rng_state(resumed.ps.device), expected)
