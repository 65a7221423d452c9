"""Fault-tolerance benchmark: how long training blocks per checkpoint save, synchronous against asynchronous, at
1, 2 and 4 ranks; what the checksums cost against the save; and a chaos run's time against the uninterrupted
job. ``tools/bench_checkpoint_faults.py`` is the CLI.

The state is OLMo 2 1B's width and vocabulary (fp32 weights and both Adam moments), with ``--layers`` of its
16 blocks: an asynchronous save holds the state twice in host memory (training's and the staged copy), and the
whole 1B state (17.8 GB) twice does not fit a 24 GiB machine. Ranks split it by tensor parallelism, so the
state's total size is the same at every rank count. Files go to the page cache as well as the disk.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

from megolmo.benchmarks.chaos import run_chaos
from megolmo.benchmarks.launch import ROOT, free_port, run_training, write_benchmark_tokens
from megolmo.parallel.collectives import all_reduce_values, barrier, world_group


def _config(tokens: str, run_dir: Path, layers: int):
    from megolmo.config import load_config

    return load_config([
        "model=olmo2_1b", f"model.num_hidden_layers={layers}", f"data.paths=[{tokens}]", "data.dtype=uint32",
        "data.seq_len=64", "trainer.max_steps=10", "trainer.global_batch_size=1", "trainer.micro_batch_size=1",
        f"parallel.tensor={os.environ.get('WORLD_SIZE', '1')}", f"trainer.run_dir={run_dir}", "trainer.keep_last=1",
        "parallel.timeout_s=900"])


def worker(tokens: str, run_dir: Path, out: Path, layers: int) -> None:
    """On every rank: a synchronous save, then two asynchronous ones (the first allocates the host copy)."""
    from megolmo.checkpoint.manifest import describe
    from megolmo.trainer import Trainer

    trainer = Trainer(_config(tokens, run_dir, layers))
    group = world_group()
    results = {}
    for step, kind in ((1, "sync"), (2, "async_first"), (3, "async")):
        barrier(group)
        trainer.save(step, asynchronous=kind != "sync")
        blocked = trainer.last_save.blocked_s
        started = time.perf_counter()
        trainer.checkpoints.wait()
        barrier(group)
        results[kind] = {"blocked_s": blocked, "background_s": time.perf_counter() - started}
    for kind, r in results.items():  # the job waits for its slowest rank
        r["blocked_s"], r["background_s"] = all_reduce_values([r["blocked_s"], r["background_s"]], "max", group)
    latest = trainer.checkpoints.latest()
    files = [p for p in latest.rglob("*") if p.is_file()]
    if trainer.ps.is_main:
        started = time.perf_counter()
        describe(latest, [str(p.relative_to(latest)) for p in files])
        checksum_s = time.perf_counter() - started
        state_bytes = sum(p.stat().st_size for p in latest.glob("*.distcp"))
        out.write_text(json.dumps({**results, "checksum_one_process_s": checksum_s, "bytes": state_bytes}))
    del trainer
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


TINY = ["data.seq_len=32", "model.vocab_size=300", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.num_hidden_layers=2",
        "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.max_steps=30", "optim.lr=2e-3",
        "parallel.tensor=2", "parallel.distributed_optimizer=true", "trainer.save_interval=3",
        "trainer.async_save=true", "trainer.keep_last=3", "trainer.plots=false", "parallel.timeout_s=60"]


def chaos_rows(tmp: Path, kills: int) -> None:
    """The chaos test's job (TP2 x DP2, ZeRO-1, async saves every 3 of 30 steps) killed ``kills`` times."""
    tokens = write_benchmark_tokens(tmp / "chaos-tokens.npy", 40_000, 300)
    overrides = [f"data.paths=[{tokens}]", "data.dtype=uint16", *TINY]
    started = time.monotonic()
    run_training(4, overrides, tmp / "uninterrupted")
    straight = time.monotonic() - started
    chaos = run_chaos(4, overrides, tmp / "chaos", kills, 22)
    if chaos.returncode != 0:
        raise RuntimeError(f"the chaos run failed (seed {chaos.seed}):\n{''.join(chaos.stderr[-20:])}")
    redone = [kill.completed - step for kill, (step, _) in zip(chaos.kills, chaos.resumes)]
    print(f"\nchaos: 4 ranks (TP2 x DP2, ZeRO-1), 30 steps, async saves every 3, {kills} SIGKILLs (seed {chaos.seed})")
    print(f"  uninterrupted {straight:.1f} s | chaos {chaos.seconds:.1f} s | ratio {chaos.seconds / straight:.2f} | "
          f"{(chaos.seconds - straight) / kills:.1f} s per kill | steps redone per kill {redone}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--layers", type=int, default=2, help="of OLMo 2 1B's 16 blocks (host memory: see above)")
    parser.add_argument("--kills", type=int, default=5, help="chaos run's kills (0: no chaos run)")
    args = parser.parse_args(argv)
    import subprocess

    with tempfile.TemporaryDirectory(dir=os.environ.get("MEGOLMO_BENCH_DIR")) as tmp_name:
        tmp = Path(tmp_name)
        tokens = str(tmp / "tokens.npy")  # uint32: OLMo 2's EOS id does not fit uint16
        np.random.default_rng(0).integers(0, 100_000, 100_000, dtype=np.uint32).tofile(tokens)
        print(f"state: OLMo 2 1B's width and vocabulary, {args.layers} of 16 blocks; fp32 weights + Adam moments")
        print(f"{'ranks':>5} {'GB':>6} {'sync blocks s':>14} {'async blocks s':>15} {'async/sync':>11} "
              f"{'1st async s':>12} {'async writes s':>15} {'checksum s':>11} {'checksum/save':>14}")
        for ranks in [int(r) for r in args.ranks.split(",") if r]:
            out = tmp / f"result{ranks}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                   str(free_port()), "-m", "megolmo.benchmarks.checkpoint_faults", "--worker", tokens,
                   str(tmp / f"run{ranks}"), str(out), str(args.layers)]
            subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
                           capture_output=True)
            r = json.loads(out.read_text())
            sync, first, steady = r["sync"]["blocked_s"], r["async_first"]["blocked_s"], r["async"]["blocked_s"]
            checksum = r["checksum_one_process_s"] / ranks  # each rank checksums its own files, in parallel
            print(f"{ranks:>5} {r['bytes'] / 1e9:>6.2f} {sync:>14.2f} {steady:>15.3f} {steady / sync:>11.3f} "
                  f"{first:>12.2f} {r['async']['background_s']:>15.2f} {checksum:>11.2f} {checksum / sync:>14.3f}")
        print("blocks: training waits this long per save (slowest rank); 1st async: the first asynchronous save, "
              "which allocates the host copy;\nasync writes: the write after training resumed; checksum: one "
              "process's time over all files / ranks (each rank hashes what it wrote)")
        if args.kills:
            chaos_rows(tmp, args.kills)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
