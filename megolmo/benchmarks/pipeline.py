"""Pipeline benchmark: every schedule at PP = 2 and 4 with M = 4, 8, 16 micro-batches, in one run.

For each it prints the step time against PP = 1 at the same M (same global batch, one rank), the
measured bubble (idle over compute time, from the schedule's recorded spans) beside the schedule's
ideal (P - 1) / (V M), and the peak of live activation sets per stage. ``tools/bench_pipeline.py``
is the CLI. Each case is a real ``python -m megolmo.train`` job under torchrun.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from megolmo.benchmarks.launch import run_training, write_benchmark_tokens

SCHEDULE_VIRTUAL = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "interleaved_zero_bubble": 1, "zbv": 2}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", default="2,4")
    parser.add_argument("--micro-batches", default="4,8,16")
    parser.add_argument("--schedules", default=",".join(SCHEDULE_VIRTUAL))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    model = [f"model.num_hidden_layers={args.layers}", f"model.hidden_size={args.hidden}",
             f"model.intermediate_size={3 * args.hidden}", "model.num_attention_heads=8",
             "model.num_key_value_heads=4", "model.vocab_size=4096"]
    print(f"model: {args.layers} layers, hidden {args.hidden}, seq {args.seq_len}, micro-batch 1, fp32; "
          f"one thread per rank; median step over steps 3..{args.steps}; interleaved and zbv with V = 2")
    print(f"{'schedule':>24} {'PP':>3} {'M':>4} {'step s':>8} {'vs PP1':>7} {'bubble':>7} {'ideal':>6} "
          f"{'live activation sets per stage':>31}")
    with tempfile.TemporaryDirectory() as tmp:
        tokens = write_benchmark_tokens(Path(tmp) / "tokens.npy", 2_000_000, 4096)
        for m in [int(x) for x in args.micro_batches.split(",")]:
            common = [*model, f"data.paths=[{tokens}]", "data.dtype=uint16", f"data.seq_len={args.seq_len}",
                      f"trainer.global_batch_size={m}", "trainer.micro_batch_size=1", f"trainer.max_steps={args.steps}",
                      "trainer.log_interval=1000", "trainer.save_interval=100000"]
            baseline = run_training(1, common, Path(tmp) / f"pp1-m{m}").median_step_seconds(skip=2)
            print(f"{'(one rank)':>24} {1:>3} {m:>4} {baseline:>8.3f} {1:>7.2f}", flush=True)
            for p in [int(x) for x in args.pipeline.split(",")]:
                for schedule in args.schedules.split(","):
                    v = SCHEDULE_VIRTUAL[schedule]
                    overrides = [*common, f"parallel.pipeline={p}", f"parallel.virtual_pipeline={v}",
                                 f"parallel.pipeline_schedule={schedule}"]
                    try:
                        result = run_training(p, overrides, Path(tmp) / f"{schedule}-pp{p}-m{m}")
                    except RuntimeError as error:  # a layout the schedule refuses: say why, go on
                        print(f"{schedule:>24} {p:>3} {m:>4} refused: {str(error).splitlines()[-1][:80]}")
                        continue
                    seconds = result.median_step_seconds(skip=2)
                    bubble = result.summary["pipeline_bubble"]
                    alive = ",".join(map(str, bubble["max_alive_activation_sets_per_stage"]))
                    print(f"{schedule:>24} {p:>3} {m:>4} {seconds:>8.3f} {baseline / seconds:>7.2f} "
                          f"{bubble['measured']:>7.3f} {bubble['theoretical']:>6.3f} {alive:>31}", flush=True)
