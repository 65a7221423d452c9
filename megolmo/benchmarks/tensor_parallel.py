"""Tensor-parallel communication: count the collectives of a real training step, compare them with
the analytic Megatron scheme, and time the step (``tools/bench_tp.py`` is the CLI).

Counting wraps the ``torch.distributed`` collectives (the module-level functions that
``megolmo.parallel.mappings``, ``megolmo.model.norm``, ``megolmo.parallel.cross_entropy``, the trainer and
the optimizer call) with functions that record the call and then run the real collective.

Analytic scheme, per micro-batch of ``b`` sequences of ``s`` tokens, hidden size ``h``, ``L`` layers,
TP size ``t > 1`` (activations in the compute dtype; statistics, losses and gradients in fp32):

* each block, forward: 2 all-reduces of ``b*s*h`` (after ``o_proj`` and ``down_proj``); with sequence
  parallelism instead 2 all-gathers and 2 reduce-scatters of ``b*s*h`` (entering and leaving each
  sublayer's TP region). Plus OLMo 2's QK-norm: 2 all-reduces of ``b*s`` fp32 (the sums of squares of
  q and of k across the heads of the group).
* each block, backward: the same again, mirrored (all-reduce <-> identity, all-gather <-> reduce-scatter),
  and the QK-norm statistics' 2 all-reduces of ``b*s``.
* embedding: forward all-reduce of ``b*s*h`` (SP: reduce-scatter; backward all-gather).
* LM head input: backward all-reduce of ``b*s*h`` (SP: forward all-gather, backward reduce-scatter).
* vocab-parallel loss: an all-reduce MAX of ``b*s`` and an all-reduce SUM of ``2*b*s`` (the sum of
  exponentials and the target logit, reduced together); fp32. Full logits are never gathered.

Without activation checkpointing (which re-runs each block's forward collectives during backward).
Per optimizer step: the global grad-norm all-reduce of one fp32 scalar, and with sequence parallelism the
sum of the TP-replicated norm weights' gradients: ``2L+1`` all-reduces of ``h`` fp32.

Bytes: "payload" is the full tensor a collective reduces or produces (all-gather: the gathered
tensor; reduce-scatter: the unscattered input). "Wire" bytes are what one rank sends under the ring
algorithm: all-reduce ``2(t-1)/t`` x payload, all-gather and reduce-scatter ``(t-1)/t`` x payload.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from megolmo.model.config import ModelConfig
from megolmo.parallel.collectives import all_reduce_values, barrier, world_group

# (kind, elements, bytes per element): the identity of a collective for counting.
Key = tuple[str, int, int]


@dataclass(frozen=True)
class Collective:
    kind: str           # all_reduce | all_reduce_max | all_gather | reduce_scatter | broadcast | <other name>
    numel: int          # payload elements (see module docstring)
    elem_bytes: int
    group_ranks: tuple[int, ...]
    label: str = ""

    @property
    def key(self) -> Key:
        return (self.kind, self.numel, self.elem_bytes)

    @property
    def payload_bytes(self) -> int:
        return self.numel * self.elem_bytes

    def wire_bytes(self) -> float:
        return wire_bytes(self.kind, self.payload_bytes, len(self.group_ranks))


def wire_bytes(kind: str, payload: float, group: int) -> float:
    """Bytes one rank sends for a collective of ``payload`` bytes under the ring algorithm."""
    if group <= 1:
        return 0.0
    factor = 2.0 if kind.startswith("all_reduce") else 1.0
    return factor * (group - 1) / group * payload


_WRAPPED = ("all_reduce", "all_gather", "reduce_scatter", "all_gather_into_tensor", "reduce_scatter_tensor",
            "broadcast", "all_to_all", "all_to_all_single", "all_gather_single", "reduce_scatter_single")


class CollectiveCounter:
    """Context manager: while active, every ``torch.distributed`` collective listed in ``_WRAPPED`` is
    recorded (with the current label) and then run for real."""

    def __init__(self) -> None:
        self.records: list[Collective] = []
        self._labels: list[str] = []
        self._saved: dict[str, object] = {}

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        self._labels.append(name)
        try:
            yield
        finally:
            self._labels.pop()

    def __enter__(self) -> "CollectiveCounter":
        for name in _WRAPPED:
            real = getattr(dist, name, None)
            if real is not None:
                self._saved[name] = real
                setattr(dist, name, self._wrap(name, real))
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._saved.items():
            setattr(dist, name, real)
        self._saved.clear()

    def _wrap(self, name: str, real):
        signature = inspect.signature(real)

        def counted(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self.records.append(self._describe(name, bound.arguments))
            return real(*args, **kwargs)

        counted.__wrapped__ = real
        return counted

    def _describe(self, name: str, a: dict) -> Collective:
        group = a.get("group")
        ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else \
            tuple(range(dist.get_world_size()))
        kind, tensors = name, []
        if name == "all_reduce":
            tensors = [a["tensor"]]
            if a.get("op") == dist.ReduceOp.MAX:
                kind = "all_reduce_max"
        elif name == "all_gather":
            tensors = list(a["tensor_list"])
        elif name in ("all_gather_into_tensor", "all_gather_single"):
            kind, tensors = "all_gather", [a.get("output_tensor", a.get("output"))]
        elif name == "reduce_scatter":
            kind, tensors = "reduce_scatter", list(a["input_list"])
        elif name in ("reduce_scatter_tensor", "reduce_scatter_single"):
            kind, tensors = "reduce_scatter", [a.get("input", a.get("input_tensor"))]
        elif name == "broadcast":
            tensors = [a["tensor"]]
        else:
            tensors = [t for t in a.values() if torch.is_tensor(t)]
        tensors = [t for t in tensors if torch.is_tensor(t)]
        numel = sum(t.numel() for t in tensors)
        elem = tensors[0].element_size() if tensors else 0
        return Collective(kind, numel, elem, ranks, "/".join(self._labels))

    # -- summaries ------------------------------------------------------------------------------
    def select(self, group_ranks: tuple[int, ...] | None = None, label: str | None = None) -> list[Collective]:
        return [r for r in self.records if (group_ranks is None or r.group_ranks == group_ranks)
                and (label is None or r.label == label or r.label.startswith(label + "/"))]


def tally(records: list[Collective]) -> Counter:
    return Counter(r.key for r in records)


def tally_bytes(tallied: Counter, group: int) -> tuple[int, float]:
    """(payload bytes, ring wire bytes per rank) of a tally."""
    payload = sum(n * e * c for (_, n, e), c in tallied.items())
    wire = sum(wire_bytes(k, n * e, group) * c for (k, n, e), c in tallied.items())
    return payload, wire


def analytic_block_collectives(cfg: ModelConfig, batch: int, seq_len: int, tp: int, sequence_parallel: bool,
                               act_bytes: int = 4) -> Counter:
    """One block's collectives in one forward pass; a backward pass has the same multiset (all-reduce
    <-> identity, all-gather <-> reduce-scatter, and the QK-norm statistics' gradients all-reduced)."""
    if tp == 1:
        return Counter()
    bsh, bs = batch * seq_len * cfg.hidden_size, batch * seq_len
    out = Counter({("all_reduce", bs, 4): 2})  # QK-norm: q's and k's sums of squares (their grads in backward)
    if sequence_parallel:
        out[("all_gather", bsh, act_bytes)] += 2
        out[("reduce_scatter", bsh, act_bytes)] += 2
    else:
        out[("all_reduce", bsh, act_bytes)] += 2
    return out


def analytic_step_collectives(cfg: ModelConfig, micro_batch: int, seq_len: int, micro_batches: int, tp: int,
                              sequence_parallel: bool, act_bytes: int = 4, num_layers: int | None = None
                              ) -> Counter:
    """All tensor-parallel collectives of one training step (forward + backward of every micro-batch,
    gradient synchronisation and clipping), as listed in the module docstring."""
    if tp == 1:
        return Counter()
    layers = cfg.num_hidden_layers if num_layers is None else num_layers
    bsh, bs, h = micro_batch * seq_len * cfg.hidden_size, micro_batch * seq_len, cfg.hidden_size
    per_micro = Counter()
    for key, count in analytic_block_collectives(cfg, micro_batch, seq_len, tp, sequence_parallel,
                                                 act_bytes).items():
        per_micro[key] += 2 * count * layers  # forward and backward
    if sequence_parallel:
        per_micro[("reduce_scatter", bsh, act_bytes)] += 2  # embedding forward, LM head input backward
        per_micro[("all_gather", bsh, act_bytes)] += 2      # LM head input forward, embedding backward
    else:
        per_micro[("all_reduce", bsh, act_bytes)] += 2      # embedding forward, LM head input backward
    per_micro[("all_reduce_max", bs, 4)] += 1               # loss: max logit
    per_micro[("all_reduce", 2 * bs, 4)] += 1               # loss: sum of exponentials and target logit
    step = Counter({key: count * micro_batches for key, count in per_micro.items()})
    step[("all_reduce", 1, 4)] += 1                         # global grad norm
    if sequence_parallel:
        step[("all_reduce", h, 4)] += 2 * layers + 1        # norm-weight gradients summed over TP
    return step


def describe_tally(tallied: Counter) -> list[str]:
    return [f"{count} x {kind}({numel} x {elem} B)" for (kind, numel, elem), count in sorted(tallied.items())]


# -- the benchmark ------------------------------------------------------------------------------------
def bench_model_config(vocab_size: int = 10_000) -> ModelConfig:
    """A GQA model whose vocabulary is not a multiple of 128 x TP, about 8M parameters."""
    return ModelConfig(name="bench_tp", vocab_size=vocab_size, hidden_size=256, intermediate_size=768,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                       eos_token_id=0, pad_token_id=None).validate()


@dataclass
class TPBenchSettings:
    model: ModelConfig = field(default_factory=bench_model_config)
    tp_sizes: tuple[int, ...] = (1, 2, 4)
    sequence_parallel: tuple[bool, ...] = (False, True)
    seq_len: int = 256
    micro_batch: int = 4
    global_batch: int = 4
    steps: int = 5
    warmup: int = 1
    threads: int = 1
    precision: str = "fp32"
    seed: int = 1234
    timeout_s: float = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_tokens(path: Path, n_tokens: int, vocab: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rng.integers(1, vocab, n_tokens, dtype=np.uint32).astype(np.uint32).tofile(path)


def trainer_overrides(s: TPBenchSettings, tp: int, sp: bool, tokens: Path, run_dir: Path) -> list[str]:
    m = s.model
    model = [f"model.{k}={v}" for k, v in m.to_dict().items()
             if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads")]
    return [*model, f"model.name={m.name}", f"data.paths=[{tokens}]", "data.dtype=uint32",
            f"data.seq_len={s.seq_len}", f"trainer.global_batch_size={s.global_batch}",
            f"trainer.micro_batch_size={s.micro_batch}", f"trainer.max_steps={s.warmup + s.steps}",
            "optim.warmup_steps=1", f"trainer.seed={s.seed}", f"trainer.run_dir={run_dir}",
            f"precision={s.precision}", f"parallel.tensor={tp}", f"parallel.sequence_parallel={str(sp).lower()}",
            f"parallel.timeout_s={s.timeout_s}"]


def _rank_main(rank: int, world: int, port: int, settings: TPBenchSettings, sp: bool, workdir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=str(settings.threads))
    torch.set_num_threads(settings.threads)
    from megolmo.config import load_config
    from megolmo.parallel.state import shutdown
    from megolmo.trainer import Trainer

    work = Path(workdir)
    trainer = Trainer(load_config(trainer_overrides(settings, world, sp, work / "tokens.npy", work / f"run{world}")))
    tp_ranks = tuple(range(world))
    times, losses = [], []
    counted: list[Collective] = []
    for step in range(settings.warmup + settings.steps):
        barrier(world_group())
        counter = CollectiveCounter()
        started = time.perf_counter()
        if step == 0:  # count on the first (warm-up) step, time the others without the wrapper
            with counter:
                record = trainer.train_step(step)
            counted = counter.select(tp_ranks)
        else:
            record = trainer.train_step(step)
        elapsed = all_reduce_values([time.perf_counter() - started], "max", world_group())[0]
        losses.append(record.loss)
        if step >= settings.warmup:
            times.append(elapsed)
    if rank == 0:
        result = {"tp": world, "sequence_parallel": sp, "step_s": statistics.median(times), "times_s": times,
                  "losses": losses, "measured": [[*k, c] for k, c in tally(counted).items()],
                  "calls": len(counted)}
        (work / f"result_{world}_{int(sp)}.json").write_text(json.dumps(result))
    shutdown()


def run_layout(settings: TPBenchSettings, tp: int, sp: bool, workdir: Path) -> dict:
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(tp, _free_port(), settings, sp, str(workdir)), nprocs=tp,
                       start_method="spawn", join=True)
    result = json.loads((workdir / f"result_{tp}_{int(sp)}.json").read_text())
    measured = Counter({(k, n, e): c for k, n, e, c in result["measured"]})
    act_bytes = 2 if settings.precision == "bf16" else 4
    analytic = analytic_step_collectives(settings.model, settings.micro_batch, settings.seq_len,
                                         settings.global_batch // settings.micro_batch, tp, sp, act_bytes)
    m_payload, m_wire = tally_bytes(measured, tp)
    a_payload, a_wire = tally_bytes(analytic, tp)
    result.update(
        measured_payload_bytes=m_payload, analytic_payload_bytes=a_payload,
        measured_wire_bytes=m_wire, analytic_wire_bytes=a_wire,
        analytic_calls=sum(analytic.values()), same_collectives=measured == analytic,
        payload_ratio=(m_payload / a_payload) if a_payload else None,
        wire_ratio=(m_wire / a_wire) if a_wire else None,
        measured_detail=describe_tally(measured), analytic_detail=describe_tally(analytic))
    return result


def run_benchmark(settings: TPBenchSettings, log=lambda _: None) -> dict:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_tp_") as tmp:
        work = Path(tmp)
        n_tokens = (settings.warmup + settings.steps) * settings.global_batch * settings.seq_len * 2 + 1024
        _write_tokens(work / "tokens.npy", n_tokens, settings.model.vocab_size, settings.seed)
        for tp in settings.tp_sizes:
            for sp in (settings.sequence_parallel if tp > 1 else (False,)):
                log(f"running TP={tp} SP={'on' if sp else 'off'} ...")
                results.append(run_layout(settings, tp, sp, work))
    settings_dict = asdict(settings)
    settings_dict["model"] = settings.model.to_dict()
    return {"settings": settings_dict, "results": results}


def format_table(report: dict) -> str:
    s = report["settings"]
    m = s["model"]
    head = (f"model: L={m['num_hidden_layers']} h={m['hidden_size']} ffn={m['intermediate_size']} "
            f"heads={m['num_attention_heads']}/{m['num_key_value_heads']} vocab={m['vocab_size']}; "
            f"micro-batch {s['micro_batch']} x seq {s['seq_len']}, global batch {s['global_batch']}, "
            f"{s['precision']}, {s['threads']} thread(s) per rank; median of {s['steps']} steps")
    rows = [("TP", "SP", "step s", "vs TP1", "calls", "payload MB", "analytic MB", "ratio",
             "wire MB/rank", "analytic MB", "ratio", "loss step1")]
    base = next((r["step_s"] for r in report["results"] if r["tp"] == 1), None)

    def mb(x):
        return f"{x / 1e6:.3f}"

    def ratio(x):
        return "-" if x is None else f"{x:.2f}"

    for r in report["results"]:
        rows.append((str(r["tp"]), "on" if r["sequence_parallel"] else "off", f"{r['step_s']:.3f}",
                     f"{r['step_s'] / base:.2f}" if base else "-", f"{r['calls']}/{r['analytic_calls']}",
                     mb(r["measured_payload_bytes"]), mb(r["analytic_payload_bytes"]), ratio(r["payload_ratio"]),
                     mb(r["measured_wire_bytes"]), mb(r["analytic_wire_bytes"]), ratio(r["wire_ratio"]),
                     f"{r['losses'][0]:.6f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [head] + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", default="1,2,4", help="comma-separated TP sizes (one process per TP rank)")
    p.add_argument("--sp", default="off,on", help="sequence parallelism for TP>1: off, on or off,on")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=None, help="default: one micro-batch")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=10_000)
    p.add_argument("--json", default=None, help="also write the full report here")
    a = p.parse_args(argv)
    model = ModelConfig(name="bench_tp", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                        eos_token_id=0, pad_token_id=None).validate()
    sp = tuple({"off": False, "on": True}[x] for x in a.sp.split(","))
    settings = TPBenchSettings(model=model, tp_sizes=tuple(int(x) for x in a.tp.split(",")), sequence_parallel=sp,
                               seq_len=a.seq_len, micro_batch=a.micro_batch,
                               global_batch=a.global_batch or a.micro_batch, steps=a.steps, warmup=a.warmup,
                               threads=a.threads, precision=a.precision)
    report = run_benchmark(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(report))
    bad = [r for r in report["results"] if r["tp"] > 1 and not r["same_collectives"]]
    for r in bad:
        print(f"TP={r['tp']} SP={r['sequence_parallel']}: collectives differ from the analytic scheme\n"
              f"  measured: {r['measured_detail']}\n  analytic: {r['analytic_detail']}", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if bad else 0
