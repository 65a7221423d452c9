"""The throughput benchmark (megolmo.benchmarks.train_step, tools/bench_train.py): result structure, not timings."""

from __future__ import annotations

import json

import pytest
import torch

from megolmo.benchmarks import train_step as bench
from megolmo.flops import training_flops_per_token
from megolmo.model.config import ModelConfig

pytest.importorskip("transformers")

SMALL = ModelConfig(name="bench_test", vocab_size=256, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, eos_token_id=0, pad_token_id=None)


def small_settings(**overrides) -> bench.BenchSettings:
    values = dict(model=SMALL, seq_len=16, batch=2, steps=1, warmup=0, precisions=("fp32",),
                  peers=("megolmo", "transformers"), threads=1, mm_size=64)
    values.update(overrides)
    return bench.BenchSettings(**values)


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_result_structure_and_flops():
    result = bench.run_benchmark(small_settings())
    tokens = 2 * 16
    flops_token = training_flops_per_token(SMALL, 16)
    assert result["flops_per_token"] == flops_token
    assert result["flops_per_step"] == flops_token * tokens
    assert result["skipped"] == []
    assert result["param_counts"]["megolmo"] == result["param_counts"]["transformers"] > 0
    assert result["mm_flops"]["fp32"]["best"] > 0
    rows = {(r["peer"], r["precision"]): r for r in result["results"]}
    assert set(rows) == {("megolmo", "fp32"), ("transformers", "fp32")}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and len(row["step_times"]) == 1
        assert row["tokens_per_s"] == pytest.approx(tokens / row["step_s"])
        assert row["flops_per_s"] == pytest.approx(flops_token * row["tokens_per_s"])
        assert row["mm_fraction"] == pytest.approx(row["flops_per_s"] / result["mm_flops"]["fp32"]["best"])
        assert row["ratio_megolmo"] > 0
    assert rows[("megolmo", "fp32")]["ratio_megolmo"] == pytest.approx(1.0)
    mine, theirs = rows[("megolmo", "fp32")], rows[("transformers", "fp32")]
    assert theirs["ratio_megolmo"] == pytest.approx(mine["tokens_per_s"] / theirs["tokens_per_s"])
    # Same starting weights and batch: the first-step cross-entropy agrees across peers.
    assert mine["first_loss"] == pytest.approx(theirs["first_loss"], abs=1e-4)
    table = bench.format_table(result)
    assert "megolmo/peer" in table and "transformers" in table
    json.dumps(result)


def test_failing_peer_is_skipped(monkeypatch):
    def unavailable(*args, **kwargs):
        raise ImportError("No module named 'olmo_core'")

    monkeypatch.setitem(bench.BUILDERS, "olmo_core", unavailable)
    result = bench.run_benchmark(small_settings(peers=("megolmo", "olmo_core")))
    assert [r["peer"] for r in result["results"]] == ["megolmo"]
    assert result["skipped"][0]["peer"] == "olmo_core" and "ImportError" in result["skipped"][0]["reason"]
    assert "skipped" in bench.format_table(result)


def test_cli_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "resolve_model", lambda name: SMALL)
    out = tmp_path / "bench.json"
    assert bench.main(["--seq-len", "8", "--batch", "1", "--steps", "1", "--warmup", "0", "--precisions", "bf16",
                       "--peers", "megolmo", "--threads", "1", "--mm-size", "64", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["results"][0]["precision"] == "bf16" and data["results"][0]["tokens_per_s"] > 0


def test_olmo_core_names_cover_the_model():
    """Every megolmo/transformers parameter name maps onto a distinct OLMo-core name."""
    names = [n for n, _ in bench._megolmo_reference(SMALL, 0).named_parameters()]
    mapped = {bench.olmo_core_name(n) for n in names}
    assert len(mapped) == len(names)
    assert "blocks.1.feed_forward.w1.weight" in mapped and "lm_head.norm.weight" in mapped
