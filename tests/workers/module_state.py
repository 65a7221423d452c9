"""The multi-rank half of tests/test_module_state.py: 2 gloo ranks, each holding half the blocks as a
pipeline stage would, fill their delayed-scaling histories, save one checkpoint together, and write the
histories they saved into OUTDIR for the single-process side to compare with what it loads.

    python -m torch.distributed.run --nproc-per-node 2 -m tests.workers.module_state OUTDIR
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megolmo.checkpoint.manager import CheckpointManager
from tests.delayed_scaling import DelayedScalingLinear
from megolmo.parallel.state import ParallelState
from tests.test_module_state import CFG, SEQ, half_model, train_step


def main(out: Path) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    model = half_model(rank)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x = (torch.randint(0, CFG.vocab_size, (2, SEQ), generator=g) if rank == 0
             else torch.randn(2, SEQ, CFG.hidden_size, generator=g))
        model(x)
    world = dist.group.WORLD  # two pipeline stages of one rank each
    optimizer = train_step(model, ParallelState(rank, 2, rank, pp=2, pp_rank=rank, pp_group=world, world_group=world)
                           ).optimizer
    CheckpointManager(out, keep_last=1).save(optimizer, "step3", {"step": 3, "tokens": 0, "optimizer_steps": 0},
                                             CFG.to_dict(), [model], writes_module_state=True)
    torch.save({name: m.amax_history for name, m in model.named_modules() if isinstance(m, DelayedScalingLinear)},
               out / f"histories{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
