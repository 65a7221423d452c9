"""The skip-step guard (OLMo 2 32B): OLMo-core's rule, an injected spike skipped on every rank at the same
step without advancing the schedule, nothing skipped without spikes, and an exact resume across it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megolmo.config import load_config
from megolmo.errors import MegolmoConfigError
from megolmo.optim.skip_step import SkipStepGuard, SkipStepSettings
from megolmo.trainer import Trainer
from tests.conftest import write_tokens
from tests.helpers import run_entry_point

SEQ, BATCH, STEPS, SPIKE = 32, 8, 16, 12  # the spike is step 12's batch (1-based)
GUARD = ["optim.skip_step.enabled=true", "optim.skip_step.window=16", "optim.skip_step.min_history=8"]


def olmo_core_allows(losses: list[float], norms: list[float], sigma: float, min_history: int) -> bool:
    """OLMo-core's ``get_step_factor`` over a history whose last entry is the current step."""
    if len(losses) - 1 < min_history:
        return True
    loss_std, loss_mean = torch.std_mean(torch.tensor(losses[:-1], dtype=torch.float64))
    norm_std, norm_mean = torch.std_mean(torch.tensor(norms[:-1], dtype=torch.float64))
    return bool((losses[-1] - loss_mean <= sigma * loss_std) & (norms[-1] - norm_mean <= sigma * norm_std))


def test_the_guard_decides_as_olmo_core_does():
    rng = np.random.default_rng(0)
    guard = SkipStepGuard(SkipStepSettings(sigma=3.0, window=32, min_history=16))
    losses, norms, skipped = [], [], 0
    for step in range(400):
        loss = float(rng.normal(2.0, 0.1) + (rng.random() < 0.05) * rng.uniform(0, 2))
        norm = float(abs(rng.normal(1.0, 0.2)) + (rng.random() < 0.05) * rng.uniform(0, 3))
        losses, norms = [*losses, loss][-33:], [*norms, norm][-33:]
        expected = olmo_core_allows(losses, norms, 3.0, 16)
        assert guard.allows(loss, norm) == expected, step
        guard.record(loss, norm)
        skipped += not expected
    assert 10 < skipped < 80
    assert guard.allows(float("nan"), 1.0) is False  # a NaN is never within the history


def test_nothing_is_skipped_before_the_history_is_long_enough():
    guard = SkipStepGuard(SkipStepSettings(sigma=6.0, window=128, min_history=64))
    for i in range(64):
        assert guard.allows(1.0 + 1e-3 * i, 1.0)
        guard.record(1.0 + 1e-3 * i, 1.0)
    assert guard.allows(1e6, 1.0) is False
    guard.record(1e6, 1.0)  # a skipped step joins the history too
    assert len(guard.losses) == 65


def spiked_copy(clean: str, path: Path, job: list[str]) -> str:
    """``clean`` with the instances step SPIKE reads replaced by one repeated, never-seen token."""
    dataset = Trainer(load_config(job)).loader.dataset
    tokens = np.fromfile(clean, dtype=np.uint16)
    for index in range((SPIKE - 1) * BATCH, SPIKE * BATCH):
        k = dataset.locate(index)[1]
        tokens[k * SEQ:(k + 1) * SEQ] = 250
    tokens.tofile(path)
    return str(path)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("skip-step")
    clean = write_tokens(base / "clean.npy", 20_000, 300)

    def job(name: str, data: str, *extra: str) -> list[str]:
        return [f"data.paths=[{data}]", "data.dtype=uint16", f"data.seq_len={SEQ}", "model.vocab_size=300",
                f"trainer.global_batch_size={BATCH}", "trainer.micro_batch_size=2", f"trainer.max_steps={STEPS}",
                "optim.lr=3e-3", f"trainer.run_dir={base / name}", "trainer.plots=false", "parallel.timeout_s=60",
                *GUARD, *extra]

    spiked = spiked_copy(clean, base / "spiked.npy", job("probe", clean))
    Trainer(load_config(job("clean", clean))).fit()
    Trainer(load_config(job("spiked", spiked))).fit()
    Trainer(load_config(job("resumed", spiked, "trainer.stop_at=10"))).fit()
    Trainer(load_config(job("resumed", spiked))).fit()
    result = run_entry_point(job("spiked-tp2-dp2", spiked, "parallel.tensor=2"), nproc=4, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: base / name for name in ("clean", "spiked", "resumed", "spiked-tp2-dp2")}


def test_a_spike_is_skipped_and_the_schedule_waits(runs):
    got = rows(runs["spiked"])
    assert [r["step"] for r in got if r["skipped_step"]] == [SPIKE]
    spike = got[SPIKE - 1]
    assert spike["loss"] > 2 * got[SPIKE - 2]["loss"]
    lrs = [r["lr"] for r in got]
    assert lrs[SPIKE] == lrs[SPIKE - 1]  # the step after the skip uses the skipped step's LR
    assert all(a > b for a, b in zip(lrs[:SPIKE - 1], lrs[1:SPIKE]))  # cosine, advancing before it


def test_no_step_is_skipped_without_spikes(runs):
    assert not any(r["skipped_step"] for r in rows(runs["clean"]))


def test_every_rank_skips_the_same_step(runs):
    """Four ranks (TP2 x DP2): the same skip, and the same losses after it (ranks that disagreed would drift)."""
    single, layout = rows(runs["spiked"]), rows(runs["spiked-tp2-dp2"])
    assert [r["skipped_step"] for r in layout] == [r["skipped_step"] for r in single]
    for a, b in zip(single, layout):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["lr"] == a["lr"]


def test_a_resume_keeps_the_guards_history(runs):
    assert [r["loss"] for r in rows(runs["resumed"])] == [r["loss"] for r in rows(runs["spiked"])]
    assert [r["skipped_step"] for r in rows(runs["resumed"])] == [r["skipped_step"] for r in rows(runs["spiked"])]
    state = json.loads((runs["spiked"] / "checkpoints" / "latest" / "trainer_state.json").read_text())
    assert state["schedule_step"] == STEPS - 1 and len(state["skip_step"]["losses"]) == STEPS
    assert math.isfinite(state["lr"])


def test_bad_guard_settings_are_named(tmp_path):
    tokens = write_tokens(tmp_path / "t.npy", 4_000, 300)
    with pytest.raises(MegolmoConfigError, match="optim.skip_step.min_history=200: must be between 2 and "
                                                 "optim.skip_step.window=128"):
        Trainer(load_config([f"data.paths=[{tokens}]", "data.dtype=uint16", "model.vocab_size=300",
                             f"trainer.run_dir={tmp_path / 'run'}", "optim.skip_step.enabled=true",
                             "optim.skip_step.min_history=200"]))
