"""The trainer end to end: run directory, metrics, falling loss, bf16, and one-line config errors."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import yaml

from megolmo.config import load_config
from megolmo.errors import MegolmoConfigError
from megolmo.trainer import Trainer
from tests.conftest import write_tokens
from tests.helpers import run_entry_point


def tiny_overrides(tmp_path, tokens: str, *extra: str) -> list[str]:
    return [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=64", "model.vocab_size=300",
            "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.max_steps=30",
            "optim.lr=3e-3", "optim.warmup_steps=5", f"trainer.run_dir={tmp_path / 'run'}", *extra]


@pytest.fixture
def tokens(tmp_path) -> str:
    return write_tokens(tmp_path / "tokens.npy", 60_000, 300)


def test_run_directory_and_falling_loss(tmp_path, tokens):
    records = Trainer(load_config(tiny_overrides(tmp_path, tokens))).fit()
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert set(metrics[0]) >= {"step", "loss", "z_loss", "grad_norm", "lr", "tokens", "tokens_per_sec", "mfu"}
    assert metrics[0]["mfu"] is None  # CPU: no known peak
    assert metrics[-1]["tokens"] == 30 * 8 * 64
    assert np.mean([m["loss"] for m in metrics[-5:]]) < 0.7 * metrics[0]["loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["layout"]["world_size"] == 1
    assert summary["parameters"]["total"] > 0 and summary["bytes_per_rank_max"]["optimizer_state"] > 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the end-of-job picture
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["seq_len"] == 64
    assert records[-1].loss == metrics[-1]["loss"]


def test_bf16_tracks_fp32(tmp_path, tokens):
    # lr 1e-3 is above OLMo 2's peak rates (4e-4 to 9e-4) yet keeps bf16 rounding from dominating
    # the comparison, as it does at the 3e-3 the other tests use to learn fast.
    fp32 = Trainer(load_config(tiny_overrides(tmp_path / "a", tokens, "optim.lr=1e-3"))).fit()
    bf16 = Trainer(load_config(tiny_overrides(tmp_path / "b", tokens, "optim.lr=1e-3", "precision=bf16"))).fit()
    assert len(bf16) == 30
    for a, b in zip(fp32, bf16):
        assert np.isfinite(b.loss)
        assert abs(a.loss - b.loss) <= 0.02 * a.loss


def test_stop_at_ends_early_without_changing_the_schedule(tmp_path, tokens):
    full = Trainer(load_config(tiny_overrides(tmp_path / "a", tokens))).fit()
    early = Trainer(load_config(tiny_overrides(tmp_path / "b", tokens, "trainer.stop_at=10"))).fit()
    assert len(early) == 10
    assert [r.lr for r in early] == [r.lr for r in full[:10]]
    assert [r.loss for r in early] == [r.loss for r in full[:10]]


@pytest.mark.parametrize("override, culprit", [
    ("model.num_key_value_heads=3", "model.num_attention_heads=8 is not divisible by model.num_key_value_heads=3"),
    ("optim.schedule=step", "optim.schedule=step"),
    ("precision=fp8", "precision=fp8"),
    ("precision=fp16", "precision=fp16"),
    ("trainer.micro_batch_size=3", "trainer.micro_batch_size=3"),
    ("trainer.stop_at=99", "trainer.stop_at=99"),
    ("data.seq_len=8192", "data.seq_len=8192"),
    ("model.vocab_size=50", "token id"),
    ("+model.hidden_sizes=3", "model.hidden_sizes"),
])
def test_bad_config_is_a_one_line_error(tmp_path, tokens, override, culprit):
    with pytest.raises(MegolmoConfigError, match=culprit.replace("(", r"\(").replace(".", r"\.")):
        Trainer(load_config(tiny_overrides(tmp_path, tokens, override))).fit()


def test_entry_point_prints_one_line_and_exits_2(tmp_path, tokens):
    result = run_entry_point(tiny_overrides(tmp_path, tokens, "data.paths=[/nonexistent/tokens.npy]"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("megolmo: error:") and "/nonexistent/tokens.npy" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing was written before the error


def test_entry_point_trains_and_reports(tmp_path, tokens):
    result = run_entry_point(tiny_overrides(tmp_path, tokens, "trainer.max_steps=3", "optim.warmup_steps=1"))
    assert result.returncode == 0, result.stderr
    assert "step      3/3 | loss" in result.stdout and "tok/s" in result.stdout and "ETA" in result.stdout
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 3
    # the start-up block: 60,000 tokens = 937 instances of 64; 3 steps of 8 take 0.0256 epochs
    lines = result.stdout.splitlines()
    host = socket.gethostname()
    assert f"layout: 1 ranks = tensor 1 x pipeline 1 x data 1; 1 node(s): {host}: ranks 0" in lines
    assert "data: 60K tokens in 1 file(s), 937 instances of 64; 512 tokens per step; the run takes 0.0256 epoch(s)" \
        in lines
    assert any(line.startswith("parameters: ") and "optimizer state" in line for line in lines)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["nodes"] == {host: [0]} and summary["data"]["instances_per_epoch"] == 937


def test_activation_checkpointing_gives_the_same_losses(tmp_path, tokens):
    plain = Trainer(load_config(tiny_overrides(tmp_path / "a", tokens, "trainer.max_steps=5",
                                                  "optim.warmup_steps=1"))).fit()
    recomputed = Trainer(load_config(tiny_overrides(tmp_path / "b", tokens, "trainer.max_steps=5",
                                                       "optim.warmup_steps=1",
                                                       "model.activation_checkpointing=true"))).fit()
    for a, b in zip(plain, recomputed, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-6)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)


def test_compiled_blocks_train_like_eager_ones(tmp_path, tokens):
    """``trainer.compile=true`` (each block, and at TP=1 the loss, through torch.compile) changes speed,
    not the losses."""
    common = ("trainer.max_steps=3", "optim.warmup_steps=0", "model.num_hidden_layers=2")
    eager = Trainer(load_config(tiny_overrides(tmp_path / "eager", tokens, *common))).fit()
    compiled_trainer = Trainer(load_config(tiny_overrides(tmp_path / "compiled", tokens, "trainer.compile=true",
                                                             *common)))
    assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None
               for block in compiled_trainer.chunks[0].model.layers.values())
    assert compiled_trainer.chunks[0].compiled_loss_sums is not None  # TP=1: the loss is compiled too
    compiled = compiled_trainer.fit()
    for a, b in zip(eager, compiled):
        assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
