"""A ladder in miniature, through the commands a user runs (``make ladder-demo``; issue 19's acceptance 2):

three tiny OLMo 2 sizes at three durations, trained by ``python -m megolmo.ladder run --launcher local`` with a
held-out LM set evaluated in the loop, then step 1 of ``fit`` on the held-out loss, which predicts the held-out
loss of a larger model trained on more tokens than any ladder run (itself trained by the same ``run``).

The stream is generated here: an order-1 Markov chain over 512 tokens whose every row is a Zipf law over its own
random order of the next tokens. Its loss falls with size (the 512 x 512 table is learnt at the rank the width
allows) and with data (rarer transitions are seen more often), down to the chain's entropy, so that both terms
of ``L(N, D)`` have something to measure. A run of this demo is resumable: rerun it and ``run`` skips what is done.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from megolmo.benchmarks.launch import run_logged
from megolmo.ladder.inputs import read_input

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 512
ZIPF = 1.2
DOC_LEN = 512  # tokens per document, the first an EOS (0)
SEQ_LEN = 64
BATCH = 32  # sequences per step, one micro-batch (trainer.micro_batch_size=BATCH: one forward per step)
LR = 1e-2
EVALS = 4  # step 1 needs only each run's last evaluation
HEAD_DIM = 8
LADDER = {"h16": 16, "h24": 24, "h32": 32}  # name: hidden size; 2 layers, SwiGLU 4 x hidden
MULTIPLIERS = (0.25, 0.5, 1.0)
HOLDOUT = ("h48", 48, 0.6)  # more N than h32 and, at 0.6 x Chinchilla, more tokens than h32 at 1 x
TRAIN_TOKENS, HELD_TOKENS = 4_000_000, 32_768
SET = "held"  # the eval.lm.sets name, and so the fit's task


def markov_tokens(n_tokens: int, seed: int, table_seed: int = 0) -> np.ndarray:
    """``n_tokens`` of the chain (``table_seed`` fixes its transitions, ``seed`` the draw), in documents of
    ``DOC_LEN`` generated side by side, one vectorised step per position."""
    table = np.random.default_rng(table_seed)
    order = np.stack([table.permutation(np.arange(1, VOCAB)) for _ in range(VOCAB)])  # row a: next tokens by rank
    cdf = np.cumsum(np.arange(1, VOCAB) ** -ZIPF)
    cdf /= cdf[-1]
    rng = np.random.default_rng(seed)
    docs = -(-n_tokens // DOC_LEN)
    tokens = np.zeros((docs, DOC_LEN), dtype=np.uint16)
    current = rng.integers(1, VOCAB, docs)
    for position in range(1, DOC_LEN):
        tokens[:, position] = current
        current = order[current, np.searchsorted(cdf, rng.random(docs)).clip(max=VOCAB - 2)]
    return tokens.reshape(-1)[:n_tokens]


def shapes(sizes: dict[str, int]) -> str:
    return json.dumps({name: {"hidden_size": hidden, "num_attention_heads": hidden // HEAD_DIM,
                              "num_hidden_layers": 2, "vocab_size": VOCAB} for name, hidden in sizes.items()})


def ladder_run(out: Path, root: Path, sizes: dict[str, int], multipliers: tuple[float, ...], data: list[str]) -> None:
    run_logged([sys.executable, "-m", "megolmo.ladder", "run", "--shapes", shapes(sizes), "--base-model", "tiny",
                "--multipliers", ",".join(f"{k:g}" for k in multipliers), "--seq-len", str(SEQ_LEN), "--batch",
                str(BATCH), "--lr", str(LR), "--evals", str(EVALS), "--no-downstream", "--root", str(root),
                "--launcher", "local", "--nproc-per-node", "1", "--", *data], out / "run.log", append=True)


def table(runs: list, fit: dict) -> str:
    lines = [f"{'run':<14}{'N':>10}{'tokens':>12}{'6ND':>11}{'held-out loss':>15}"]
    for run in runs:
        lines.append(f"{run.name:<14}{run.n:>10,}{run.final_tokens:>12,.0f}{6 * run.n * run.final_tokens:>11.3g}"
                     f"{run.loss[SET][-1]:>15.4f}")
    holdout = fit["holdout"]
    predicted, actual = (holdout["tasks"][SET][which]["task_loss"] for which in ("predicted", "actual"))
    error = predicted / actual - 1
    lines.append(f"held-out model {holdout['name']}: N {holdout['n']:,}, {holdout['tokens']:,.0f} tokens, 6ND "
                 f"{6 * holdout['n'] * holdout['tokens']:.3g}: predicted {predicted:.4f}, actual {actual:.4f}, "
                 f"error {error:+.2%} ({'within' if abs(error) < 0.03 else 'NOT within'} 3%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "ladder-demo")
    args = parser.parse_args(argv)
    started, out = time.perf_counter(), args.output.resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    train, held = out / "data" / "train.npy", out / "data" / "held.npy"
    markov_tokens(TRAIN_TOKENS, seed=1).tofile(train)
    markov_tokens(HELD_TOKENS, seed=2).tofile(held)
    data = [f"data.paths=[{train}]", "data.dtype=uint16", f"eval.lm.sets={{{SET}: [{held}]}}",
            f"trainer.micro_batch_size={BATCH}", "trainer.log_interval=50", "trainer.plots=false"]
    ladder_run(out, out / "ladder", LADDER, MULTIPLIERS, data)
    print(f"ladder: {len(LADDER) * len(MULTIPLIERS)} runs trained ({time.perf_counter() - started:.0f} s)", flush=True)
    name, hidden, multiplier = HOLDOUT
    ladder_run(out, out / "holdout", {name: hidden}, (multiplier,), data)
    print(f"held-out model trained ({time.perf_counter() - started:.0f} s)", flush=True)
    run_dirs = sorted(p for p in (out / "ladder").iterdir() if p.is_dir())
    holdout_dir = out / "holdout" / f"{name}-{multiplier:g}xC"
    run_logged([sys.executable, "-m", "megolmo.ladder", "fit", *map(str, run_dirs), "--holdout", str(holdout_dir),
                "--output", str(out / "fit.json"), "--plots", str(out / "plots")], out / "fit.log", append=True)
    print(table([read_input(p) for p in run_dirs], json.loads((out / "fit.json").read_text())))
    for plot in sorted((out / "plots").glob("*.png")):
        print(plot)
    print(f"ladder demo: {time.perf_counter() - started:.0f} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
