"""Restart benchmark: the seconds one rank spends building its share of a pipeline stage before its first
step, fresh (weights drawn) and resumed (weights left for the checkpoint), with the current code and with
the code before (every start drew every global tensor with ``nn.init.trunc_normal_``, then sliced it).
``tools/bench_restart.py`` is the CLI.

Default: OLMo 2 7B, stage 0 of TP2 x PP4 (the embedding and layers 0-7) as TP rank 0 holds it, in fp32.
The stage is built in one process by ``build_chunk``, the trainer's own builder, with the TP rank
simulated (``SimulatedRank``: that rank's shapes and values, no process group). Not timed: the process
group, the flat buffers and optimizer state, the checkpoint load itself (``tools/bench_checkpoint.py``)
and the step; the interpreter's start and the imports are timed in a child process.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from megolmo.benchmarks.launch import ROOT
from megolmo.kernels.select import Fp8Settings, choose_kernels
from megolmo.model.config import ModelConfig
from megolmo.model.init import parameter_seed
from megolmo.model.olmo2 import Olmo2ForCausalLM
from megolmo.parallel.layers import ShardSpec, TensorParallel
from megolmo.pipeline.layout import chunk_layer_ranges
from megolmo.step.chunks import ChunkSettings, build_chunk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED = 0


@dataclass(frozen=True)
class SimulatedRank(TensorParallel):
    """TP rank ``index`` of ``world`` without a process group: enough to build that rank's parameters."""

    world: int = 1
    index: int = 0

    @property
    def size(self) -> int:
        return self.world

    @property
    def rank(self) -> int:
        return self.index


@torch.no_grad()
def previous_initialize_parameters(model: nn.Module, seed: int, std: float) -> None:
    """The initialisation before this benchmark's change, kept as its baseline: torch's ``trunc_normal_`` on
    every global tensor, the whole tensor padded, then this rank's slice copied."""
    for name, param in model.named_parameters():
        spec: ShardSpec = param.shard_spec
        value = torch.ones(spec.global_shape) if len(spec.global_shape) == 1 else nn.init.trunc_normal_(
            torch.empty(spec.global_shape), mean=0.0, std=std, a=-3 * std, b=3 * std,
            generator=torch.Generator().manual_seed(parameter_seed(seed, name)))
        if spec.dim is not None:
            if spec.padded_size and spec.padded_size > value.shape[spec.dim]:
                pad_shape = list(value.shape)
                pad_shape[spec.dim] = spec.padded_size - value.shape[spec.dim]
                value = torch.cat([value, value.new_zeros(pad_shape)], dim=spec.dim)
            rows = spec.local_slice()
            value = value.narrow(spec.dim, rows.start, rows.stop - rows.start)
        param.copy_(value)


def stage_settings(model: ModelConfig, pipeline: int, precision: str, draw: bool) -> ChunkSettings:
    kernels = choose_kernels(model.backend, precision, torch.device("cpu"))
    return ChunkSettings(model, DTYPES[precision], kernels, Fp8Settings(), SEED,
                         tuple(chunk_layer_ranges(model.num_hidden_layers, pipeline)), draw_initial_weights=draw)


def build(settings: ChunkSettings, tp: TensorParallel, stage: int, before: bool) -> Olmo2ForCausalLM:
    """The stage as the trainer builds it now, or (``before``) as it did before: drawn on every start."""
    if not before:
        return build_chunk(settings, tp, stage)
    chunk = build_chunk(replace(settings, draw_initial_weights=False), tp, stage)
    previous_initialize_parameters(chunk, settings.seed, settings.model.initializer_range)
    return chunk


def digest(model: nn.Module) -> str:
    """One hash of every parameter's bytes: equal digests mean bit-identical weights."""
    h = hashlib.blake2b()
    for param in model.parameters():
        h.update(param.detach().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def timed_build(settings: ChunkSettings, tp: TensorParallel, stage: int, before: bool) -> tuple[float, str | None]:
    """Seconds to build, and the weights' digest when they were drawn."""
    gc.collect()
    started = time.perf_counter()
    chunk = build(settings, tp, stage, before)
    seconds = time.perf_counter() - started
    return seconds, digest(chunk) if settings.draw_initial_weights else None


def import_seconds() -> float:
    """A fresh interpreter's start and the trainer's imports: the part of a restart before any model code."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import megolmo.trainer"], cwd=ROOT, check=True)
    return time.perf_counter() - started


def describe(model: ModelConfig, args: argparse.Namespace, chunk: Olmo2ForCausalLM) -> str:
    layers = chunk_layer_ranges(model.num_hidden_layers, args.pipeline)[args.stage]
    local = sum(p.numel() for p in chunk.parameters())
    drawn = sum(torch.Size(p.shard_spec.global_shape).numel() for p in chunk.parameters())
    parts = ["the embedding"] * (args.stage == 0) + [f"layers {layers.start}-{layers.stop - 1}"] + \
        ["the final norm and the head"] * (args.stage == args.pipeline - 1)
    return (f"{model.name}, stage {args.stage} of TP{args.tensor} x PP{args.pipeline} ({', '.join(parts)}) as TP rank "
            f"{args.tp_rank} holds it: {local / 1e9:.2f}e9 parameters on the rank, {drawn / 1e9:.2f}e9 drawn per "
            f"fresh start (global tensors), {args.precision}, {torch.get_num_threads()} thread(s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="olmo2_7b", help="a conf/model name")
    parser.add_argument("--tensor", type=int, default=2)
    parser.add_argument("--pipeline", type=int, default=4)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--tp-rank", type=int, default=0)
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    model = ModelConfig.named(args.model)
    tp = SimulatedRank(world=args.tensor, index=args.tp_rank)
    fresh, resumed = (stage_settings(model, args.pipeline, args.precision, draw) for draw in (True, False))
    print(describe(model, args, build(resumed, tp, args.stage, before=False)))
    seconds, digests = {}, {}
    for name, settings, before in [("before, fresh", fresh, True), ("after, fresh", fresh, False),
                                   ("after, resumed", resumed, False)]:
        seconds[name], digests[name] = timed_build(settings, tp, args.stage, before)
        print(f"  {name:16} {seconds[name]:8.2f} s", flush=True)
    same = digests["before, fresh"] == digests["after, fresh"]
    print(f"  before, resumed: as before, fresh (it drew the weights, then loaded the checkpoint)\n"
          f"  fresh start: {seconds['before, fresh'] / seconds['after, fresh']:.1f}x faster, weights "
          f"{'bit-identical to' if same else 'DIFFERENT from'} before\n"
          f"  restart: {seconds['before, fresh']:.2f} s -> {seconds['after, resumed']:.2f} s (its pages are "
          "touched later, by the copy into the flat buffers, as before)\n"
          f"  interpreter start and imports (python -c 'import megolmo.trainer'): {import_seconds():.2f} s")
    if not same:
        raise SystemExit("the fresh weights differ from the previous initialisation")


if __name__ == "__main__":
    main()
