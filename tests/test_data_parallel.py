"""Data parallelism on real gloo processes: parity with one process, the distributed optimizer's memory,
bucketed reductions that happen once per step and overlap the backward pass."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_tokens
from tests.helpers import run_jobs, run_worker

STEPS = 6
N_TOKENS = 40_000
SEQ = 32
LAYOUTS = {  # name: (ranks, masked, overrides)
    "dp2": (2, False, ["trainer.micro_batch_size=1"]),
    "tp2-sp": (2, False, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "dp4-mbs2": (4, False, ["trainer.micro_batch_size=2"]),
    "dp4-distopt": (4, False, ["parallel.distributed_optimizer=true", "trainer.micro_batch_size=1",
                               "parallel.bucket_size=30000"]),
    "dp2-distopt-masked": (2, True, ["parallel.distributed_optimizer=true", "trainer.micro_batch_size=2"]),
    "dp4-masked": (4, True, ["trainer.micro_batch_size=1"]),
    "tp2-pp2-dp2-distopt": (8, False, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true",
                                       "parallel.distributed_optimizer=true", "trainer.micro_batch_size=1",
                                       "parallel.bucket_size=20000"]),
}


def overrides(run_dir: Path, data: list[str], *extra: str) -> list[str]:
    return [*data, "data.dtype=uint16", f"data.seq_len={SEQ}", "model.vocab_size=300",
            "trainer.global_batch_size=8", "trainer.micro_batch_size=4", f"trainer.max_steps={STEPS}",
            "optim.lr=2e-3", "optim.warmup_steps=2", f"trainer.run_dir={run_dir}", "parallel.timeout_s=60", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, list[str]]:
    base = tmp_path_factory.mktemp("dp-data")
    tokens = write_tokens(base / "tokens.npy", N_TOKENS, 300)
    # Label masks whose density changes from instance to instance, so DP ranks see very different counts.
    density = np.repeat(np.random.default_rng(5).choice([0.02, 0.3, 0.95], N_TOKENS // SEQ + 1), SEQ)[:N_TOKENS]
    (np.random.default_rng(6).random(N_TOKENS) < density).astype(np.uint8).tofile(base / "mask.npy")
    held_out = write_tokens(base / "held_out.npy", 17 * SEQ, 300, seed=9)  # 17 instances: a padded last batch
    evaluation = [f"eval.lm.sets={{held: [{held_out}]}}", "eval.interval=3"]
    return {"plain": [f"data.paths=[{tokens}]"], "eval": evaluation,
            "masked": [f"data.paths=[{tokens}]", f"data.label_mask_paths=[{base / 'mask.npy'}]"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("dp")
    plan = {"single": (1, False, []), "single-masked": (1, True, []), **LAYOUTS}
    run_jobs({name: (ranks, overrides(base / name, data["masked" if masked else "plain"] + data["eval"], *extra))
              for name, (ranks, masked, extra) in plan.items()})
    return {name: base / name for name in plan}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_data_parallel_layouts_match_one_process(runs, layout):
    masked = LAYOUTS[layout][1]
    reference, got = metrics(runs["single-masked" if masked else "single"]), metrics(runs[layout])
    assert len(got) == STEPS
    assert got[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-5)
    assert got[0]["grad_norm"] == pytest.approx(reference[0]["grad_norm"], rel=1e-5)
    for a, b in zip(reference, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_held_out_evaluation_matches_one_process(runs, layout):
    """After steps 3 and 6, a forward-only pass over the held-out set (its last batch padded) gives the
    one-process CE and PPL."""
    reference = [m for m in metrics(runs["single-masked" if LAYOUTS[layout][1] else "single"]) if "eval/held/CE" in m]
    got = [m for m in metrics(runs[layout]) if "eval/held/CE" in m]
    assert [m["step"] for m in got] == [m["step"] for m in reference] == [3, 6]
    for a, b in zip(reference, got):
        assert b["eval/held/CE"] == pytest.approx(a["eval/held/CE"], rel=1e-5)
        assert b["eval/held/PPL"] == pytest.approx(a["eval/held/PPL"], rel=1e-5)
    assert 0 < got[-1]["eval/held/CE"] < got[0]["eval/held/CE"] * 1.5


def test_masked_data_is_really_uneven_across_ranks(data):
    mask = np.fromfile(data["masked"][1].split("=[")[1].rstrip("]"), dtype=np.uint8)
    per_instance = mask[: 64 * SEQ].reshape(64, SEQ).sum(axis=1)
    assert per_instance.max() > 10 * max(per_instance.min(), 1)


def test_distributed_optimizer_shards_state(runs):
    one = summary(runs["single"])["bytes_per_rank_max"]
    four = summary(runs["dp4-distopt"])["bytes_per_rank_max"]
    four_replicated = summary(runs["dp4-mbs2"])["bytes_per_rank_max"]
    assert four["optimizer_state"] <= 0.26 * one["optimizer_state"]
    assert four_replicated["optimizer_state"] == one["optimizer_state"]
    assert four["params"] >= one["params"] and four["grads"] >= one["grads"]  # not sharded (ZeRO-1)


PROBES = {  # name: (ranks, overrides): one training step's reductions and bucket events, as recorded
    **{f"{'reduce-scatter' if distributed else 'all-reduce'}-mbs{mbs}": (
        2, [f"trainer.micro_batch_size={mbs}", f"parallel.distributed_optimizer={str(distributed).lower()}"])
       for distributed in (False, True) for mbs in (4, 1)},  # 1 and 4 micro-batches per rank
    **{schedule: (4, ["trainer.micro_batch_size=1", "parallel.pipeline=2", f"parallel.virtual_pipeline={virtual}",
                      f"parallel.pipeline_schedule={schedule}", "parallel.distributed_optimizer=true"])
       for schedule, virtual in (("interleaved_zero_bubble", 1), ("zbv", 2))},
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory, data) -> dict[str, dict]:
    """Every probe (tests/workers/grad_reduction.py), those of one world size in one launch."""
    base = tmp_path_factory.mktemp("probes")
    for ranks in sorted({ranks for ranks, _ in PROBES.values()}):
        listing = base / f"probes{ranks}.json"
        listing.write_text(json.dumps([
            [str(base / f"{name}.json"), overrides(base / name, data["plain"], "trainer.max_steps=2",
                                                   "parallel.bucket_size=20000", *extra)]
            for name, (n, extra) in PROBES.items() if n == ranks]))
        result = run_worker("grad_reduction", [str(listing)], ranks, timeout=300)
        assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return {name: json.loads((base / f"{name}.json").read_text()) for name in PROBES}


@pytest.mark.parametrize("distributed", [False, True], ids=["all-reduce", "reduce-scatter"])
def test_gradients_reduced_once_per_step_in_overlapped_buckets(probes, distributed):
    kind = "reduce-scatter" if distributed else "all-reduce"
    by_mbs = {mbs: probes[f"{kind}-mbs{mbs}"] for mbs in (4, 1)}
    for probe in by_mbs.values():
        assert probe["buckets"] > 1
        assert probe["total_calls"] == probe["buckets"] * probe["steps"]  # once per step, never per micro-batch
        assert sum(nbytes for _, nbytes in probe["reductions"]) == probe["grad_buffer_bytes"]
        assert {name for name, _ in probe["reductions"]} == {"reduce_scatter" if distributed else "all_reduce"}
        events = probe["events"]
        first_launch = events.index(["launch", 0])
        last_ready = max(i for i, (kind, _) in enumerate(events) if kind == "grad_ready")
        assert first_launch < last_ready  # bucket 0 went out while backward was still producing gradients
    assert by_mbs[1]["micro_batches"] == 4 and by_mbs[4]["micro_batches"] == 1
    assert by_mbs[1]["reductions"] == by_mbs[4]["reductions"]


@pytest.mark.parametrize("schedule", ["interleaved_zero_bubble", "zbv"])
def test_zero_bubble_weight_passes_release_buckets_early(probes, schedule):
    """The library accumulates a zero-bubble schedule's weight gradients without autograd's hooks; the
    buckets still reduce once per step, and the first goes out while weight passes are still running."""
    probe = probes[schedule]
    assert probe["buckets"] > 1 and probe["micro_batches"] == 4
    assert probe["total_calls"] == probe["buckets"] * probe["steps"]
    assert sum(nbytes for _, nbytes in probe["reductions"]) == probe["grad_buffer_bytes"]
    events = probe["events"]
    assert events.count(["finished", -1]) == 1
    first_launch = next(i for i, (kind, _) in enumerate(events) if kind == "launch")
    last_ready = max(i for i, (kind, _) in enumerate(events) if kind == "grad_ready")
    assert first_launch < last_ready
