"""The pipeline's timeline and bubble: each step's recorded spans are accumulated into the measured
bubble (idle over compute time, against the schedule's ideal), the peak of live activation sets per
stage is kept, and for ``trainer.profile_steps`` all ranks' spans are drawn (Chrome trace + PNG)."""
from __future__ import annotations

from megolmo.callbacks.base import Callback, StepRecord
from megolmo.parallel.collectives import all_gather_objects, all_reduce_values, gather_objects
from megolmo.pipeline.schedules import theoretical_bubble
from megolmo.pipeline.timeline import busy_and_span, write_timeline


class PipelineTimeline(Callback):
    def __init__(self, profile_steps: list[int]):
        self.profile_steps = set(profile_steps)
        self.busy = 0.0
        self.span = 0.0
        self.max_alive = 0

    def on_step_end(self, trainer, record: StepRecord) -> None:
        schedule_record = trainer.step_fn.pipeline.last_record
        busy, span = busy_and_span(schedule_record)
        self.busy += busy
        self.span += span
        self.max_alive = max(self.max_alive, schedule_record.max_alive)
        if record.step in self.profile_steps:
            records = gather_objects(schedule_record, 0, trainer.ps.world_group)
            if trainer.ps.is_main:
                trace, png = write_timeline(records, trainer.run_dir.path, record.step)
                trainer.log(f"pipeline timeline of step {record.step}: {trace} and {png}")

    def summary(self, trainer) -> dict:
        """Collective: the bubble is the mean over ranks; live activation sets are the max per stage."""
        busy, span = all_reduce_values([self.busy, self.span], "sum", trainer.ps.world_group)
        alive = all_gather_objects((trainer.ps.pp_rank, self.max_alive), trainer.ps.world_group)
        p = trainer.cfg.parallel
        m = trainer.loader.num_micro_batches
        return {"pipeline_bubble": {
            "max_alive_activation_sets_per_stage": [max(n for r, n in alive if r == s) for s in range(trainer.ps.pp)],
            "measured": (span - busy) / busy if busy > 0 else None,
            "theoretical": theoretical_bubble(trainer.schedule, p.pipeline, m, p.virtual_pipeline),
            "schedule": trainer.schedule, "micro_batches": m, "virtual_pipeline": p.virtual_pipeline}}
