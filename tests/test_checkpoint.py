"""Checkpoints: exact and resharded resume, atomic saves, names and rotation, weights-only starts, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megolmo.checkpoint.manager import checkpoint_name
from megolmo.checkpoint.manifest import MANIFEST
from megolmo.checkpoint.reader import MegolmoCheckpoint
from megolmo.config import load_config
from megolmo.errors import MegolmoConfigError
from megolmo.optim.schedule import learning_rate
from megolmo.trainer import Trainer
from tests.conftest import write_tokens
from tests.helpers import ROOT, run_entry_point, run_jobs

STEPS = 10


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    return write_tokens(tmp_path_factory.mktemp("ckpt-data") / "tokens.npy", 40_000, 300)


def overrides(run_dir: Path, tokens: str, *extra: str) -> list[str]:
    return [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=32", "model.vocab_size=300",
            "trainer.global_batch_size=8", "trainer.micro_batch_size=1", f"trainer.max_steps={STEPS}",
            "optim.lr=2e-3", "optim.warmup_steps=2", f"trainer.run_dir={run_dir}", "parallel.timeout_s=60",
            "trainer.log_interval=100", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tokens) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    Trainer(load_config(overrides(run, tokens))).fit()
    return run


def test_exact_resume_is_bit_identical(tmp_path, tokens, straight):
    run = tmp_path / "run"
    first = Trainer(load_config(overrides(run, tokens, "trainer.stop_at=5"))).fit()
    assert len(first) == 5 and (run / "checkpoints" / "latest").resolve().name == "stage1-step5-tokens0B"
    second = Trainer(load_config(overrides(run, tokens)))
    assert second.start_step == 5
    second.fit()
    assert losses(run) == losses(straight)  # bit-identical, all 10 steps
    assert [m["grad_norm"] for m in metrics(run)] == [m["grad_norm"] for m in metrics(straight)]
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))


RESHARDED = {  # name: (layout of the first 5 steps, layout of the rest), 4 ranks each
    "tp2pp2-to-dp4-zero1": (["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"],
                            ["parallel.distributed_optimizer=true"]),
    "dp4-zero1-to-tp2pp2": (["parallel.distributed_optimizer=true", "parallel.bucket_size=30000"],
                            ["parallel.tensor=2", "parallel.pipeline=2"]),
}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory, tokens) -> tuple[Path, dict[str, str]]:
    """Every case's two jobs in one 4-rank launch, each second job after its first; the consoles."""
    base = tmp_path_factory.mktemp("resharded")
    jobs = {}
    for part in (0, 1):
        for name, layouts in RESHARDED.items():
            stop = ["trainer.stop_at=5"] if part == 0 else []
            jobs[f"{name}/{part}"] = (4, overrides(base / name, tokens, *stop, *layouts[part]))
    return base, run_jobs(jobs)


@pytest.mark.parametrize("name", list(RESHARDED))
def test_resharded_resume(resharded, straight, name):
    base, consoles = resharded
    assert "starting at step 5" in consoles[f"{name}/1"]
    for a, b in zip(losses(straight), losses(base / name), strict=True):
        assert b == pytest.approx(a, rel=1e-5)


def test_killed_during_save_resumes_from_previous_checkpoint(tmp_path, tokens, straight):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "killed_during_save.py"),
                             *overrides(run, tokens, "trainer.save_interval=3")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").resolve().name == "stage1-step3-tokens0B"
    assert any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())  # the half-written save
    resumed = run_entry_point(overrides(run, tokens, "trainer.save_interval=3"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "starting at step 3" in resumed.stdout
    assert losses(run) == losses(straight)
    assert not any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())


def test_names_rotation_and_kept_steps(tmp_path, tokens):
    run = tmp_path / "run"
    Trainer(load_config(overrides(run, tokens, "trainer.save_interval=2", "trainer.keep_last=2",
                                     "trainer.keep_steps=[4]", "trainer.stage=2", "trainer.ingredient=3"))).fit()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "stage2-ingredient3-step10-tokens0B", "stage2-ingredient3-step4-tokens0B",
                     "stage2-ingredient3-step8-tokens0B"]
    assert checkpoint_name(1000, 4_194_304_000, 1, None) == "stage1-step1000-tokens4B"
    state = json.loads((run / "checkpoints" / "latest" / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["tokens"] == 10 * 8 * 32


def test_load_path_with_both_resets_takes_weights_only(tmp_path, tokens, straight):
    source = straight / "checkpoints" / "latest"
    run = tmp_path / "run"
    trainer = Trainer(load_config(overrides(run, tokens, f"load_path={source}", "reset_trainer_state=true",
                                            "reset_optimizer_state=true", "trainer.max_steps=3")))
    assert trainer.start_step == 0 and trainer.optimizer.step_count == 0
    assert all(float(m.abs().max()) == 0 for m in trainer.optimizer.exp_avg + trainer.optimizer.exp_avg_sq)
    trainer.fit()
    got = metrics(run)
    assert [m["step"] for m in got] == [1, 2, 3]
    assert got[0]["loss"] < 0.98 * losses(straight)[0]  # trained weights, evaluated on batch 0 again


def test_stage_two_keeps_the_moments_and_decays_from_where_stage_one_stood(tmp_path, tokens):
    """OLMo 2's stage 2: ``reset_trainer_state`` alone restarts step, data and schedule but keeps AdamW's
    moments bit for bit; the linear decay starts at stage 1's LR at the loaded step and ends at 0."""
    stage1 = Trainer(load_config(overrides(tmp_path / "stage1", tokens, "trainer.stop_at=5")))
    stage1.fit()
    saved = [m.clone() for m in stage1.optimizer.exp_avg + stage1.optimizer.exp_avg_sq]
    source = tmp_path / "stage1" / "checkpoints" / "latest"
    stage2 = Trainer(load_config(overrides(tmp_path / "stage2", tokens, f"load_path={source}",
                                           "reset_trainer_state=true", "optim.lr_from_load_path=true", "optim.lr=9.0",
                                           "optim.schedule=linear", "optim.warmup_steps=0", "trainer.max_steps=4",
                                           "trainer.stage=2", "trainer.ingredient=1", "data.seed=5")))
    assert stage2.start_step == 0 and stage2.optimizer.step_count == 5
    assert all(torch.equal(a, b) for a, b in zip(stage2.optimizer.exp_avg + stage2.optimizer.exp_avg_sq, saved))
    stage2.fit()
    lrs = [m["lr"] for m in metrics(tmp_path / "stage2")]
    assert lrs[0] == learning_rate(5, 2e-3, 2, STEPS, "cosine") and lrs[-1] == 0.0
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == 4
    assert (tmp_path / "stage2" / "checkpoints" / "latest").resolve().name == "stage2-ingredient1-step4-tokens0B"


def test_a_stage_lr_needs_a_checkpoint_that_records_it(tmp_path, tokens, straight):
    with pytest.raises(MegolmoConfigError, match="optim.lr_from_load_path=true needs load_path"):
        Trainer(load_config(overrides(tmp_path / "a", tokens, "optim.lr_from_load_path=true")))
    old = tmp_path / "old"
    import shutil
    shutil.copytree((straight / "checkpoints" / "latest").resolve(), old)
    state = json.loads((old / "trainer_state.json").read_text())
    del state["lr"]  # as written before the learning rate was recorded
    (old / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["files"]["trainer_state.json"] = (old / "trainer_state.json").stat().st_size
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MegolmoConfigError, match=f"load_path={old} does not record its learning rate"):
        Trainer(load_config(overrides(tmp_path / "b", tokens, f"load_path={old}", "reset_trainer_state=true",
                                      "optim.lr_from_load_path=true")))


def test_load_path_without_reset_continues_the_run(tmp_path, tokens, straight):
    source = straight.parent / "five"
    Trainer(load_config(overrides(source, tokens, "trainer.stop_at=5"))).fit()
    run = tmp_path / "run"
    trainer = Trainer(load_config(overrides(run, tokens, f"load_path={source}")))  # a run dir works too
    assert trainer.start_step == 5
    trainer.fit()
    assert losses(run) == losses(straight)[5:]


def test_checkpoint_errors(tmp_path, tokens, straight):
    with pytest.raises(MegolmoConfigError, match="load_path=/does/not/exist: no such checkpoint"):
        Trainer(load_config(overrides(tmp_path / "a", tokens, "load_path=/does/not/exist")))
    with pytest.raises(MegolmoConfigError, match=r"model_config.json differs from the model.\* overrides in "
                                                 r"hidden_size \(checkpoint 128, given 64\), intermediate_size "):
        load_config(overrides(tmp_path / "b", tokens, f"load_path={straight}", "model.hidden_size=64",
                              "model.intermediate_size=96", "reset_trainer_state=true"))
    damaged = tmp_path / "damaged"
    import shutil
    shutil.copytree((straight / "checkpoints" / "latest").resolve(), damaged)
    shard = next(damaged.glob("*.distcp"))
    rotted = bytearray(shard.read_bytes())
    rotted[len(rotted) // 2] ^= 0x10  # one flipped bit, size unchanged
    shard.write_bytes(bytes(rotted))
    with pytest.raises(MegolmoConfigError, match=f"shard {shard} is corrupt \\(xxh3_64 [0-9a-f]+, the manifest records"):
        Trainer(load_config(overrides(tmp_path / "e", tokens, f"load_path={damaged}", "reset_trainer_state=true")))
    with pytest.raises(MegolmoConfigError, match=f"shard {shard} is corrupt"):  # the converters read it too
        MegolmoCheckpoint(damaged)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(MegolmoConfigError, match=f"shard {shard} is truncated"):
        Trainer(load_config(overrides(tmp_path / "c", tokens, f"load_path={damaged}")))
    shard.unlink()
    with pytest.raises(MegolmoConfigError, match=f"shard {shard} is missing"):
        Trainer(load_config(overrides(tmp_path / "d", tokens, f"load_path={damaged}")))
