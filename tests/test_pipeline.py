"""Pipeline parallelism on real gloo processes: layout parity, schedule order, activation memory, failures."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from megolmo.errors import MegolmoConfigError
from megolmo.pipeline.layout import chunk_layer_ranges
from megolmo.pipeline.schedules import check_schedule_layout, schedule_name
from tests.conftest import write_mask, write_tokens
from tests.helpers import run_entry_point, run_jobs, run_worker, torchrun_root_cause

STEPS = 6
LAYOUTS = {  # name: (ranks, reference run, overrides)
    "pp2": (2, "single", ["parallel.pipeline=2", "trainer.profile_steps=[2]"]),
    "pp4": (4, "single", ["parallel.pipeline=4", "trainer.profile_steps=[2]"]),
    "pp2-v2": (2, "single", ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "trainer.profile_steps=[2]"]),
    "tp2-pp2-sp-uneven": (4, "single", ["parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true",
                                        "parallel.pipeline_layers=[3,1]"]),
    # zero-bubble schedules: label-masked data, data-parallel with ZeRO-1 where there are ranks for it
    "pp2-izb-dp2-zero1": (4, "masked", ["parallel.pipeline=2", "parallel.pipeline_schedule=interleaved_zero_bubble",
                                        "parallel.distributed_optimizer=true", "trainer.profile_steps=[2]"]),
    "pp2-zbv-dp2-zero1": (4, "masked", ["parallel.pipeline=2", "parallel.virtual_pipeline=2",
                                        "parallel.pipeline_schedule=zbv", "parallel.distributed_optimizer=true",
                                        "trainer.profile_steps=[2]"]),
    "pp4-izb-v2": (4, "masked8", ["parallel.pipeline=4", "parallel.virtual_pipeline=2",
                                  "parallel.pipeline_schedule=interleaved_zero_bubble"]),
    "pp4-zbv": (4, "masked8", ["parallel.pipeline=4", "parallel.virtual_pipeline=2", "parallel.pipeline_schedule=zbv"]),
}
REFERENCES = {"single": [], "masked": ["MASK"], "masked8": ["MASK", "model.num_hidden_layers=8"]}
ZBV = ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.pipeline_schedule=zbv"]


def overrides(run_dir: Path, tokens: str, *extra: str) -> list[str]:
    # the tiny model has 4 layers; 8 micro-batches of one sequence per step
    return [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=32", "model.vocab_size=300",
            "trainer.global_batch_size=8", "trainer.micro_batch_size=1", f"trainer.max_steps={STEPS}",
            "optim.lr=2e-3", "optim.warmup_steps=2", f"trainer.run_dir={run_dir}", "parallel.timeout_s=60", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One-process references plus each pipeline layout, STEPS steps each from the same seed and data."""
    base = tmp_path_factory.mktemp("pipeline")
    tokens = write_tokens(base / "tokens.npy", 40_000, 300)
    mask = f"data.label_mask_paths=[{write_mask(base / 'mask.npy', 40_000, 0.6)}]"
    held_out = write_tokens(base / "held_out.npy", 20 * 32, 300, seed=9)  # 20 instances: a padded last batch
    evaluation = [f"eval.lm.sets={{held: [{held_out}]}}"]  # after the last step only
    cases = {name: (1, [mask if x == "MASK" else x for x in extra] + evaluation)
             for name, extra in REFERENCES.items()}
    for name, (ranks, reference, extra) in LAYOUTS.items():
        cases[name] = (ranks, cases[reference][1] + extra)
    jobs = {name: (ranks, overrides(base / name, tokens, *extra)) for name, (ranks, extra) in cases.items()}
    # test_a_zbv_checkpoint_resumes_under_1f1b's two jobs, one after the other in the same launch
    jobs["zbv-then-1f1b/0"] = (2, overrides(base / "zbv-then-1f1b", tokens, mask, *ZBV, "trainer.stop_at=5"))
    jobs["zbv-then-1f1b/1"] = (2, overrides(base / "zbv-then-1f1b", tokens, mask, "parallel.pipeline=2"))
    consoles = run_jobs(jobs)
    assert "starting at step 5 from" in consoles["zbv-then-1f1b/1"]
    return {name: base / name for name in [*cases, "zbv-then-1f1b"]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_layouts_match_one_process(runs, layout):
    reference, got = metrics(runs[LAYOUTS[layout][1]]), metrics(runs[layout])
    assert len(got) == STEPS
    assert got[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-5)
    for a, b in zip(reference, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_held_out_evaluation_runs_forward_only_through_the_schedule(runs, layout):
    """The library's forward-only schedule over the held-out set gives the one-process CE after the last step."""
    reference = [m for m in metrics(runs[LAYOUTS[layout][1]]) if "eval/held/CE" in m]
    got = [m for m in metrics(runs[layout]) if "eval/held/CE" in m]
    assert [m["step"] for m in got] == [m["step"] for m in reference] == [STEPS]
    for a, b in zip(reference, got):
        assert b["eval/held/CE"] == pytest.approx(a["eval/held/CE"], rel=1e-5)


def reference_1f1b(p: int, rank: int, m: int) -> list[tuple[str, int, int]]:
    warmup = min(p - rank - 1, m)
    ops = [("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [("F", warmup + i, 0), ("B", i, 0)]
    return ops + [("B", i, 0) for i in range(m - warmup, m)]


def reference_interleaved(p: int, rank: int, m: int, v: int) -> list[tuple[str, int, int]]:
    """Megatron's interleaved order written out: forwards visit chunks 0..v-1 for each group of p
    micro-batches, backwards visit them v-1..0; warm-up (p - rank - 1) * 2 + (v - 1) * p forwards."""
    forwards = [("F", g * p + i, c) for g in range(m // p) for c in range(v) for i in range(p)]
    backwards = [("B", g * p + i, c) for g in range(m // p) for c in reversed(range(v)) for i in range(p)]
    warmup = min((p - rank - 1) * 2 + (v - 1) * p, m * v)
    ops = forwards[:warmup]
    for i in range(m * v - warmup):
        ops += [forwards[warmup + i], backwards[i]]
    return ops + backwards[m * v - warmup:]


def recorded_order(run_dir: Path, step: int, kinds: str = "FB") -> dict[int, list[tuple[str, int, int]]]:
    """Spans of each rank, in time order, from the written Chrome trace."""
    trace = json.loads((run_dir / f"pipeline_step{step}.json").read_text())["traceEvents"]
    by_rank: dict[int, list] = {}
    for event in sorted((e for e in trace if e["ph"] == "X" and e["cat"] in kinds), key=lambda e: e["ts"]):
        micro_batch, chunk = event["name"][1:].split(".")
        by_rank.setdefault(event["tid"], []).append((event["cat"], int(micro_batch), int(chunk)))
    return by_rank


@pytest.mark.parametrize("layout, p, v", [("pp2", 2, 1), ("pp4", 4, 1), ("pp2-v2", 2, 2)])
def test_recorded_schedule_is_the_reference_order(runs, layout, p, v):
    order = recorded_order(runs[layout], 2)
    assert sorted(order) == list(range(p))
    for rank in range(p):
        expected = reference_1f1b(p, rank, 8) if v == 1 else reference_interleaved(p, rank, 8, v)
        assert order[rank] == expected, f"rank {rank}"
    assert (runs[layout] / "pipeline_step2.png").stat().st_size > 10_000


@pytest.mark.parametrize("layout, v", [("pp2-izb-dp2-zero1", 1), ("pp2-zbv-dp2-zero1", 2)])
def test_zero_bubble_splits_every_backward_into_input_and_weight_passes(runs, layout, v):
    """Each (micro-batch, chunk) runs F, then I before W (or one full B, as the library does for the first
    stage); the 4 micro-batches per data-parallel rank all pass every chunk."""
    order = recorded_order(runs[layout], 2, "FBIW")
    assert sorted(order) == [0, 1, 2, 3]  # two data-parallel pipelines of two stages
    for rank, ops in order.items():
        for micro_batch in range(4):
            for chunk in range(v):
                kinds = [k for k, m, c in ops if (m, c) == (micro_batch, chunk)]
                assert kinds in (["F", "I", "W"], ["F", "B"], ["F", "W"]), (rank, micro_batch, chunk, kinds)
        assert any(k == "W" for k, _, _ in ops) and any(k == "I" for k, _, _ in ops), rank


def test_first_stage_holds_at_most_p_activation_sets(runs):
    for layout, p in (("pp2", 2), ("pp4", 4)):
        summary = json.loads((runs[layout] / "summary.json").read_text())
        alive = summary["pipeline_bubble"]["max_alive_activation_sets_per_stage"]
        assert alive[0] <= p and alive[0] < 8, (layout, alive)  # 8 micro-batches: GPipe would keep all 8
        assert alive == [p - s for s in range(p)], alive  # warm-up depth + 1 on every stage
        bubble = summary["pipeline_bubble"]
        assert bubble["theoretical"] == pytest.approx((p - 1) / 8) and bubble["measured"] > 0


def test_a_zbv_checkpoint_resumes_under_1f1b(runs):
    """ZBV places chunks in a V (rank 0 holds the first and the last); its checkpoint, keyed by global
    names, continues under plain 1F1B (from step 5: checked by the fixture) and gives the straight ZBV run's
    losses."""
    straight = metrics(runs["pp2-zbv-dp2-zero1"])  # the same data and seed: ZBV at DP=2, ZeRO-1
    resumed = metrics(runs["zbv-then-1f1b"])
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(straight[5:], resumed[5:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_a_failing_stage_ends_the_whole_job(tmp_path):
    tokens = write_tokens(tmp_path / "tokens.npy", 40_000, 300)
    started = time.monotonic()
    result = run_worker("failing_stage", overrides(tmp_path / "run", tokens, "parallel.pipeline=4",
                                                   "parallel.timeout_s=30"), nproc=4, timeout=120,
                        env={"MEGOLMO_TEST_FAIL_RANK": "1", "MEGOLMO_TEST_FAIL_AFTER": "20"})
    assert result.returncode != 0
    assert time.monotonic() - started < 90
    assert result.stderr.count("ValueError: injected failure on rank 1") == 2  # the traceback and torchrun's summary
    assert "megolmo: rank 1 failed:" in result.stderr
    assert torchrun_root_cause(result.stderr) == "megolmo: rank 1 failed: ValueError: injected failure on rank 1"


@pytest.mark.parametrize("args, message", [
    ((5, 2, 1, None), "model.num_hidden_layers=5 is not divisible by parallel.pipeline=2"),
    ((6, 2, 2, None), r"parallel.pipeline x parallel.virtual_pipeline=4"),
    ((5, 2, 1, [3, 1]), r"must be non-negative and sum to model.num_hidden_layers=5"),
    ((5, 2, 1, [3, 1, 1]), "needs 2 entries"),
])
def test_bad_pipeline_splits(args, message):
    with pytest.raises(MegolmoConfigError, match=message.replace(".", r"\.") if "\\" not in message else message):
        chunk_layer_ranges(*args)


def test_uneven_split_and_schedule_rules():
    assert chunk_layer_ranges(5, 2, 1, [3, 2]) == [range(0, 3), range(3, 5)]
    assert chunk_layer_ranges(8, 2, 2) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert schedule_name(None, 1) == "1f1b" and schedule_name(None, 2) == "interleaved_1f1b"
    check_schedule_layout("interleaved_1f1b", 4, 2, 3)  # fewer micro-batches than stages: one round
    check_schedule_layout("zbv", 2, 2, 8)
    for args, message in [(("1f1b", 4, 1, 3), "1f1b needs at least parallel.pipeline=4 micro-batches; got 3"),
                          (("1f1b", 2, 2, 8), "runs one chunk per rank; got parallel.virtual_pipeline=2"),
                          (("zbv", 2, 1, 8), "zbv needs parallel.virtual_pipeline=2; got 1"),
                          (("interleaved_zero_bubble", 4, 2, 9), "divides into rounds of parallel.pipeline=4; got 9"),
                          (("zbv", 2, 2, 8, True), "zbv splits each backward .* set trainer.compile=false")]:
        with pytest.raises(MegolmoConfigError, match=message):
            check_schedule_layout(*args)
    with pytest.raises(MegolmoConfigError, match="parallel.pipeline_schedule=dualpipe: choose one of 1f1b"):
        schedule_name("dualpipe", 1)


def test_pipeline_config_errors_at_start_up(tmp_path):
    tokens = write_tokens(tmp_path / "tokens.npy", 40_000, 300)
    result = run_entry_point(overrides(tmp_path / "run", tokens, "parallel.pipeline=2", "trainer.global_batch_size=1"),
                             nproc=2, timeout=120)
    assert result.returncode != 0  # torchrun reports a child's exit code 2 as 1
    line = ("megolmo: error: parallel.pipeline_schedule=1f1b needs at least parallel.pipeline=2 micro-batches; got 1 "
            "(trainer.global_batch_size / (data-parallel size x trainer.micro_batch_size))")
    assert [x for x in result.stderr.splitlines() if x.startswith("megolmo:")] == [line]  # rank 0 alone prints it
    assert torchrun_root_cause(result.stderr) == line
