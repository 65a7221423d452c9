"""The throughput benchmark (megolmo.benchmarks.train_step, tools/bench_train.py): result structure, not timings."""

from __future__ import annotations

import json
import time

import pytest
import torch

from megolmo.benchmarks import train_step as bench
from megolmo.benchmarks.train_step import cli
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


def test_cpu_rows_have_no_memory_or_mfu():
    """Memory is tracked on CUDA only and there is no peak for a CPU: None, shown as "-"."""
    result = bench.run_benchmark(small_settings(peers=("megolmo",)))
    row = result["results"][0]
    for key in ("resident_bytes", "peak_step_bytes", "peak_bytes_alone", "mfu_device_peak", "vs_published"):
        assert row[key] is None, key
    lines = bench.format_table(result).splitlines()
    head, data = lines[0].split(), lines[2].split()
    assert head[-2:] == ["peak", "GiB"] and data[0] == "megolmo" and data[-2:] == ["-", "-"]  # MFU, peak GiB


def test_fp8_on_cpu_is_skipped_with_one_line_reasons(tmp_path, monkeypatch):
    result = bench.run_benchmark(small_settings(precisions=("bf16", "fp8")))
    assert {(r["peer"], r["precision"]) for r in result["results"]} == {("megolmo", "bf16"), ("transformers", "bf16")}
    assert set(result["mm_flops"]) == {"bf16"}
    reasons = {(s["peer"], s["precision"]): s["reason"] for s in result["skipped"]}
    assert set(reasons) == {("megolmo", "fp8"), ("transformers", "fp8")}
    assert reasons[("megolmo", "fp8")].startswith("precision=fp8 needs a CUDA GPU")
    assert reasons[("transformers", "fp8")] == bench.NO_FP8
    assert all("\n" not in r for r in reasons.values())
    assert "precision=fp8 needs a CUDA GPU" in bench.format_table(result)
    # Nothing at all to time: no crash, exit code 1.
    monkeypatch.setattr(cli, "resolve_model", lambda name: SMALL)
    assert bench.main(["--seq-len", "8", "--batch", "1", "--steps", "1", "--warmup", "0", "--precisions", "fp8",
                       "--peers", "megolmo,transformers", "--threads", "1", "--mm-size", "64"]) == 1


def test_checkpointing_groups():
    """Checkpointing on and off are separate groups: same first loss, ratios within each group."""
    result = bench.run_benchmark(small_settings(checkpointing=(False, True)))
    rows = {(r["peer"], r["activation_checkpointing"]): r for r in result["results"]}
    assert set(rows) == {(p, c) for p in ("megolmo", "transformers") for c in (False, True)}
    assert rows[("megolmo", True)]["first_loss"] == pytest.approx(rows[("megolmo", False)]["first_loss"], abs=1e-5)
    for ckpt in (False, True):
        mine, theirs = rows[("megolmo", ckpt)], rows[("transformers", ckpt)]
        assert mine["ratio_megolmo"] == pytest.approx(1.0)
        assert theirs["ratio_megolmo"] == pytest.approx(mine["tokens_per_s"] / theirs["tokens_per_s"])
        assert theirs["first_loss"] == pytest.approx(mine["first_loss"], abs=1e-4)
    assert set(result["mm_flops"]) == {"fp32"}
    table = bench.format_table(result)
    assert "megolmo/fp32/ckpt=on" in table and "megolmo/fp32/ckpt=off" in table


def test_published_figures_apply_to_gpu_runs_at_4096():
    assert bench.published_tokens_per_s("olmo2_1b", "fp8", "cuda", 4096) == 65_000
    assert bench.published_tokens_per_s("olmo2_1b", "bf16", "cpu", 4096) is None
    assert bench.published_tokens_per_s("olmo2_1b", "bf16", "cuda", 2048) is None
    for name, _ in bench.PUBLISHED_TOKENS_PER_S:  # the keys are the names of the shipped model configs
        assert ModelConfig.named(name).name == name


def test_cli_rejects_unknown_checkpointing():
    assert bench.main(["--activation-checkpointing", "sometimes"]) == 2


def test_failing_peer_is_skipped(monkeypatch):
    def unavailable(*args, **kwargs):
        raise ImportError("No module named 'olmo_core'")

    monkeypatch.setitem(bench.BUILDERS, "olmo_core", unavailable)
    result = bench.run_benchmark(small_settings(peers=("megolmo", "olmo_core")))
    assert [r["peer"] for r in result["results"]] == ["megolmo"]
    assert result["skipped"][0]["peer"] == "olmo_core" and "ImportError" in result["skipped"][0]["reason"]
    assert "skipped" in bench.format_table(result)


def test_cli_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "resolve_model", lambda name: SMALL)
    out = tmp_path / "bench.json"
    assert bench.main(["--seq-len", "8", "--batch", "1", "--steps", "1", "--warmup", "0", "--precisions", "bf16",
                       "--peers", "megolmo", "--threads", "1", "--mm-size", "64", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["results"][0]["precision"] == "bf16" and data["results"][0]["tokens_per_s"] > 0


def test_olmo_core_names_cover_the_model():
    """Every megolmo/transformers parameter name maps onto a distinct OLMo-core name."""
    names = [n for n, _ in bench.reference_model(SMALL, 0).named_parameters()]
    mapped = {bench.olmo_core_name(n) for n in names}
    assert len(mapped) == len(names)
    assert "blocks.1.feed_forward.w1.weight" in mapped and "lm_head.norm.weight" in mapped


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_cuda_without_a_gpu_in_one_line(capsys):
    assert bench.main(["--device", "cuda", "--peers", "megolmo"]) == 2
    expected = f"bench_train: --device cuda: no CUDA device is visible to this torch ({torch.__version__})"
    assert capsys.readouterr().err.strip() == expected


def test_time_on_device_on_cpu_times_the_call_and_passes_its_result_through():
    seconds, out = bench.time_on_device(lambda: sum(range(100_000)), torch.device("cpu"))
    assert out == sum(range(100_000)) and 0 < seconds < 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-event timing needs a GPU")
def test_time_on_device_on_cuda_times_the_gpu_work_not_the_launch():
    """``torch.cuda._sleep`` queues a kernel that spins for a number of GPU cycles and returns at once:
    a host clock around the launch sees almost nothing, the CUDA events see the spin."""
    device = torch.device("cuda")
    cycles = 200_000_000
    torch.cuda._sleep(1)  # the first launch loads the kernel
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    torch.cuda._sleep(cycles)
    launch_s = time.perf_counter() - start
    torch.cuda.synchronize(device)
    work_s = time.perf_counter() - start
    seconds, out = bench.time_on_device(lambda: torch.cuda._sleep(cycles), device)
    assert out is None
    assert launch_s < 0.1 * work_s  # the premise: a host clock without a sync times the launch
    assert seconds == pytest.approx(work_s, rel=0.3)
