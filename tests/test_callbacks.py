"""The callback layer: a run observed through it equals the run of the loop before it (console, metrics,
checkpoints, run directory, pipeline timeline), and a callback that raises is named and ends every rank."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from megolmo.callbacks import Callback, CallbackError, CallbackList
from tests.conftest import write_tokens
from tests.helpers import ROOT, run_entry_point, run_worker, torchrun_root_cause

# Recorded with the trainer before the callback layer (commit 1ba5975), same configs and data as below; the
# losses (console, metrics, final_loss) re-recorded when the data order became per-index (issue 15).
BEFORE = json.loads((ROOT / "tests" / "data" / "run_observed_before_callbacks.json").read_text())
ADDED_SUMMARY_KEYS = {"pipeline_schedule", "run_dir", "nodes", "data", "nonfinite_steps", "checkpoints"}  # new with the schedules; the rest of summary.json is unchanged
ADDED_BUBBLE_KEYS = {"schedule"}
ADDED_CONSOLE_PREFIXES = ("layout: ", "parameters: ", "data: ", "plots: ")  # the start-up block, the pictures
ADDED_FILES = {"loss.png"}
ADDED_METRIC_KEYS = {"data_wait_s", "masked_instances", "step_time_s", "peak_allocated_gb", "peak_reserved_gb",
                     "nonfinite_step", "checkpoint_blocked_s"}
LAYOUTS = {"single": (1, []), "pp2": (2, ["parallel.pipeline=2", "trainer.profile_steps=[2]"])}


def overrides(tokens: str, run: Path, *extra: str) -> list[str]:
    return [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=32", "model.vocab_size=300",
            "trainer.global_batch_size=4", "trainer.micro_batch_size=1", "trainer.max_steps=4", "optim.lr=2e-3",
            "optim.warmup_steps=1", "trainer.save_interval=2", f"trainer.run_dir={run}", "parallel.timeout_s=60",
            *extra]


def observe(run: Path, stdout: str) -> dict:
    """What a user sees of a run, with paths and timings masked."""
    console = [re.sub(r" \(training blocked [\d.]+ s\)$", "", re.sub(r"[\d,]+ tok/s \| ETA \S+", "<RATE>", line))
               for line in stdout.replace(str(run.resolve()), "<RUN>").replace(str(run), "<RUN>").splitlines()
               if not line.startswith(ADDED_CONSOLE_PREFIXES)]
    metrics = [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_sec", *ADDED_METRIC_KEYS)}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    seen = {"console": console, "metrics": metrics,
            "files": sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()
                            and str(p.relative_to(run)) not in ADDED_FILES),
            "summary_keys": sorted(set(summary) - ADDED_SUMMARY_KEYS),
            "summary": {k: summary[k] for k in ("model", "precision", "layout", "parameters", "bytes_per_rank_max",
                                                "steps", "tokens", "final_loss")}}
    if "pipeline_bubble" in summary:
        seen["pipeline_bubble_keys"] = sorted(set(summary["pipeline_bubble"]) - ADDED_BUBBLE_KEYS)
        seen["alive"] = summary["pipeline_bubble"]["max_alive_activation_sets_per_stage"]
        for trace in sorted(run.glob("pipeline_step*.json")):
            events = json.loads(trace.read_text())["traceEvents"]
            seen.setdefault("timeline", {})[trace.name] = sorted(
                [e["tid"], e["name"]] for e in events if e.get("cat") in ("F", "B"))
    return seen


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_run_through_the_callbacks_equals_the_run_before_them(tmp_path, layout):
    tokens = write_tokens(tmp_path / "tokens.npy", 20_000, 300)
    ranks, extra = LAYOUTS[layout]
    result = run_entry_point(overrides(tokens, tmp_path / layout, *extra), nproc=ranks, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert observe(tmp_path / layout, result.stdout) == BEFORE[layout]


def test_a_raising_callback_is_named_in_one_line_and_ends_every_rank(tmp_path):
    tokens = write_tokens(tmp_path / "tokens.npy", 20_000, 300)
    started = time.monotonic()
    result = run_worker("failing_callback", overrides(tokens, tmp_path / "run", "parallel.pipeline=2",
                                                      "parallel.timeout_s=30"), nproc=2, timeout=120,
                        env={"MEGOLMO_TEST_FAIL_RANK": "1", "MEGOLMO_TEST_FAIL_STEP": "2"})
    assert result.returncode != 0
    assert time.monotonic() - started < 90  # not the 30 s process-group timeout twice over
    ours = [line for line in result.stderr.splitlines() if line.startswith("megolmo:")]  # torchrun's report aside
    assert ours[0] == "megolmo: rank 1: error: callback FlakyLogger.on_step_end failed: OSError: disk quota exceeded"
    assert len(ours) == 2 and ours[1].startswith("megolmo: rank 0: stopping because another rank failed")
    assert "second line" not in result.stderr and "FlakyLogger" not in "".join(ours[1:])
    assert torchrun_root_cause(result.stderr) == ours[0]  # not rank 0, which only saw rank 1 go
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert 1 <= len(metrics) <= 2  # the job ended at step 2 (rank 0 may be stopped before writing it)


def test_callback_list_calls_in_order_and_names_the_failing_one():
    calls = []

    class Recording(Callback):
        def __init__(self, tag: str):
            self.tag = tag

        def on_end(self, trainer) -> None:
            calls.append(self.tag)

    class Broken(Callback):
        def on_end(self, trainer) -> None:
            raise KeyError("eval/c4")

    callbacks = CallbackList([Recording("a"), Recording("b")])
    callbacks.call("on_end", None)
    assert calls == ["a", "b"]
    with pytest.raises(CallbackError, match=r"^callback Broken.on_end failed: KeyError: 'eval/c4'$") as raised:
        CallbackList([Recording("c"), Broken(), Recording("never")]).call("on_end", None)
    assert isinstance(raised.value.__cause__, KeyError) and calls == ["a", "b", "c"]
