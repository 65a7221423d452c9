"""W&B (offline) and TensorBoard loggers: read back by their own libraries, they hold metrics.jsonl's values
at the same steps, and a resumed job appends to the same W&B run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megolmo.callbacks import TensorBoardLog, WandbLog
from megolmo.callbacks.wandb_log import require
from megolmo.config import load_config
from megolmo.errors import MegolmoConfigError
from megolmo.trainer import Trainer, default_callbacks
from tests.conftest import write_tokens


def overrides(tmp_path, tokens: str, *extra: str) -> list[str]:
    return [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=32", "model.vocab_size=300",
            "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
            "model.num_attention_heads=4", "model.num_key_value_heads=2", "trainer.global_batch_size=4",
            "trainer.micro_batch_size=2", "trainer.max_steps=4", "trainer.save_interval=2",
            f"trainer.run_dir={tmp_path / 'run'}", "logging.tensorboard=true", "logging.wandb.project=megolmo-test",
            *extra]


def wandb_records(path) -> list[dict]:
    """A .wandb transaction log's records, decoded by wandb itself (``wandb leet inspect --json``)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_loggers_hold_metrics_values_and_resume_the_same_wandb_run(tmp_path, monkeypatch):
    for key in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR"):
        monkeypatch.setenv(f"WANDB_{key}", str(tmp_path / f"wandb_{key.lower()}"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tokens = write_tokens(tmp_path / "tokens.npy", 20_000, 300)
    held_out = write_tokens(tmp_path / "held_out.npy", 320, 300, seed=3)
    evaluation = [f"eval.lm.sets={{held: [{held_out}]}}", "eval.interval=2"]  # eval/held/* on steps 2 and 4
    Trainer(load_config(overrides(tmp_path, tokens, "trainer.stop_at=2", *evaluation))).fit()
    Trainer(load_config(overrides(tmp_path, tokens, *evaluation))).fit()  # resumes from step 2

    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    expected = {m["step"]: {k: v for k, v in m.items() if k != "step" and v is not None} for m in metrics}

    assert "eval/held/CE" in expected[2] and "eval/held/CE" not in expected[1]

    def tag(key: str) -> str:
        return key if "/" in key else f"train/{key}"

    scalars = tensorboard_scalars(run / "tensorboard")
    assert set(scalars) == {tag(k) for values in expected.values() for k in values}
    for step, values in expected.items():
        for key, value in values.items():
            assert scalars[tag(key)][step] == pytest.approx(value, rel=1e-6, abs=1e-30), (step, key)

    run_id = (run / "wandb_run_id").read_text().strip()
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # one per job, both the same run
    history = {}
    for job, path in enumerate(files):
        records = wandb_records(path)
        (run_record,) = [r["run"] for r in records if r["type"] == "run"]
        assert run_record["run_id"] == run_id and run_record["resume"] and run_record["project"] == "megolmo-test"
        assert run_record["config"]["update"]["data"]["seq_len"] == 32  # the resolved config
        rows = [r["history"] for r in records if r["type"] == "history"]
        assert [row["step"]["num"] for row in rows] == [[1, 2], [3, 4]][job]  # the second job appends
        history.update({row["step"]["num"]: row["item"] for row in rows})
    for step, values in expected.items():
        assert {k: history[step][k] for k in values} == pytest.approx(values, rel=1e-12), step
        assert not set(history[step]) - set(values) - {"_runtime", "_step", "_timestamp"}


def test_loggers_are_off_by_default_and_a_missing_library_is_one_line(tmp_path, monkeypatch):
    cfg = load_config([f"trainer.run_dir={tmp_path / 'run'}"])
    assert not [c for c in default_callbacks(cfg, False) if isinstance(c, (WandbLog, TensorBoardLog))]
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(MegolmoConfigError) as raised:
        require("wandb", "logging.wandb.project=p", "wandb")
    assert str(raised.value) == "logging.wandb.project=p needs the wandb package: pip install 'megolmo[wandb]'"
