"""The job's evaluations, built once at start-up and run together, in-loop and offline alike."""
from __future__ import annotations

from dataclasses import dataclass, field

from megolmo.evaluation.downstream import DownstreamTask, evaluate_task
from megolmo.evaluation.lm import HeldOutSet, evaluate_set
from megolmo.step.train_step import TrainStep


@dataclass
class Evaluations:
    held_out: list[HeldOutSet] = field(default_factory=list)
    tasks: list[DownstreamTask] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.held_out or self.tasks)

    def run(self, step_fn: TrainStep, global_batch: int, seq_len: int) -> dict[str, float]:
        """``eval/<set>/CE|PPL`` and ``eval/downstream/<task>/<metric>``, equal on every rank."""
        results: dict[str, float] = {}
        for held_out in self.held_out:
            for metric, value in evaluate_set(step_fn, held_out, step_fn.ps).items():
                results[f"eval/{held_out.name}/{metric}"] = value
        for task in self.tasks:
            for metric, value in evaluate_task(step_fn, task, global_batch, seq_len).items():
                results[f"eval/downstream/{task.name}/{metric}"] = value
        return results
