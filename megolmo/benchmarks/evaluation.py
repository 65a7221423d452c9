"""Evaluation cost: one held-out batch forward only, and a whole pass over a held-out set, against one
training step of the same shape, for the tiny model and a ~100M-parameter one (one process).
``tools/bench_eval.py`` is the CLI. GPU work is timed with CUDA events, CPU work with the host clock.

The LM pass needs no logit gather under tensor parallelism: its cross-entropy is vocab-parallel, as in
training, so each rank reduces two numbers per token, never [tokens, vocab] logits."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megolmo.benchmarks.launch import write_benchmark_tokens

MODELS = {
    "tiny": ["model=tiny"],
    "100M": ["model.hidden_size=768", "model.num_hidden_layers=12", "model.num_attention_heads=12",
             "model.num_key_value_heads=12", "model.intermediate_size=2048", "model.vocab_size=16384"],
}


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(name: str, seq_len: int, batch: int, held_out_instances: int, repeats: int) -> dict[str, float]:
    from megolmo.config import load_config
    from megolmo.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        vocab = 16384 if name == "100M" else 2048
        tokens = write_benchmark_tokens(Path(tmp) / "train.npy", 64 * batch * seq_len, vocab)
        held = write_benchmark_tokens(Path(tmp) / "held.npy", held_out_instances * seq_len, vocab)
        trainer = Trainer(load_config([*MODELS[name], f"data.paths=[{tokens}]", "data.dtype=uint16",
                                       f"data.seq_len={seq_len}", f"trainer.global_batch_size={batch}",
                                       f"trainer.micro_batch_size={batch}", f"trainer.run_dir={tmp}/run",
                                       f"eval.lm.sets={{held: [{held}]}}", "trainer.max_steps=100"]))
        device = trainer.ps.device
        steps = [timed(lambda s=s: trainer.train_step(s), device) for s in range(repeats + 1)][1:]
        held_out = trainer.evaluations.held_out[0]
        micro = held_out.batches.read_step(0).micro_batches
        evals = [timed(lambda: trainer.step_fn.evaluate(micro), device) for _ in range(repeats + 1)][1:]
        from megolmo.evaluation.lm import evaluate_set
        whole = timed(lambda: evaluate_set(trainer.step_fn, held_out, trainer.ps), device)
        return {"step_s": statistics.median(steps), "eval_batch_s": statistics.median(evals), "pass_s": whole,
                "batches": held_out.num_batches}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,100M")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (and per evaluation batch)")
    parser.add_argument("--held-out", type=int, default=64, help="instances in the held-out set")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"{'model':>6} | {'train step s':>12} | {'eval batch s':>12} {'/ step':>7} | {'pass s':>7} "
          f"{'batches':>7} {'/ step':>7}")
    for name in args.models.split(","):
        r = measure(name, args.seq_len, args.batch, args.held_out, args.repeats)
        print(f"{name:>6} | {r['step_s']:12.3f} | {r['eval_batch_s']:12.3f} {r['eval_batch_s'] / r['step_s']:7.2f} | "
              f"{r['pass_s']:7.2f} {r['batches']:7d} {r['pass_s'] / r['step_s']:7.2f}")


if __name__ == "__main__":
    main()
