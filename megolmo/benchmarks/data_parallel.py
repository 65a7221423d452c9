"""Data-parallel benchmark: bytes per parameter per rank, measured from the allocated buffers that
``summary.json`` reports (parameters, fp32 gradient buffer, optimizer state), for DP = 1, 2, 4, 8 with
and without the distributed optimizer, beside Megatron's 6 + 12/DP (bf16) and 18; then step time with
the bucket reductions overlapped with backward and not. ``tools/bench_dp.py`` is the CLI."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from megolmo.benchmarks.launch import run_training, write_benchmark_tokens


def _model(hidden: int, layers: int) -> list[str]:
    return [f"model.num_hidden_layers={layers}", f"model.hidden_size={hidden}",
            f"model.intermediate_size={3 * hidden}", "model.num_attention_heads=8", "model.num_key_value_heads=8",
            "model.vocab_size=4096"]


def memory_table(tokens: str, tmp: Path, sizes: list[int]) -> None:
    print("bytes per parameter per rank (bf16 parameters, fp32 gradients, fp32 master + Adam moments)")
    print(f"{'DP':>3} {'ZeRO-1':>7} {'params':>7} {'grads':>6} {'optim':>6} {'total':>6} {'expected':>9} "
          f"{'ratio':>6} {'optim vs DP1':>13}")
    base_optim = None
    for dp in sizes:
        for distributed in (False, True):
            if dp == 1 and distributed:
                continue
            overrides = [*_model(256, 2), f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=64",
                         f"trainer.global_batch_size={dp}", "trainer.micro_batch_size=1", "trainer.max_steps=1",
                         "precision=bf16", f"parallel.distributed_optimizer={str(distributed).lower()}",
                         "trainer.save_interval=100000"]
            summary = run_training(dp, overrides, tmp / f"mem-dp{dp}-{distributed}").summary
            n = summary["parameters"]["per_rank"]
            b = summary["bytes_per_rank_max"]
            per = [b["params"] / n, b["grads"] / n, b["optimizer_state"] / n]
            expected = 6 + 12 / dp if distributed else 18.0
            base_optim = base_optim or b["optimizer_state"]
            print(f"{dp:>3} {'on' if distributed else 'off':>7} {per[0]:>7.2f} {per[1]:>6.2f} {per[2]:>6.2f} "
                  f"{sum(per):>6.2f} {expected:>9.2f} {sum(per) / expected:>6.3f} "
                  f"{b['optimizer_state'] / base_optim:>13.3f}", flush=True)


def overlap_table(tokens: str, tmp: Path, dp: int, hidden: int, layers: int, steps: int) -> None:
    print(f"\nstep time, DP={dp}, fp32, hidden {hidden}, {layers} layers, 4 buckets-ish of 4M elements")
    print(f"{'overlap':>8} {'ZeRO-1':>7} {'step s':>8} {'vs off':>7}")
    for distributed in (False, True):
        times = {}
        for overlap in (False, True):
            overrides = [*_model(hidden, layers), f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=128",
                         f"trainer.global_batch_size={2 * dp}", "trainer.micro_batch_size=1",
                         f"trainer.max_steps={steps}", "parallel.bucket_size=4000000",
                         f"parallel.overlap_grad_reduce={str(overlap).lower()}",
                         f"parallel.distributed_optimizer={str(distributed).lower()}", "trainer.save_interval=100000"]
            times[overlap] = run_training(dp, overrides, tmp / f"ov-{overlap}-{distributed}").median_step_seconds(2)
            print(f"{'on' if overlap else 'off':>8} {'on' if distributed else 'off':>7} {times[overlap]:>8.3f} "
                  f"{times[False] / times[overlap]:>7.2f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--overlap-dp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = write_benchmark_tokens(Path(tmp) / "tokens.npy", 500_000, 4096)
        memory_table(tokens, Path(tmp), [int(x) for x in args.sizes.split(",")])
        overlap_table(tokens, Path(tmp), args.overlap_dp, args.hidden, args.layers, args.steps)
