"""Model soups: the weighted average of several checkpoints of one architecture, as OLMo 2's stage-2
ingredients are averaged.

    python tools/soup.py --output OUT [--format megolmo|hf] [--weights W1 W2 ...] IN1 IN2 ...
        [--tokenizer FILE|DIR] [--chat-template olmo2]     # these two with --format hf

Inputs may be megolmo checkpoints (checkpoint, ``checkpoints/`` or run directories) or Hugging Face
directories, mixed freely. The soup is itself a ``TensorSource``: each output tensor is accumulated in
fp32 from one input tensor at a time, so memory holds about two tensors whatever the model or the
number of inputs.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from megolmo.checkpoint.hf import DTYPES, open_checkpoint, write_hf
from megolmo.checkpoint.hf_tokenizer import add_tokenizer_arguments
from megolmo.checkpoint.reader import TensorSource
from megolmo.checkpoint.writer import write_megolmo
from megolmo.errors import MegolmoConfigError

# Fields that change what the weights compute; shapes alone miss e.g. the head count or rope_theta.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "rope_theta", "rms_norm_eps")


def normalise_weights(weights: list[float] | None, count: int) -> list[float]:
    if count < 2:
        raise MegolmoConfigError(f"a soup needs at least two input checkpoints (got {count})")
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise MegolmoConfigError(f"--weights: {len(weights)} weights for {count} input checkpoints")
    for w in weights:
        if not math.isfinite(w) or w < 0:
            raise MegolmoConfigError(f"--weights: {w} is not allowed (weights must be finite and >= 0)")
    total = sum(weights)
    if total <= 0:
        raise MegolmoConfigError(f"--weights {' '.join(map(str, weights))}: the weights sum to zero")
    return [w / total for w in weights]


def check_same_architecture(sources: list[TensorSource]) -> None:
    """Refuse a soup of different models, naming the first tensor (or config field) that differs."""
    first = sources[0]
    for other in sources[1:]:
        for name, shape in first.shapes.items():
            if name not in other.shapes:
                raise MegolmoConfigError(f"cannot soup {first.path} and {other.path}: tensor {name} (shape "
                                         f"{list(shape)} in {first.path}) is missing from {other.path}")
            if other.shapes[name] != shape:
                raise MegolmoConfigError(f"cannot soup {first.path} and {other.path}: tensor {name} has shape "
                                         f"{list(shape)} in {first.path} but {list(other.shapes[name])} in "
                                         f"{other.path}")
        for name, shape in other.shapes.items():
            if name not in first.shapes:
                raise MegolmoConfigError(f"cannot soup {first.path} and {other.path}: tensor {name} (shape "
                                         f"{list(shape)} in {other.path}) is missing from {first.path}")
        for field in ARCHITECTURE_FIELDS:
            a, b = getattr(first.config, field), getattr(other.config, field)
            if a != b:
                raise MegolmoConfigError(f"cannot soup {first.path} and {other.path}: model {field} is {a} in "
                                         f"{first.path} but {b} in {other.path}")


class Soup(TensorSource):
    kind = "soup"

    def __init__(self, sources: list[TensorSource], weights: list[float]):
        check_same_architecture(sources)
        self.sources, self.weights = sources, weights
        self.path = Path("soup")
        self.config = sources[0].config
        self.shapes = dict(sources[0].shapes)

    def read(self, name: str) -> torch.Tensor:
        total: torch.Tensor | None = None
        for source, weight in zip(self.sources, self.weights):
            if weight == 0:
                continue
            tensor = source.read(name)  # fresh fp32, ours to modify
            if total is None:
                total = tensor.mul_(weight)
            else:
                total.add_(tensor, alpha=weight)
            del tensor
        assert total is not None  # weights sum to 1
        return total


def soup(inputs: list[Path], output: Path, weights: list[float] | None = None, fmt: str = "megolmo",
         dtype: str = "fp32", max_shard_size: str = "5GB", tokenizer: Path | None = None,
         chat_template: str | None = None) -> Soup:
    if fmt not in ("megolmo", "hf"):
        raise MegolmoConfigError(f"--format {fmt}: expected megolmo or hf")
    if fmt != "hf" and (tokenizer is not None or chat_template is not None):
        option = "--tokenizer" if tokenizer is not None else "--chat-template"
        raise MegolmoConfigError(f"{option}: only for --format hf (a megolmo checkpoint holds no tokenizer)")
    if dtype not in DTYPES:
        raise MegolmoConfigError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    normalised = normalise_weights(weights, len(inputs))
    sources = [open_checkpoint(Path(path)) for path in inputs]
    mixed = Soup(sources, normalised)
    if fmt == "megolmo":
        provenance = {"souped_from": [{"path": str(Path(s.path).resolve()), "format": s.kind, "weight": w}
                                      for s, w in zip(sources, normalised)]}
        write_megolmo(mixed, Path(output), provenance)
    else:
        write_hf(mixed, Path(output), DTYPES[dtype], max_shard_size, tokenizer, chat_template)
    return mixed


def split_weights(argv: list[str]) -> tuple[list[str], list[float] | None]:
    """Take ``--weights W1 W2 ...`` out of argv: the numbers after it, up to the first non-number, are
    weights (argparse alone would swallow the input paths that follow them)."""
    rest, weights, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--weights" or arg.startswith("--weights="):
            values = arg.split("=", 1)[1].replace(",", " ").split() if "=" in arg else []
            i += 1
            while "=" not in arg and i < len(argv) and _is_number(argv[i]):
                values.append(argv[i])
                i += 1
            if not values:
                raise MegolmoConfigError("--weights: expected one number per input checkpoint")
            weights = (weights or []) + [float(v) for v in values]
            continue
        rest.append(arg)
        i += 1
    return rest, weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    try:
        argv, weights = split_weights(list(sys.argv[1:] if argv is None else argv))
    except (MegolmoConfigError, ValueError) as error:
        print(f"megolmo: error: {error}", file=sys.stderr, flush=True)
        return 2
    parser = argparse.ArgumentParser(prog="soup.py", description="Average checkpoints of one architecture "
                                     "(megolmo or Hugging Face, mixed), streaming one tensor at a time.")
    parser.add_argument("inputs", nargs="+", type=Path, help="checkpoints to average (two or more)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--format", choices=("megolmo", "hf"), default="megolmo",
                        help="output format (hf: with generation_config.json, and --tokenizer's files)")
    parser.add_argument("--weights", metavar="W", nargs="+", type=float, default=None,
                        help="one weight per input, normalised to sum to 1 (default: uniform)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="HF output dtype (default fp32)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest HF safetensors shard (default 5GB)")
    add_tokenizer_arguments(parser)  # --format hf only
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        mixed = soup(args.inputs, args.output, weights, args.format, args.dtype, args.max_shard_size, args.tokenizer,
                     args.chat_template)
    except MegolmoConfigError as error:
        print(f"megolmo: error: {error}", file=sys.stderr, flush=True)
        return 2
    weights = ", ".join(f"{w:.4g}" for w in mixed.weights)
    print(f"wrote {args.format} soup {args.output} of {len(args.inputs)} checkpoints (weights {weights}) in "
          f"{time.perf_counter() - started:.1f}s")
    return 0
