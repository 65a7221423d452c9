"""Evaluate a checkpoint, soup or released model outside training, through the trainer's own evaluation.

``python tools/evaluate.py CKPT_OR_HF_DIR --lm-sets NAME=FILE[,FILE...] ... [-- OVERRIDES]`` builds the
model exactly as a training job starting from that checkpoint would (any layout, under torchrun too) and
runs the in-loop evaluation's passes (``megolmo.evaluation.lm``), so offline and in-loop numbers agree. A
Hugging Face directory is converted to a megolmo checkpoint first (one process). Results: a JSON file and
a table on the console.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megolmo.checkpoint.hf import hf_to_megolmo, is_hf_dir
from megolmo.errors import MegolmoConfigError


def parse_sets(specs: list[str]) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, files = spec.partition("=")
        if not sep or not name or not files:
            raise MegolmoConfigError(f"--lm-sets {spec!r}: expected NAME=FILE[,FILE...]")
        sets[name] = files.split(",")
    return sets


def evaluate(checkpoint: Path, sets: dict[str, list[str]], output: Path, overrides: list[str]
             ) -> dict[str, dict[str, float]] | None:
    """Every set's CE and PPL (None on ranks other than 0, which alone writes ``output``)."""
    from megolmo.config import load_config
    from megolmo.evaluation.lm import evaluate_set
    from megolmo.parallel.bootstrap import discover
    from megolmo.trainer import Trainer

    run_dir = output.with_suffix(".run")
    if is_hf_dir(checkpoint):
        if discover().world_size > 1:
            raise MegolmoConfigError(f"{checkpoint} is a Hugging Face directory: convert it once first, "
                                     f"python tools/convert_checkpoint.py hf-to-megolmo {checkpoint} CKPT_DIR")
        converted = run_dir / "converted"
        hf_to_megolmo(checkpoint, converted)
        checkpoint = converted
    rendered = "{" + ", ".join(f"{name}: [{', '.join(files)}]" for name, files in sets.items()) + "}"
    first_file = next(iter(sets.values()))[0]  # the training loader needs files; it is never read
    cfg = load_config([f"load_path={checkpoint}", "reset_trainer_state=true", f"eval.lm.sets={rendered}",
                       f"data.paths=[{first_file}]", f"trainer.run_dir={run_dir}", "trainer.max_steps=1",
                       "trainer.plots=false", *overrides])
    trainer = Trainer(cfg)
    results = {held_out.name: evaluate_set(trainer.step_fn, held_out, trainer.ps) for held_out in trainer.held_out}
    if not trainer.ps.is_main:
        return None
    output.write_text(json.dumps({"checkpoint": str(checkpoint), "lm": results}, indent=1) + "\n")
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    width = max(len(name) for name in results)
    rows = [f"{'set':<{width}}  {'CE':>8}  {'PPL':>10}"]
    rows += [f"{name:<{width}}  {r['CE']:8.4f}  {r['PPL']:10.3f}" for name, r in results.items()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a megolmo checkpoint or run directory, or a Hugging Face dir")
    parser.add_argument("--lm-sets", nargs="+", required=True, metavar="NAME=FILE[,FILE...]",
                        help="held-out token files per set (typed like data.paths: sidecar or data.dtype)")
    parser.add_argument("--output", type=Path, default=Path("evaluation.json"), help="results as JSON")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser.epilog = "config overrides follow --, e.g. -- parallel.tensor=2 data.seq_len=4096"
    args = parser.parse_args(argv[:split])
    try:
        results = evaluate(args.checkpoint, parse_sets(args.lm_sets), args.output, argv[split + 1:])
    except MegolmoConfigError as error:
        print(f"megolmo: error: {error}", file=sys.stderr)
        return 2
    if results is not None:
        print(table(results))
        print(f"results: {args.output.resolve()}")
    return 0
