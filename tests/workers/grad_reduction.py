"""Counts the data-parallel gradient reductions of one training step, through a wrapper around the
collectives ``megolmo.optim.grad_sync`` calls, and records the bucket events.

``torchrun ... tests/workers/grad_reduction.py PROBES.json``, PROBES.json a list of ``[OUT.json, overrides]``
run one after another in the launch; rank 0 writes each OUT.json.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from megolmo.optim import grad_sync
from megolmo.parallel.state import shutdown
from megolmo.trainer import Trainer
from megolmo.config import load_config

counted: list[tuple[str, int]] = []


def _counting(name: str, real):
    def wrapper(tensor_or_out, *args, **kwargs):
        nbytes = sum(t.numel() * t.element_size() for t in args[0]) if name == "reduce_scatter" else \
            tensor_or_out.numel() * tensor_or_out.element_size()
        counted.append((name, nbytes))
        return real(tensor_or_out, *args, **kwargs)
    return wrapper


grad_sync.all_reduce = _counting("all_reduce", grad_sync.all_reduce)
grad_sync.reduce_scatter = _counting("reduce_scatter", grad_sync.reduce_scatter)

def probe(out_path: str, overrides: list[str]) -> None:
    counted.clear()
    trainer = Trainer(load_config(overrides))
    trainer.fit()
    if trainer.ps.is_main:
        events, buffers = trainer.step_fn.grad_sync.events, trainer.step_fn.buffers
        json.dump({"reductions": counted[-len(buffers.buckets):] if counted else [],
                   "total_calls": len(counted), "steps": trainer.cfg.trainer.max_steps,
                   "grad_buffer_bytes": buffers.grad_bytes, "buckets": len(buffers.buckets),
                   "micro_batches": trainer.loader.num_micro_batches,
                   "events": [(kind, bucket) for kind, bucket, _ in events]}, open(out_path, "w"))
    del trainer
    gc.collect()  # free the process groups (held in reference cycles through gradient hooks)


if __name__ == "__main__":
    for out, probe_overrides in json.loads(Path(sys.argv[1]).read_text()):
        probe(out, probe_overrides)
    shutdown()  # join gloo's threads before the interpreter exits
