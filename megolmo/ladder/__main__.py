"""``python -m megolmo.ladder plan|run|fit|predict``: plan a ladder against a target, train its runs through the
launchers (``run.py``), fit its two steps on their run directories, predict.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from megolmo.errors import MegolmoConfigError
from megolmo.ladder.fit import LadderFit, compare_holdout, fit_ladder
from megolmo.ladder.inputs import read_input
from megolmo.ladder.plan import BASE_MODEL, DEFAULT_TOKENIZER, EVALS_PER_RUN, MULTIPLIERS, PlannedRun, plan_custom, \
    plan_table
from megolmo.ladder.plots import write_plots
from megolmo.ladder.run import LAUNCHERS, Launcher, run_ladder
from megolmo.ladder.sizes import LADDER_SHAPES, TARGETS, ladder_params, ladder_shape, target_config
from megolmo.units import parse_count


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


def _shapes(text: str) -> dict:
    """``--shapes``: JSON, inline or in a file, of ``{name: {model field: value}}``."""
    try:
        shapes = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MegolmoConfigError(f"--shapes {text}: not JSON of {{name: {{model field: value}}}} ({e})") from None
    if not shapes or not all(isinstance(shape, dict) for shape in shapes.values()):
        raise MegolmoConfigError(f"--shapes {text}: expected {{name: {{model field: value}}, ...}}")
    return shapes


def planned_runs(args: argparse.Namespace) -> list[PlannedRun]:
    if args.shapes and args.sizes:
        raise MegolmoConfigError("--sizes and --shapes: give one (--shapes names its own sizes)")
    if args.base_model and not args.shapes:
        raise MegolmoConfigError(f"--base-model {args.base_model}: only with --shapes (the paper's sizes are over "
                                 f"{BASE_MODEL})")
    shapes = _shapes(args.shapes) if args.shapes else {size: ladder_shape(size) for size in args.sizes or LADDER_SHAPES}
    return plan_custom(shapes, args.multipliers, args.seq_len, args.base_model or BASE_MODEL, args.batch, args.lr,
                       not args.no_downstream, args.evals)


def cmd_plan(args: argparse.Namespace) -> None:
    target_n, name = _target(args)
    runs = planned_runs(args)
    if args.json:
        print(json.dumps([{"name": r.name, "n": r.n, "tokens": r.tokens, "flops": r.flops,
                           "overrides": r.overrides(args.tokenizer)} for r in runs], indent=1))
    else:
        print(plan_table(runs, target_n, parse_count(args.tokens), name))


def cmd_run(args: argparse.Namespace) -> int:
    procs = args.nproc_per_node or (1 if args.launcher == "local" else 8)
    launcher = Launcher(args.launcher, args.nodes, procs, tuple(shlex.split(args.launcher_args)))
    return run_ladder(planned_runs(args), args.root, launcher, [*args.override, *args.overrides], args.dry_run,
                      args.tokenizer)


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


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=lambda s: s.split(","), help=f"comma-separated (default: {','.join(LADDER_SHAPES)})")
    p.add_argument("--shapes", metavar="JSON",
                   help='other sizes instead, inline or in a file: {"NAME": {"hidden_size": 64, '
                        '"num_attention_heads": 4, "num_hidden_layers": 2, ...}, ...} over --base-model')
    p.add_argument("--base-model", help=f"conf/model/<NAME> under --shapes (default {BASE_MODEL})")
    p.add_argument("--multipliers", type=lambda s: [float(k) for k in s.split(",")],
                   help=f"k x Chinchilla, comma-separated (default: {','.join(f'{k:g}' for k in MULTIPLIERS)})")
    p.add_argument("--seq-len", type=int, default=4096, help="2048 or 4096 for OLMo's rules (default 4096)")
    p.add_argument("--batch", type=int, help="sequences per step, instead of OLMo's rule")
    p.add_argument("--lr", type=float, help="peak LR, instead of OLMo's rule")
    p.add_argument("--evals", type=int, default=EVALS_PER_RUN, help=f"in-loop evaluations per run (default "
                                                                     f"{EVALS_PER_RUN})")
    p.add_argument("--no-downstream", action="store_true",
                   help="no downstream tasks in the loop: held-out LM sets only (eval.lm.sets)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="eval.tokenizer of the runs")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m megolmo.ladder", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)

    p = commands.add_parser("plan", help="the ladder's runs, their settings and compute against the target's")
    _add_target(p)
    _add_plan_options(p)
    p.add_argument("--json", action="store_true", help="the runs with their megolmo.train overrides, as JSON")
    p.set_defaults(func=cmd_plan)

    p = commands.add_parser("run", help="train the plan's runs through a launcher, one run directory each; "
                                        "rerun to skip finished runs and resume the others",
                            epilog="overrides after -- (or --override) are megolmo.train's: data, layout, "
                                   "micro-batch; they win over the plan's")
    _add_plan_options(p)
    p.add_argument("--root", type=Path, required=True, metavar="DIR", help="run directories: DIR/<run name>")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: torchrun, one run after another; slurm: sbatch slurm/train.sbatch; beaker: "
                        "python -m megolmo.launch.beaker")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, help="training processes (GPUs) per node (default: 1 local, 8 else)")
    p.add_argument("--launcher-args", default="", metavar="\"ARGS\"",
                   help='one shell-quoted string, given as --launcher-args="...": options of sbatch (slurm) or '
                        "megolmo.launch.beaker (beaker: --cluster, --image, --mount, ... are required there)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="a megolmo.train override")
    p.add_argument("--dry-run", action="store_true", help="print each run's command (Beaker: its spec); run nothing")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="megolmo.train overrides, after --")
    p.set_defaults(func=cmd_run)

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
        return args.func(args) or 0
    except MegolmoConfigError as error:
        print(f"megolmo: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
