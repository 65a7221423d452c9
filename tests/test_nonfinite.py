"""The non-finite guard (issue 18): a NaN written into one rank's gradients skips that step on every rank (weights,
fp32 masters, Adam moments, step count and schedule as after the step before), training goes on, and
``optim.max_nonfinite_steps`` of them in a row stop every rank with one line naming the step and the parameter."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megolmo.config import load_config
from megolmo.errors import MegolmoConfigError, TrainingDivergedError
from megolmo.optim.skip_step import SkipStepGuard, SkipStepSettings
from megolmo.trainer import Trainer
from tests.conftest import write_tokens
from tests.helpers import run_worker, torchrun_root_cause
from tests.workers import nonfinite

NAN_STEP, STEPS, RANKS = 4, 6, 4
SKIPPED_LINE = "step {}: non-finite loss or grad norm: update skipped on every rank ({} in a row)"
# Rank 1 poisons a parameter late and one early in model order, rank 3 the very first one: rank 1's early one is named.
DIVERGING = {"1": ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"],
             "3": ["model.embed_tokens.weight"]}


def overrides(tokens: str, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=32", "model.vocab_size=300",
            "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
            "model.num_attention_heads=4", "model.num_key_value_heads=2", "trainer.global_batch_size=8",
            "trainer.micro_batch_size=2", f"trainer.max_steps={STEPS}", "optim.lr=3e-3", "trainer.plots=false",
            "trainer.save_interval=1000", f"trainer.run_dir={run_dir}", "parallel.timeout_s=60", *extra]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> tuple[Path, object]:
    """One 4-rank launch (TP2 x DP2): a NaN on rank 3 at NAN_STEP, without ZeRO and with ZeRO-1 in bf16 (the
    skip-step guard on, never skipping, to see its history), then a job that diverges through the entry point."""
    base = tmp_path_factory.mktemp("nonfinite")
    tokens = write_tokens(base / "tokens.npy", 20_000, 300)
    guard = ["optim.skip_step.enabled=true", "optim.skip_step.window=16", "optim.skip_step.min_history=2",
             "optim.skip_step.sigma=1e6"]
    one_nan = {"nan_steps": [NAN_STEP], "nan_params": {"3": ["model.layers.0.mlp.down_proj.weight"]},
               "keep_steps": [NAN_STEP - 1, NAN_STEP, NAN_STEP + 1]}
    jobs = [{**one_nan, "overrides": overrides(tokens, base / "tp2-dp2", "parallel.tensor=2", *guard)},
            {**one_nan, "overrides": overrides(tokens, base / "zero1", "parallel.tensor=2",  # masters: fp32 copies
                                               "parallel.distributed_optimizer=true", "precision=bf16", *guard)},
            {"entry_point": True, "nan_steps": [1, 3, 4, 5], "nan_params": DIVERGING,
             "overrides": overrides(tokens, base / "diverged", "parallel.tensor=2", "optim.max_nonfinite_steps=3")}]
    plan = base / "plan.json"
    plan.write_text(json.dumps({"jobs": jobs}))
    return base, run_worker("nonfinite", [str(plan)], nproc=RANKS, timeout=180)


@pytest.mark.parametrize("job", ["tp2-dp2", "zero1"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(launch, job):
    base, _ = launch
    for rank in range(RANKS):
        kept = torch.load(base / job / f"state.rank{rank}.pt")["steps"]
        before, nan, after = (kept[NAN_STEP + d] for d in (-1, 0, 1))
        assert (before["step_count"], nan["step_count"], after["step_count"]) == (NAN_STEP - 1,) * 2 + (NAN_STEP,)
        assert (before["schedule_step"], nan["schedule_step"], after["schedule_step"]) == (
            NAN_STEP - 1, NAN_STEP - 1, NAN_STEP)
        for key in ("master", "exp_avg", "exp_avg_sq"):
            for was, now, next_ in zip(before[key], nan[key], after[key]):
                assert torch.equal(was, now), (job, rank, key)  # bit for bit (a NaN anywhere would differ)
                assert not torch.equal(now, next_) and torch.isfinite(next_).all(), (job, rank, key)
        assert torch.equal(before["params"], nan["params"]) and not torch.equal(nan["params"], after["params"])


@pytest.mark.parametrize("job", ["tp2-dp2", "zero1"])
def test_the_step_is_logged_and_the_schedule_waits(launch, job):
    base, result = launch
    got = rows(base / job)
    assert [r["nonfinite_step"] for r in got] == [int(step == NAN_STEP) for step in range(1, STEPS + 1)]
    assert [r["skipped_step"] for r in got] == [0] * STEPS
    lrs = [r["lr"] for r in got]
    assert lrs[NAN_STEP] == lrs[NAN_STEP - 1]  # the step after the skip uses the skipped step's LR
    assert all(a > b for a, b in zip(lrs[:NAN_STEP - 1], lrs[1:NAN_STEP]))
    skipped = [line for line in result.stdout.splitlines() if "non-finite" in line]
    assert skipped[:2] == [SKIPPED_LINE.format(NAN_STEP, 1)] * 2  # rank 0 alone, once in each of the two jobs


@pytest.mark.parametrize("job", ["tp2-dp2", "zero1"])
def test_the_nonfinite_step_joins_no_ranks_skip_step_history(launch, job):
    base, _ = launch
    histories = [torch.load(base / job / f"state.rank{rank}.pt")["skip_step"] for rank in range(RANKS)]
    assert all(h == histories[0] for h in histories)
    assert len(histories[0]["losses"]) == len(histories[0]["grad_norms"]) == STEPS - 1
    assert all(math.isfinite(v) for v in histories[0]["losses"] + histories[0]["grad_norms"])


def test_consecutive_nonfinite_steps_stop_every_rank_in_one_line(launch):
    base, result = launch
    expected = ("megolmo: error: step 5: 3 steps in a row with a non-finite loss or grad norm "
                "(optim.max_nonfinite_steps=3); first non-finite gradient: model.layers.0.self_attn.o_proj.weight "
                "on rank 1")
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.startswith("megolmo:")] == [expected]
    assert [(base / "diverged" / f"failure.rank{r}.txt").read_text() for r in range(RANKS)] == [expected] * RANKS
    assert torchrun_root_cause(result.stderr) == expected
    assert "TrainingDivergedError" not in result.stderr  # no rank's traceback
    skipped = [line for line in result.stdout.splitlines() if "non-finite" in line]
    assert skipped[2:] == [SKIPPED_LINE.format(1, 1), SKIPPED_LINE.format(3, 1), SKIPPED_LINE.format(4, 2)]
    assert [r["nonfinite_step"] for r in rows(base / "diverged")] == [1, 0, 1, 1]  # step 5 raised: no row


def test_the_count_in_a_row_survives_a_resume(tmp_path, monkeypatch):
    tokens = write_tokens(tmp_path / "tokens.npy", 20_000, 300)
    job = overrides(tokens, tmp_path / "run", "optim.max_nonfinite_steps=3")
    monkeypatch.setattr(nonfinite.DistributedAdamW, "grad_norm", nonfinite.DistributedAdamW.grad_norm)
    monkeypatch.setattr(nonfinite.Trainer, "train_step", nonfinite.Trainer.train_step)
    nonfinite.inject({2, 3, 4}, ["model.layers.1.self_attn.q_proj.weight"])
    first = Trainer(load_config([*job, "trainer.stop_at=3"]))
    first.fit()
    assert first.nonfinite.total == 2
    state = json.loads((tmp_path / "run" / "checkpoints" / "latest" / "trainer_state.json").read_text())
    assert state["nonfinite"] == {"in_a_row": 2, "total": 2} and state["schedule_step"] == 1
    with pytest.raises(TrainingDivergedError, match=r"^step 4: 3 steps in a row .* first non-finite gradient: "
                                                    r"model\.layers\.1\.self_attn\.q_proj\.weight on rank 0$"):
        Trainer(load_config(job)).fit()


def test_a_nonfinite_step_does_not_poison_the_skip_step_history():
    guard = SkipStepGuard(SkipStepSettings(sigma=6.0, window=16, min_history=4))
    for i in range(8):
        guard.record(2.0 - 0.01 * i, 1.0 + 0.01 * (i % 3))
    history = guard.state_dict()
    for loss, norm in ((math.nan, 1.0), (2.0, math.inf), (-math.inf, math.nan)):
        guard.record(loss, norm)
    assert guard.state_dict() == history
    assert guard.allows(1.9, 1.01)  # an ordinary step after them is still applied


@pytest.mark.parametrize("value", [0, -2])
def test_the_limit_is_checked_and_named(tmp_path, value):
    tokens = write_tokens(tmp_path / "tokens.npy", 4_000, 300)
    with pytest.raises(MegolmoConfigError, match=rf"^optim\.max_nonfinite_steps={value}: must be >= 1$"):
        Trainer(load_config(overrides(tokens, tmp_path / "run", f"optim.max_nonfinite_steps={value}")))
