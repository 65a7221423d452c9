"""``python -m megolmo.ladder plan|fit|predict``: plan a ladder against a target, fit its two steps, predict.

``run`` (training every planned run through the launchers, skipping finished ones) is not there yet: it is to
take ``plan.plan(...)``'s runs and their ``PlannedRun.overrides()``, and give ``fit`` their run directories.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megolmo.errors import MegolmoConfigError
from megolmo.ladder.fit import LadderFit, compare_holdout, fit_ladder
from megolmo.ladder.inputs import read_input
from megolmo.ladder.plan import DEFAULT_TOKENIZER, MULTIPLIERS, SEQ_LENS, plan, plan_table
from megolmo.ladder.plots import write_plots
from megolmo.ladder.sizes import LADDER_SHAPES, TARGETS, ladder_params, parse_count, target_config


def _target(args: argparse.Namespace) -> tuple[int, str]:
    """N and a name for the target: ``--n`` or a named OLMo 2 model (its N counted like the ladder's)."""
    if args.n is not None:
        return parse_count(args.n), f"N={args.n}"
    return ladder_params(target_config(args.target)), args.target


def _add_target(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", help=f"a named OLMo 2 model: {', '.join(TARGETS)}")
    which.add_argument("--n", help="the target's parameter count N (ladder counting: LM head excluded)")
    parser.add_argument("--tokens", required=True, help="the target's training tokens D: 4T, 100B or an integer")


def cmd_plan(args: argparse.Namespace) -> None:
    target_n, name = _target(args)
    runs = plan(args.sizes, args.multipliers, args.seq_len)
    if args.json:
        print(json.dumps([{"name": r.name, "n": r.n, "tokens": r.tokens, "flops": r.flops,
                           "overrides": r.overrides(args.tokenizer)} for r in runs], indent=1))
    else:
        print(plan_table(runs, target_n, parse_count(args.tokens), name))


def cmd_fit(args: argparse.Namespace) -> None:
    runs = [read_input(path) for path in args.inputs]
    fit = fit_ladder(runs, draws=args.bootstrap, seed=args.seed)
    result = fit.to_dict()
    holdout = read_input(args.holdout) if args.holdout else None
    comparison = compare_holdout(fit, holdout) if holdout else None
    if comparison:
        result["holdout"] = {"name": holdout.name, "n": holdout.n, "tokens": holdout.final_tokens,
                             "tasks": comparison}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"fit of {len(runs)} runs, {len(fit.tasks)} tasks: {args.output}")
    if args.plots:
        for path in write_plots(fit, runs, args.plots, holdout, comparison):
            print(path)


def cmd_predict(args: argparse.Namespace) -> None:
    try:
        data = json.loads(args.fit.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MegolmoConfigError(f"{args.fit}: cannot read a fit ({e})") from None
    n, name = _target(args)
    predictions = LadderFit.from_dict(data, str(args.fit)).predict(n, parse_count(args.tokens))
    if args.json:
        print(json.dumps(predictions, indent=1))
        return
    print(f"prediction for {name} (N={n:,}), {args.tokens} tokens; +- one bootstrap std, [95% interval]")
    for task, p in predictions.items():
        line = f"{task:<16} task loss {p['task_loss']:.4f} +- {p['task_loss_std']:.4f}"
        if p["accuracy"] is not None:
            low, high = p["accuracy_ci95"]
            line += f"   accuracy {p['accuracy']:.4f} +- {p['accuracy_std']:.4f} [{low:.4f}, {high:.4f}]"
        print(line)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m megolmo.ladder", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)

    p = commands.add_parser("plan", help="the ladder's runs, their settings and compute against the target's")
    _add_target(p)
    p.add_argument("--sizes", type=lambda s: s.split(","), help=f"comma-separated (default: {','.join(LADDER_SHAPES)})")
    p.add_argument("--multipliers", type=lambda s: [float(k) for k in s.split(",")],
                   help=f"k x Chinchilla, comma-separated (default: {','.join(f'{k:g}' for k in MULTIPLIERS)})")
    p.add_argument("--seq-len", type=int, default=4096, choices=SEQ_LENS)
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="eval.tokenizer of the runs (--json)")
    p.add_argument("--json", action="store_true", help="the runs with their megolmo.train overrides, as JSON")
    p.set_defaults(func=cmd_plan)

    p = commands.add_parser("fit", help="fit both steps on ladder runs (run directories or OLMo .csv exports)")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    p.add_argument("--output", type=Path, required=True, metavar="FIT.json")
    p.add_argument("--plots", type=Path, metavar="DIR", help="write step1.png, step2.png (and predicted_vs_actual.png)")
    p.add_argument("--holdout", type=Path, metavar="INPUT",
                   help="a run kept out of the fit, compared with its prediction")
    p.add_argument("--bootstrap", type=int, default=100, help="resamples of the runs for the uncertainty")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_fit)

    p = commands.add_parser("predict", help="task loss and accuracy of a target from a fit")
    p.add_argument("fit", type=Path, metavar="FIT.json")
    _add_target(p)
    p.add_argument("--json", action="store_true", help='print {task: {"task_loss": ..., "accuracy": ..., ...}}')
    p.set_defaults(func=cmd_predict)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except MegolmoConfigError as error:
        print(f"megolmo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
