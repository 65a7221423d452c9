"""Evaluation cost against a training step of the same batch shape: one held-out batch and a whole held-out
pass, one downstream batch and a whole downstream task (real ``olmo_eval`` task, dolma2 tokenizer), for the
tiny model and a ~100M-parameter one, both with OLMo 2's 100,352-row vocabulary. Then under TP2 (two
processes): what gathering the logits would cost, against the vocab-parallel scoring megolmo does instead.
``tools/bench_eval.py`` is the CLI. GPU work is timed with CUDA events, CPU work with the host clock."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megolmo.benchmarks.launch import ROOT, free_port

VOCAB = ["model.vocab_size=100352", "model.eos_token_id=100257", "model.pad_token_id=100277"]
MODELS = {
    "tiny": ["model=tiny", *VOCAB],
    "100M": ["model.hidden_size=384", "model.num_hidden_layers=12", "model.num_attention_heads=6",
             "model.num_key_value_heads=6", "model.intermediate_size=1024", *VOCAB],
}
TASK = "arc_easy"


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


def build_trainer(name: str, tmp: str, seq_len: int, batch: int, held_out: int, docs: int, extra: list[str]):
    from megolmo.config import load_config
    from megolmo.evaluation.assets import dolma2_tokenizer
    from megolmo.trainer import Trainer

    rng = np.random.default_rng(0)
    tokens, held = Path(tmp) / "train.npy", Path(tmp) / "held.npy"
    rng.integers(0, 100_278, 64 * batch * seq_len, dtype=np.uint32).tofile(tokens)
    rng.integers(0, 100_278, held_out * seq_len, dtype=np.uint32).tofile(held)
    return Trainer(load_config([*MODELS[name], f"data.paths=[{tokens}]", "data.dtype=uint32",
                                f"data.seq_len={seq_len}", f"trainer.global_batch_size={batch}",
                                f"trainer.micro_batch_size={batch}", f"trainer.run_dir={tmp}/run",
                                f"eval.lm.sets={{held: [{held}]}}", f"eval.downstream.tasks=[{TASK}]",
                                f"eval.downstream.limit={docs}", f"eval.tokenizer={dolma2_tokenizer()}",
                                "trainer.max_steps=100", "trainer.plots=false", *extra]))


def downstream_batch(trainer) -> list[dict[str, torch.Tensor]]:
    """The task's first global batch of rows (its longest), as the evaluation runs it."""
    from megolmo.evaluation.downstream import _micro_batches

    task = trainer.evaluations.tasks[0]
    gbs = trainer.cfg.trainer.global_batch_size
    order = sorted(range(len(task)), key=lambda i: -len(task.tokens[i]))[:gbs]
    return _micro_batches(task, order, trainer.step_fn, gbs, trainer.cfg.data.seq_len)


def measure(name: str, seq_len: int, batch: int, held_out: int, docs: int, repeats: int) -> dict[str, float]:
    """One process: seconds of a training step and of each evaluation piece."""
    from megolmo.evaluation.downstream import evaluate_task
    from megolmo.evaluation.lm import evaluate_set

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(name, tmp, seq_len, batch, held_out, docs, [])
        device, step_fn = trainer.ps.device, trainer.step_fn
        steps = [timed(lambda s=s: trainer.train_step(s), device) for s in range(repeats + 1)][1:]
        held, task = trainer.evaluations.held_out[0], trainer.evaluations.tasks[0]
        lm_micro = held.batches.read_step(0).micro_batches
        ds_micro = downstream_batch(trainer)
        lm_batch = [timed(lambda: step_fn.evaluate(lm_micro), device) for _ in range(repeats + 1)][1:]
        ds_batch = [timed(lambda: step_fn.evaluate(ds_micro), device) for _ in range(repeats + 1)][1:]
        lm_pass = timed(lambda: evaluate_set(step_fn, held, trainer.ps), device)
        ds_pass = timed(lambda: evaluate_task(step_fn, task, batch, seq_len), device)
        return {"step_s": statistics.median(steps), "lm_batch_s": statistics.median(lm_batch), "lm_pass_s": lm_pass,
                "lm_batches": held.num_batches, "ds_batch_s": statistics.median(ds_batch), "ds_pass_s": ds_pass,
                "ds_rows": len(task), "ds_row_tokens": int(ds_micro[0]["input_ids"].shape[1])}


def tp_worker(name: str, seq_len: int, batch: int, docs: int, repeats: int) -> None:
    """Under torchrun (TP2): one downstream batch scored vocab-parallel, against the all-gather of its logits
    that scoring from full logits would need first. Rank 0 prints JSON."""
    from megolmo.parallel.collectives import all_gather

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(name, tmp, seq_len, batch, 8, docs, ["parallel.tensor=2"])
        device, step_fn, chunk, ps = trainer.ps.device, trainer.step_fn, trainer.step_fn.chunks[0], trainer.ps
        micro = downstream_batch(trainer)
        scored = [timed(lambda: step_fn.evaluate(micro), device) for _ in range(repeats + 1)][1:]
        with torch.no_grad():
            logits = torch.cat([chunk(b["input_ids"].to(device)) for b in micro])
        pieces = [torch.empty_like(logits) for _ in range(ps.tp)]
        gathered = [timed(lambda: all_gather(pieces, logits, ps.tp_group), device) for _ in range(repeats + 1)][1:]
        tokens = logits.shape[0] * logits.shape[1]
        if ps.is_main:
            print(json.dumps({"score_s": statistics.median(scored), "gather_s": statistics.median(gathered),
                              "gather_bytes": logits.numel() * logits.element_size() * (ps.tp - 1),
                              "score_bytes": tokens * 3 * 4, "rows": len(logits)}))


def run_tp(name: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(ROOT / "tools" / "bench_eval.py"), "--tp-worker", name, "--seq-len", str(args.seq_len),
           "--batch", str(args.batch), "--docs", str(args.docs), "--repeats", str(args.repeats)]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"TP2 worker failed:\n{result.stderr[-3000:]}")
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,100M")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (and per evaluation batch)")
    parser.add_argument("--held-out", type=int, default=64, help="instances in the held-out set")
    parser.add_argument("--docs", type=int, default=32, help=f"{TASK} documents in the downstream pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tp-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tp_worker:
        tp_worker(args.tp_worker, args.seq_len, args.batch, args.docs, args.repeats)
        return
    print(f"one process, batch {args.batch} x {args.seq_len} tokens; downstream: {TASK}, first {args.docs} documents")
    print(f"{'model':>6} | {'step s':>7} | {'LM batch':>8} {'/step':>6} | {'LM pass':>7} {'/step':>6} | "
          f"{'task batch':>10} {'/step':>6} | {'task pass':>9} {'rows':>5} {'/step':>6}")
    for name in args.models.split(","):
        r = measure(name, args.seq_len, args.batch, args.held_out, args.docs, args.repeats)
        s = r["step_s"]
        print(f"{name:>6} | {s:7.3f} | {r['lm_batch_s']:8.3f} {r['lm_batch_s'] / s:6.2f} | {r['lm_pass_s']:7.2f} "
              f"{r['lm_pass_s'] / s:6.2f} | {r['ds_batch_s']:10.3f} {r['ds_batch_s'] / s:6.2f} | "
              f"{r['ds_pass_s']:9.2f} {r['ds_rows']:5d} {r['ds_pass_s'] / s:6.2f}   (task rows {r['ds_row_tokens']} tokens)")
    print("TP2 (2 processes), one downstream batch: vocab-parallel scoring vs gathering its logits first")
    print(f"{'model':>6} | {'score s':>8} | {'gather s':>8} {'/score':>7} | {'bytes reduced':>13} {'bytes gathered':>14}")
    for name in args.models.split(","):
        r = run_tp(name, args)
        print(f"{name:>6} | {r['score_s']:8.3f} | {r['gather_s']:8.3f} {r['gather_s'] / r['score_s']:7.2f} | "
              f"{r['score_bytes']:13,d} {r['gather_bytes']:14,d}")


if __name__ == "__main__":
    main()
