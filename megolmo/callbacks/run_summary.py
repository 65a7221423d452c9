"""``summary.json``: the layout, parameter counts and per-rank bytes at the start; at the end also
steps, tokens, median tokens/s and MFU, plus what other callbacks add (``Callback.summary``)."""
from __future__ import annotations

import statistics

from megolmo.callbacks.base import Callback
from megolmo.model.params import count_parameters
from megolmo.parallel.collectives import all_reduce_values


class RunSummary(Callback):
    def on_start(self, trainer) -> None:
        trainer.run_dir.write_summary(self.layout_summary(trainer))

    def on_end(self, trainer) -> None:
        summary = self.layout_summary(trainer)
        summary.update(trainer.callbacks.summaries(trainer))
        records = trainer.records
        if records:
            summary.update(steps=records[-1].step, tokens=records[-1].tokens, final_loss=records[-1].loss,
                           median_tokens_per_sec=statistics.median(r.tokens_per_sec for r in records),
                           mfu=statistics.median(r.mfu for r in records) if records[-1].mfu is not None else None)
        trainer.run_dir.write_summary(summary)

    @staticmethod
    def layout_summary(trainer) -> dict:
        """Collective: the largest per-rank byte counts are agreed on over all ranks."""
        step, ps = trainer.step_fn, trainer.ps
        params, grads, state = all_reduce_values(
            [step.buffers.param_bytes, step.buffers.grad_bytes, step.optimizer.state_bytes()], "max", ps.world_group)
        summary = {
            "model": trainer.model_cfg.to_dict(),
            "precision": trainer.cfg.precision,
            "fp8": trainer.fp8.__dict__ if trainer.cfg.precision == "fp8" else None,
            "kernels": trainer.kernels.to_dict(),
            "layout": {"world_size": ps.world_size, "tensor": ps.tp, "pipeline": ps.pp, "data": ps.dp,
                       "sequence_parallel": bool(trainer.cfg.parallel.sequence_parallel)},
            "parameters": {"total": count_parameters(trainer.model_cfg),
                           "per_rank": sum(p.numel() for p in trainer.model.parameters())},
            "bytes_per_rank_max": {"params": int(params), "grads": int(grads), "optimizer_state": int(state)},
        }
        if ps.pp > 1:
            summary["pipeline_bubble"] = None
            summary["pipeline_schedule"] = trainer.schedule
            summary["pipeline_layers"] = [len(r) for r in trainer.layer_ranges]
        return summary
