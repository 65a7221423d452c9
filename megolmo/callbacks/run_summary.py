"""``summary.json`` and the console's start-up block: the layout (and which ranks share a node), parameter
counts, per-rank bytes, the data and the epochs the run takes, tokens per step; at the end also steps,
tokens, median tokens/s and MFU, plus what other callbacks add (``Callback.summary``)."""
from __future__ import annotations

import socket
import statistics

from megolmo.callbacks.base import Callback
from megolmo.model.params import count_parameters
from megolmo.parallel.collectives import all_gather_objects, all_reduce_values
from megolmo.units import short_count


class RunSummary(Callback):
    def on_start(self, trainer) -> None:
        summary = self.layout_summary(trainer)
        trainer.run_dir.write_summary(summary)
        for line in startup_lines(summary):
            trainer.log(line)

    def on_end(self, trainer) -> None:
        summary = self.layout_summary(trainer)
        summary.update(trainer.callbacks.summaries(trainer))
        records = trainer.records
        if records:
            summary.update(steps=records[-1].step, tokens=records[-1].tokens, final_loss=records[-1].loss,
                           median_tokens_per_sec=statistics.median(r.tokens_per_sec for r in records),
                           mfu=statistics.median(r.mfu for r in records) if records[-1].mfu is not None else None)
        summary["nonfinite_steps"] = trainer.nonfinite.total  # updates the non-finite guard skipped
        trainer.run_dir.write_summary(summary)

    @staticmethod
    def layout_summary(trainer) -> dict:
        """Collective: the largest per-rank byte counts are agreed on over all ranks."""
        step, ps = trainer.step_fn, trainer.ps
        params, grads, state = all_reduce_values(
            [step.buffers.param_bytes, step.buffers.grad_bytes, step.optimizer.state_bytes()], "max", ps.world_group)
        hosts = all_gather_objects(socket.gethostname(), ps.world_group)
        dataset, t = trainer.loader.dataset, trainer.cfg.trainer
        summary = {
            "run_dir": str(trainer.run_dir.path.resolve()),
            "model": trainer.model_cfg.to_dict(),
            "precision": trainer.cfg.precision,
            "fp8": trainer.fp8.__dict__ if trainer.cfg.precision == "fp8" else None,
            "kernels": trainer.kernels.to_dict(),
            "layout": {"world_size": ps.world_size, "tensor": ps.tp, "pipeline": ps.pp, "data": ps.dp,
                       "sequence_parallel": bool(trainer.cfg.parallel.sequence_parallel)},
            "parameters": {"total": count_parameters(trainer.model_cfg),
                           "per_rank": sum(p.numel() for p in trainer.model.parameters())},
            "bytes_per_rank_max": {"params": int(params), "grads": int(grads), "optimizer_state": int(state)},
            "nodes": {host: [r for r, h in enumerate(hosts) if h == host] for host in dict.fromkeys(hosts)},
            "data": {"files": len(dataset.files), "tokens": sum(f.num_tokens for f in dataset.files),
                     "instances_per_epoch": dataset.epoch_len, "seq_len": dataset.seq_len,
                     "tokens_per_step": trainer.tokens_per_step,
                     "epochs": t.max_steps * t.global_batch_size / dataset.epoch_len},
        }
        if ps.pp > 1:
            summary["pipeline_bubble"] = None
            summary["pipeline_schedule"] = trainer.schedule
            summary["pipeline_layers"] = [len(r) for r in trainer.layer_ranges]
        return summary


def startup_lines(summary: dict) -> list[str]:
    """What a user starting a job wants to see before step 1."""
    layout, params, data = summary["layout"], summary["parameters"], summary["data"]
    nodes = "; ".join(f"{host}: ranks {_ranges(ranks)}" for host, ranks in summary["nodes"].items())
    sp = ", sequence parallel" if layout["sequence_parallel"] else ""
    b, count = summary["bytes_per_rank_max"], short_count
    return [f"layout: {layout['world_size']} ranks = tensor {layout['tensor']} x pipeline {layout['pipeline']} x "
            f"data {layout['data']}{sp}; {len(summary['nodes'])} node(s): {nodes}",
            f"parameters: {count(params['total'])} in all, {count(params['per_rank'])} on rank 0; per rank at most "
            f"{_gb(b['params'])} weights, {_gb(b['grads'])} gradients, {_gb(b['optimizer_state'])} optimizer state",
            f"data: {count(data['tokens'])} tokens in {data['files']} file(s), {data['instances_per_epoch']:,} instances "
            f"of {data['seq_len']}; {data['tokens_per_step']:,} tokens per step; the run takes "
            f"{data['epochs']:.3g} epoch(s)"]


def _ranges(ranks: list[int]) -> str:
    """0-7,9 for [0..7, 9]."""
    spans, start = [], ranks[0]
    for previous, rank in zip(ranks, ranks[1:] + [None]):
        if rank != previous + 1:
            spans.append(f"{start}-{previous}" if previous > start else str(start))
            start = rank
    return ",".join(spans)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"
