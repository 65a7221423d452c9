"""Start-up time and memory of the dataset at corpus scale, on sparse token files (no disk is written).

Each measurement runs in a fresh process and reports the resident memory its structures hold (VmRSS while
they are alive, less VmRSS after the imports; a process-wide peak would also count the imports' own
transient peak): build the dataset over the files, then read one global batch at a far step (what a
resumed job does first). The
previous implementation's cost (an int64 index of every instance, shuffled, on every rank) is measured by
running that same construction, at the sizes this machine's memory allows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ_LEN = 4096
TOKEN_BYTES = 4  # uint32, as OLMo 2's dolma2 tokens are stored


def sparse_corpus(root: Path, total_tokens: int, files: int) -> list[str]:
    """``files`` token files of ``total_tokens`` uint32 tokens in all, as holes: they cost no disk."""
    root.mkdir(parents=True, exist_ok=True)
    per_file = total_tokens // files
    paths = []
    for i in range(files):
        path = root / f"part-{i:05d}.npy"
        with open(path, "wb") as f:
            f.truncate(per_file * TOKEN_BYTES)
        paths.append(str(path))
    return paths


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_dataset(paths: list[str], step: int, global_batch: int) -> dict[str, float]:
    """Build the dataset and read step ``step``'s global batch; seconds and MB above the interpreter."""
    from megolmo.data.dataset import TokenDataset
    from megolmo.data.loader import GlobalBatchLoader

    baseline = resident_mb()
    started = time.perf_counter()
    dataset = TokenDataset(paths, SEQ_LEN, "uint32", vocab_size=100_352, seed=0)
    built = time.perf_counter() - started
    build_mb = resident_mb() - baseline
    loader = GlobalBatchLoader(dataset, global_batch_size=global_batch, micro_batch_size=global_batch, dp_rank=0,
                               dp_size=1)
    batch = loader.micro_batches(step)
    assert batch[0]["input_ids"].shape == (global_batch, SEQ_LEN)
    return {"build_s": built, "build_mb": build_mb, "total_s": time.perf_counter() - started,
            "memory_mb": resident_mb() - baseline}


def measure_previous_index(instances: int) -> dict[str, float]:
    """The previous implementation's start-up: every instance id, shuffled, held on every rank."""
    baseline = resident_mb()
    started = time.perf_counter()
    index = np.random.default_rng(0).permutation(np.arange(instances, dtype=np.int64))
    seconds = time.perf_counter() - started
    held = resident_mb() - baseline
    assert len(index) == instances
    return {"build_s": seconds, "build_mb": held}


def in_fresh_process(args: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "megolmo.benchmarks.data_index", "--worker", *args],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.splitlines()[-1])


def measure_corpus(root: Path, total_tokens: int, files: int, step: int, global_batch: int) -> dict[str, float]:
    sparse_corpus(root, total_tokens, files)
    return in_fresh_process(["dataset", str(root), str(step), str(global_batch)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1e9,1e11,1e12,4e12", help="corpus sizes in tokens")
    parser.add_argument("--files", type=int, default=300, help="token files per corpus")
    parser.add_argument("--previous-up-to", type=float, default=1e12,
                        help="largest corpus (tokens) for the previous implementation's index (memory!)")
    args = parser.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "dataset":
            paths = sorted(str(p) for p in Path(rest[0]).glob("part-*.npy"))
            print(json.dumps(measure_dataset(paths, int(rest[1]), int(rest[2]))))
        else:
            print(json.dumps(measure_previous_index(int(rest[0]))))
        return
    print(f"{'tokens':>8} {'instances':>12} | {'now: build s':>12} {'MB':>6} {'+ batch s':>9} {'MB':>7} | "
          f"{'previous: s':>11} {'MB':>8} | {'index MB ratio':>14}")
    for size in (float(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            now = measure_corpus(Path(tmp), int(size), args.files, step=10**6, global_batch=512)
        instances = int(size) // SEQ_LEN
        before = in_fresh_process(["previous", str(instances)]) if size <= args.previous_up_to else None
        ratio = f"{before['build_mb'] / max(now['build_mb'], 1):14.0f}" if before else f"{'-':>14}"
        previous = f"{before['build_s']:11.2f} {before['build_mb']:8.0f}" if before else f"{'(too large)':>20}"
        print(f"{size:8.0e} {instances:12,d} | {now['build_s']:12.3f} {now['build_mb']:6.1f} "
              f"{now['total_s'] - now['build_s']:9.2f} {now['memory_mb']:7.0f} | {previous} | {ratio}")


if __name__ == "__main__":
    main()
