"""Pipeline benchmark: step time for PP = 1, 2, 4 with M = 4, 8, 16 micro-batches, and the measured
bubble fraction (idle over forward/backward time, from the engine's recorded spans) beside the
theoretical (P - 1) / M. ``tools/bench_pipeline.py`` is the CLI."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from megolmo.benchmarks.launch import run_training, write_benchmark_tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", default="1,2,4")
    parser.add_argument("--micro-batches", default="4,8,16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    model = [f"model.num_hidden_layers={args.layers}", f"model.hidden_size={args.hidden}",
             f"model.intermediate_size={3 * args.hidden}", "model.num_attention_heads=8",
             "model.num_key_value_heads=4", "model.vocab_size=4096"]
    print(f"model: {args.layers} layers, hidden {args.hidden}, seq {args.seq_len}, micro-batch 1, fp32; "
          f"one thread per rank; median step over steps 3..{args.steps}")
    print(f"{'PP':>3} {'M':>4} {'step s':>8} {'tok/s':>8} {'vs PP1':>7} {'bubble measured':>16} "
          f"{'theoretical':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        tokens = write_benchmark_tokens(Path(tmp) / "tokens.npy", 2_000_000, 4096)
        baseline: dict[int, float] = {}
        for m in [int(x) for x in args.micro_batches.split(",")]:
            for p in [int(x) for x in args.pipeline.split(",")]:
                overrides = [*model, f"data.paths=[{tokens}]", "data.dtype=uint16", f"data.seq_len={args.seq_len}",
                             f"trainer.global_batch_size={m}", "trainer.micro_batch_size=1",
                             f"trainer.max_steps={args.steps}", "trainer.log_interval=1000",
                             "trainer.save_interval=100000", f"parallel.pipeline={p}"]
                result = run_training(p, overrides, Path(tmp) / f"pp{p}-m{m}")
                seconds = result.median_step_seconds(skip=2)
                baseline.setdefault(m, seconds)
                bubble = result.summary.get("pipeline_bubble") or {}
                measured = f"{bubble['measured']:.3f}" if bubble.get("measured") is not None else "-"
                theory = f"{bubble['theoretical']:.3f}" if bubble else "0"
                tokens_per_s = m * args.seq_len / seconds
                print(f"{p:>3} {m:>4} {seconds:>8.3f} {tokens_per_s:>8.0f} {baseline[m] / seconds:>7.2f} "
                      f"{measured:>16} {theory:>12}", flush=True)
