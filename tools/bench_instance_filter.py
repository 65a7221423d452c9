"""Throughput of the repeated n-gram instance filter (megolmo/data/instance_filter.py) on one core, against
the tokens/s one GPU's training consumes: the filter's share of a data-loading thread."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from megolmo.data.instance_filter import RepetitionFilter  # noqa: E402

VOCAB = 100_352  # OLMo 2's padded dolma2 vocabulary
H100_BF16_FLOPS = 989e12  # dense BF16 peak
MFU = 0.4
PARAMS_7B = 7.3e9
TRAINER_TOKENS_PER_S = MFU * H100_BF16_FLOPS / (6 * PARAMS_7B)
TRAINER_FORMULA = f"{MFU} * {H100_BF16_FLOPS:.3g} FLOP/s / (6 * {PARAMS_7B:.2g} params)  (OLMo 2 7B, H100)"


def corpora(instances: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    """(a) uniform random ids; (b) natural-ish ids: independent Zipf-Mandelbrot draws (p(rank) ~ 1/(rank +
    2.7)), so frequent tokens recur at every lag as in text, but no sentence repeats; (c) the same with a
    pattern of 7 tokens repeated 40 times in every instance (all masked: the early exit)."""
    rng = np.random.default_rng(seed)
    weights = 1 / (np.arange(VOCAB) + 2.7)
    natural = rng.choice(VOCAB, size=(instances, seq_len), p=weights / weights.sum()).astype(np.uint32)
    repetitive = natural.copy()
    repetitive[:, 1000:1280] = np.tile(np.arange(7, dtype=np.uint32), 40)
    return {"random": rng.integers(0, VOCAB, (instances, seq_len), dtype=np.uint32),
            "natural-ish": natural, "repetitive": repetitive}


def tokens_per_s(filt: RepetitionFilter, data: np.ndarray) -> tuple[float, float]:
    """Tokens/s of ``filt.keeps`` over the rows of ``data`` (best of 3 passes) and the fraction kept."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        kept = sum(filt.keeps(ids) for ids in data)
        best = min(best, time.perf_counter() - started)
    return data.size / best, kept / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trainer-tokens-per-s", type=float, default=TRAINER_TOKENS_PER_S,
                        help=f"tokens/s one GPU trains on; default {TRAINER_TOKENS_PER_S:.0f} = {TRAINER_FORMULA}")
    args = parser.parse_args()

    filt = RepetitionFilter()
    print(f"RepetitionFilter{(filt.min_period, filt.max_period, filt.max_count)} (min_period, max_period, "
          f"max_count), {args.instances} instances of {args.seq_len} tokens, one thread")
    if args.trainer_tokens_per_s == TRAINER_TOKENS_PER_S:
        print(f"trainer: {TRAINER_FORMULA} = {TRAINER_TOKENS_PER_S:,.0f} tokens/s per GPU")
    else:
        print(f"trainer: {args.trainer_tokens_per_s:,.0f} tokens/s per GPU (--trainer-tokens-per-s)")
    print(f"{'ids':<12} {'dtype':<7} {'kept':>5} {'filter tokens/s':>16} {'x trainer':>10} {'thread share':>13}")
    for name, data in corpora(args.instances, args.seq_len, args.seed).items():
        for dtype in (np.uint32, np.int64):
            rate, kept = tokens_per_s(filt, data.astype(dtype))
            ratio = rate / args.trainer_tokens_per_s
            print(f"{name:<12} {np.dtype(dtype).name:<7} {kept:>5.0%} {rate:>16,.0f} {ratio:>10,.0f} "
                  f"{1 / ratio:>13.5%}")


if __name__ == "__main__":
    main()
