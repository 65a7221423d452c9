"""Checkpoint benchmark: sharded save and load throughput (GB/s) of a run's full state (fp32 weights and
both Adam moments) on 1, 2 and 4 ranks with the distributed optimizer, beside ``torch.save`` /
``torch.load`` of the same tensors in one process. ``tools/bench_checkpoint.py`` is the CLI.

Files go to the machine's page cache as well as its disk; both sides of the comparison see the same."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megolmo.benchmarks.launch import ROOT, free_port, write_benchmark_tokens
from megolmo.parallel.collectives import barrier, world_group

MODEL = ["model.num_hidden_layers=8", "model.hidden_size=1024", "model.intermediate_size=4096",
         "model.num_attention_heads=16", "model.num_key_value_heads=16", "model.vocab_size=32000"]


def _config(tokens: str, run_dir: Path):
    from megolmo.config import load_config

    return load_config([
        *MODEL, f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=64", "trainer.max_steps=1",
        f"trainer.global_batch_size={os.environ.get('WORLD_SIZE', '1')}",
        "trainer.micro_batch_size=1", "parallel.distributed_optimizer=true", f"trainer.run_dir={run_dir}"])


def worker(tokens: str, run_dir: Path, out: Path) -> None:
    """Runs on every rank: save then load the trainer's state, timing both between barriers."""
    from megolmo.checkpoint.manager import CheckpointManager
    from megolmo.trainer import Trainer

    trainer = Trainer(_config(tokens, run_dir))
    group = world_group()
    barrier(group)
    started = time.perf_counter()
    trainer.save(1)
    saved = time.perf_counter() - started
    barrier(group)
    started = time.perf_counter()
    CheckpointManager.load(trainer.checkpoints.latest(), trainer.optimizer, weights_only=False)
    barrier(group)
    loaded = time.perf_counter() - started
    if trainer.ps.is_main:
        total = sum(p.stat().st_size for p in trainer.checkpoints.latest().glob("*.distcp"))
        out.write_text(json.dumps({"save_s": saved, "load_s": loaded, "bytes": total}))
    del trainer
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def torch_save_peer(tokens: str, tmp: Path) -> dict:
    """The same tensors (fp32 weights, exp_avg, exp_avg_sq per parameter) through torch.save / torch.load."""
    from megolmo.trainer import Trainer

    trainer = Trainer(_config(tokens, tmp / "peer-run"))
    state = {f"{kind}/{slot.name}": slot.param.detach().float().clone() for slot in trainer.buffers.slots
             for kind in ("model", "exp_avg", "exp_avg_sq")}
    path = tmp / "state.pt"
    started = time.perf_counter()
    torch.save(state, path)
    saved = time.perf_counter() - started
    started = time.perf_counter()
    torch.load(path)
    loaded = time.perf_counter() - started
    return {"save_s": saved, "load_s": loaded, "bytes": path.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", default="1,2,4")
    args = parser.parse_args(argv)
    import subprocess

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tokens = write_benchmark_tokens(tmp / "tokens.npy", 100_000, 32000)
        peer = torch_save_peer(tokens, tmp)
        rows = [("torch.save/load, 1 process", peer)]
        for ranks in [int(r) for r in args.ranks.split(",")]:
            out = tmp / f"result{ranks}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                   str(free_port()), "-m", "megolmo.benchmarks.checkpoint_io", "--worker", tokens,
                   str(tmp / f"run{ranks}"), str(out)]
            subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
                           capture_output=True)
            rows.append((f"megolmo DCP, {ranks} rank(s), ZeRO-1", json.loads(out.read_text())))
        print(f"state: fp32 weights + Adam moments of a {MODEL} model")
        print(f"{'':36} {'GB':>6} {'save s':>7} {'save GB/s':>10} {'load s':>7} {'load GB/s':>10} "
              f"{'save vs torch':>14} {'load vs torch':>14}")
        for name, r in rows:
            gb = r["bytes"] / 1e9
            print(f"{name:36} {gb:>6.2f} {r['save_s']:>7.2f} {gb / r['save_s']:>10.2f} {r['load_s']:>7.2f} "
                  f"{gb / r['load_s']:>10.2f} {peer['save_s'] / r['save_s']:>14.2f} "
                  f"{peer['load_s'] / r['load_s']:>14.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
