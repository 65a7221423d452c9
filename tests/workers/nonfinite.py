"""Training jobs with NaNs written into chosen ranks' gradients, between the reductions and the optimizer.

``torchrun ... tests/workers/nonfinite.py PLAN.json``: the plan lists jobs run one after the other in the same
processes; each names its overrides, its poisoned steps, the parameters poisoned per global rank and the steps
whose optimizer state is kept. In-process jobs save, per rank, ``<run_dir>/state.rank<R>.pt`` (those states,
and the skip-step guard's history); an ``entry_point`` job (the last) runs ``python -m megolmo.train`` as is
and writes the line each rank reports as its failure to ``<run_dir>/failure.rank<R>.txt``.
``inject`` is also used in-process by ``tests/test_nonfinite.py``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from megolmo import train
from megolmo.config import load_config
from megolmo.optim.adamw import DistributedAdamW
from megolmo.trainer import Trainer

CURRENT = {"step": 0}  # the 1-based step being run


def inject(steps: set[int], params: list[str]) -> None:
    """From now on, this process writes NaN into ``params``' gradients at ``steps``: into the part its optimizer
    reads (its ZeRO shard), just before the gradient norm."""
    real_norm, real_train_step = DistributedAdamW.grad_norm, Trainer.train_step

    def grad_norm(self: DistributedAdamW) -> torch.Tensor:
        if CURRENT["step"] in steps:
            slots = {slot.name: slot for slot in self.buffers.slots}
            for name in params:
                hit = [(max(s, slots[name].start), min(e, slots[name].end)) for s, e in self.shards]
                hit = [(lo, hi) for lo, hi in hit if lo < hi]
                assert hit, f"{name} lies outside this rank's optimizer shard"
                for lo, hi in hit:
                    self.buffers.grads[lo:hi] = float("nan")
        return real_norm(self)

    def train_step(self: Trainer, step: int):
        CURRENT["step"] = step + 1
        return real_train_step(self, step)

    DistributedAdamW.grad_norm, Trainer.train_step = grad_norm, train_step


def keep_states(trainer: Trainer, steps: set[int]) -> dict[int, dict]:
    """After each of ``steps``: copies of this rank's optimizer state, weights and schedule position."""
    kept: dict[int, dict] = {}
    real = trainer.train_step

    def train_step(step: int):
        record = real(step)
        if step + 1 in steps:
            o = trainer.optimizer
            kept[step + 1] = {"master": [t.clone() for t in o.master], "exp_avg": [t.clone() for t in o.exp_avg],
                              "exp_avg_sq": [t.clone() for t in o.exp_avg_sq], "params": o.buffers.params.clone(),
                              "step_count": o.step_count, "schedule_step": trainer.schedule_step}
        return record

    trainer.train_step = train_step
    return kept


def run_job(job: dict, rank: int) -> None:
    inject(set(job["nan_steps"]), job["nan_params"].get(str(rank), []))
    run_dir = Path(next(o.split("=", 1)[1] for o in job["overrides"] if o.startswith("trainer.run_dir=")))
    if job.get("entry_point"):
        real_report = train.report_failure

        def report_failure(line: str, caused_by_peer: bool = False) -> None:
            (run_dir / f"failure.rank{rank}.txt").write_text(line)
            real_report(line, caused_by_peer)

        train.report_failure = report_failure
        train.main(job["overrides"])
        return
    trainer = Trainer(load_config(job["overrides"]))
    kept = keep_states(trainer, set(job["keep_steps"]))
    trainer.fit()
    guard = trainer.step_fn.skip_guard
    torch.save({"steps": kept, "skip_step": guard.state_dict() if guard is not None else None},
               run_dir / f"state.rank{rank}.pt")


if __name__ == "__main__":
    real_norm, real_train_step = DistributedAdamW.grad_norm, Trainer.train_step
    for planned in json.loads(Path(sys.argv[1]).read_text())["jobs"]:
        DistributedAdamW.grad_norm, Trainer.train_step = real_norm, real_train_step  # each job its own NaNs
        run_job(planned, int(os.environ["RANK"]))
