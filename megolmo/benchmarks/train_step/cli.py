"""Single-process training-step throughput: megolmo vs transformers' ``Olmo2ForCausalLM`` vs OLMo-core.

The command line behind ``tools/bench_train.py``: flags to ``BenchSettings``, the table to stdout,
progress to stderr, the result dict to ``--json``. Exit 0 with rows, 1 with nothing timed, 2 on bad flags."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from megolmo.benchmarks.train_step.benchmark import run_benchmark
from megolmo.benchmarks.train_step.peers import BUILDERS
from megolmo.benchmarks.train_step.report import format_table
from megolmo.benchmarks.train_step.settings import PEERS, PRECISIONS, BenchSettings, resolve_model
from megolmo.kernels.select import FP8_RECIPES

CHECKPOINTING = {"off": False, "on": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; the description is this module's first line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="bench", help="a named config (conf/model/*.yaml) or 'bench'")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per peer and group")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp8 (fp8: megolmo only, "
                   "on a GPU with FP8 tensor cores)")
    p.add_argument("--activation-checkpointing", default="off", help="comma-separated: off, on (each one a group)")
    p.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="delayed", help="megolmo's FP8 scaling recipe")
    p.add_argument("--compile", action="store_true", help="torch.compile every peer's transformer blocks")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of the default")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None: all usable cores")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: CUDA-event timing, memory, MFU")
    p.add_argument("--seed", type=int, default=1234, help="weights and batch")
    p.add_argument("--mm-size", type=int, default=None, help="n of the n^3 reference torch.mm; "
                   "None: 4096 on CPU, 8192 on CUDA")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    return p.parse_args(argv)


def _split(text: str) -> tuple[str, ...]:
    """A comma-separated flag's values, blanks dropped."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag, given, known in (("--peers", _split(args.peers), BUILDERS),
                               ("--precisions", _split(args.precisions), PRECISIONS),
                               ("--activation-checkpointing", _split(args.activation_checkpointing), CHECKPOINTING)):
        unknown = [x for x in given if x not in known]
        if unknown or not given:
            print(f"bench_train: {flag}: unknown or empty {unknown or given} (choices: {', '.join(known)})",
                  file=sys.stderr)
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train: --device cuda: no CUDA device is visible to this torch "
              f"({torch.__version__})", file=sys.stderr)
        return 2
    settings = BenchSettings(model=resolve_model(args.model), seq_len=args.seq_len, batch=args.batch,
                             steps=args.steps, warmup=args.warmup, precisions=_split(args.precisions),
                             checkpointing=tuple(CHECKPOINTING[x] for x in _split(args.activation_checkpointing)),
                             fp8_recipe=args.fp8_recipe, compile=args.compile, peers=_split(args.peers),
                             threads=args.threads, device=args.device, seed=args.seed, mm_size=args.mm_size)
    result = run_benchmark(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["results"] else 1
