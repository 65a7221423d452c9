"""The training loop: data -> forward/backward over micro-batches -> optimizer step -> metrics.

Everything that can be checked is checked before the model is allocated, so a bad config costs
seconds, not a queue wait plus a model build.
"""
from __future__ import annotations

import statistics
from pathlib import Path
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from megolmo.checkpoint.manager import CheckpointManager, checkpoint_name, resolve_checkpoint
from megolmo.data.loader import GlobalBatchLoader, build_loader
from megolmo.errors import MegolmoConfigError
from megolmo.flops import device_peak_flops, training_flops_per_token
from megolmo.kernels.apply import prepare_model
from megolmo.kernels.fused_adam import UPDATES
from megolmo.kernels.select import Fp8Settings, KernelChoice, check_fp8_shapes, choose_kernels
from megolmo.model.config import ModelConfig
from megolmo.model.init import initialize_parameters
from megolmo.model.olmo2 import Olmo2ForCausalLM
from megolmo.model.params import count_parameters
from megolmo.optim.adamw import AdamWSettings, DistributedAdamW
from megolmo.optim.buffers import FlatBuffers
from megolmo.optim.grad_sync import GradientSynchronizer
from megolmo.optim.schedule import check_schedule, learning_rate
from megolmo.parallel.layers import TensorParallel
from megolmo.parallel.mappings import all_reduce_sum
from megolmo.parallel.agree import agree_on_errors
from megolmo.parallel.bootstrap import discover
from megolmo.parallel.state import ParallelState, check_layout, initialize
from megolmo.pipeline.engine import PipelineEngine, ScheduleRecord
from megolmo.pipeline.layout import check_micro_batches, chunk_layer_ranges, chunks_of_rank
from megolmo.pipeline.timeline import busy_and_span, theoretical_bubble, write_timeline
from megolmo.run_dir import RunDirectory, choose_run_dir
from megolmo.step import forward_backward

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}  # fp8: GEMM inputs only


def check_model_layout(cfg: ModelConfig, tp: int, seq_len: int, sequence_parallel: bool) -> None:
    """The TP divisibility rules, checked before allocating anything."""
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(cfg, key) % tp:
            raise MegolmoConfigError(f"model.{key}={getattr(cfg, key)} is not divisible by parallel.tensor={tp}")
    if sequence_parallel and seq_len % tp:
        raise MegolmoConfigError(f"data.seq_len={seq_len} is not divisible by parallel.tensor={tp} "
                                 "(needed by parallel.sequence_parallel=true)")
    if seq_len > cfg.max_position_embeddings:
        raise MegolmoConfigError(f"data.seq_len={seq_len} exceeds model.max_position_embeddings="
                                 f"{cfg.max_position_embeddings}")


def build_chunks(cfg: ModelConfig, ps: ParallelState, tp: TensorParallel, dtype: torch.dtype, seed: int,
                 layer_ranges: list[range], virtual: int, kernels: KernelChoice, fp8: Fp8Settings,
                 compile_blocks: bool = False) -> list[Olmo2ForCausalLM]:
    """This rank's model chunks (all layers when there is no pipeline, else its share of them), with
    the chosen kernels swapped in."""
    chunks = []
    for g in chunks_of_rank(ps.pp_rank, ps.pp, virtual):
        chunk = Olmo2ForCausalLM(cfg, tp, layer_ids=layer_ranges[g], with_embedding=g == 0,
                                 with_head=g == len(layer_ranges) - 1, device=ps.device)
        initialize_parameters(chunk, seed, cfg.initializer_range)
        chunks.append(prepare_model(chunk, dtype, kernels, fp8, ps.stage_group, compile_blocks))
    return chunks


@dataclass
class StepRecord:
    step: int
    loss: float
    z_loss: float
    grad_norm: float
    lr: float
    tokens: int
    tokens_per_sec: float
    mfu: float | None

    def line(self, max_steps: int, eta_s: float) -> str:
        return (f"step {self.step:>6}/{max_steps} | loss {self.loss:.4f} | z {self.z_loss:.2e} | "
                f"gnorm {self.grad_norm:.3f} | lr {self.lr:.2e} | {self.tokens_per_sec:,.0f} tok/s | "
                f"ETA {_duration(eta_s)}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.model_cfg = ModelConfig.from_mapping(cfg.model)
        t = cfg.trainer
        check_schedule(cfg.optim.schedule, cfg.optim.warmup_steps, t.max_steps)
        if t.stop_at is not None and not 0 < t.stop_at <= t.max_steps:
            raise MegolmoConfigError(f"trainer.stop_at={t.stop_at}: must be in 1..trainer.max_steps={t.max_steps}")
        p = cfg.parallel
        if p.virtual_pipeline > 1 and p.pipeline == 1:
            raise MegolmoConfigError(f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline > 1")
        self.layer_ranges = chunk_layer_ranges(self.model_cfg.num_hidden_layers, p.pipeline, p.virtual_pipeline,
                                               p.pipeline_layers)
        check_layout(discover().world_size, cfg.parallel.tensor, cfg.parallel.pipeline)
        self.load_path = resolve_checkpoint(Path(cfg.load_path)) if cfg.load_path else None
        if self.load_path is not None and not self.load_path.exists():
            raise MegolmoConfigError(f"load_path={cfg.load_path}: no such checkpoint")
        check_model_layout(self.model_cfg, cfg.parallel.tensor, cfg.data.seq_len, cfg.parallel.sequence_parallel)
        self.fp8 = Fp8Settings.from_mapping(cfg.get("fp8"))
        self.ps = initialize(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.timeout_s)
        self.dtype = COMPUTE_DTYPES.get(cfg.precision)
        error = None
        try:  # checks that may differ between ranks: agreed on before anyone goes further
            self.kernels = choose_kernels(self.model_cfg.backend, cfg.precision, self.ps.device, self.fp8,
                                          bool(t.compile))
            if cfg.precision == "fp8":
                check_fp8_shapes(self.model_cfg, p.tensor, t.micro_batch_size * cfg.data.seq_len)
            self.loader: GlobalBatchLoader = build_loader(cfg.data, cfg.trainer, self.model_cfg.vocab_size,
                                                          self.ps.dp_rank, self.ps.dp)
            check_micro_batches(self.loader.num_micro_batches, p.pipeline, p.virtual_pipeline)
        except MegolmoConfigError as raised:
            error = raised
        agree_on_errors(error)
        self.tp = TensorParallel(self.ps.tp_group, bool(p.sequence_parallel))
        torch.manual_seed(t.seed)
        self.chunks = build_chunks(self.model_cfg, self.ps, self.tp, self.dtype, t.seed, self.layer_ranges,
                                   p.virtual_pipeline, self.kernels, self.fp8, bool(t.compile))
        self.model = nn.ModuleList(self.chunks)
        self.engine = None
        if self.ps.pp > 1:
            seq = cfg.data.seq_len // (self.ps.tp if self.tp.sequence_parallel else 1)
            self.engine = PipelineEngine(self.chunks, self.ps, p.virtual_pipeline, self.loader.num_micro_batches,
                                         (t.micro_batch_size, seq, self.model_cfg.hidden_size), self.dtype)
        self.pipeline_time = [0.0, 0.0]  # this rank's forward/backward seconds and step seconds
        self.max_alive_activations = 0
        named = [(name, param) for chunk in self.chunks for name, param in chunk.named_parameters()]
        self.buffers = FlatBuffers(named, self.ps.dp, int(p.bucket_size))
        self.grad_sync = GradientSynchronizer(self.buffers, self.ps.dp_group, self.loader.num_micro_batches,
                                              reduce_scatter=bool(p.distributed_optimizer),
                                              overlap=bool(p.overlap_grad_reduce))
        self.sequence_parallel_grads = [slot.param.main_grad for slot in self.buffers.slots
                                        if getattr(slot.param, "sequence_parallel", False)]
        o = cfg.optim
        self.optimizer = DistributedAdamW(
            self.buffers, AdamWSettings(o.lr, tuple(o.betas), o.eps, o.weight_decay, o.clip_grad_norm),
            self.ps.dp_group, bool(p.distributed_optimizer), self.ps.tp_rank,
            [g for g in (self.ps.tp_group, self.ps.pp_group) if g is not None], UPDATES.get(self.kernels.optimizer))
        self.run_dir = RunDirectory(choose_run_dir(t.run_dir, self.model_cfg.name), self.ps.is_main)
        self.checkpoints = CheckpointManager(self.run_dir.path, t.keep_last, list(t.keep_steps))
        self.start_step, self.resumed_from = self.restore()
        self.run_dir.write_config(cfg)
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        peak = t.peak_tflops * 1e12 if t.peak_tflops else device_peak_flops(self.ps.device)
        self.peak_flops_total = peak * self.ps.world_size if peak else None
        self.flops_per_token = training_flops_per_token(self.model_cfg, cfg.data.seq_len)

    def restore(self) -> tuple[int, Path | None]:
        """Resume from this run's latest checkpoint if there is one, else start from ``load_path`` if given."""
        latest = self.checkpoints.latest()
        if latest is not None:
            loaded = CheckpointManager.load(latest, self.optimizer, weights_only=False, chunks=self.chunks)
            self.run_dir.truncate_metrics(loaded.step)
            return loaded.step, latest
        if self.load_path is not None:
            loaded = CheckpointManager.load(self.load_path, self.optimizer,
                                            weights_only=bool(self.cfg.reset_trainer_state), chunks=self.chunks)
            return loaded.step, self.load_path
        return 0, None

    def save(self, step: int) -> None:
        t = self.cfg.trainer
        tokens = step * self.tokens_per_step
        name = checkpoint_name(step, tokens, t.stage, t.ingredient)
        state = {"step": step, "tokens": tokens, "optimizer_steps": self.optimizer.step_count,
                 "data_seed": self.cfg.data.seed, "layout": {"tensor": self.ps.tp, "pipeline": self.ps.pp,
                                                             "data": self.ps.dp}}
        path = self.checkpoints.save(self.optimizer, name, state, self.model_cfg.to_dict(), self.chunks,
                                     writes_module_state=self.ps.tp_rank == 0 and self.ps.dp_rank == 0)
        self.log(f"saved checkpoint {path}")

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> list[StepRecord]:
        t = self.cfg.trainer
        start_step = self.start_step
        last = t.stop_at or t.max_steps
        self.run_dir.write_summary(self.summary())
        self.log(f"run directory: {self.run_dir.path.resolve()}")
        k = self.kernels
        self.log(f"kernels: backend {k.backend}, attention {k.attention}, norm {k.norm}, fp8 {k.fp8 or 'off'}, "
                 f"AdamW {k.optimizer}")
        if self.resumed_from is not None:
            self.log(f"starting at step {start_step} from {self.resumed_from}")
        records: list[StepRecord] = []
        started = time.perf_counter()
        for step in range(start_step, last):
            records.append(self.train_step(step))
            record = records[-1]
            self.run_dir.append_metrics(record.__dict__)
            if record.step % t.log_interval == 0 or record.step == last:
                elapsed = time.perf_counter() - started
                eta = elapsed / (step + 1 - start_step) * (last - step - 1)
                self.log(record.line(t.max_steps, eta))
            if record.step % t.save_interval == 0 or record.step == last:
                self.save(record.step)
        self.run_dir.write_summary(self.summary(records))
        self.log(f"done: {len(records)} steps; run directory {self.run_dir.path.resolve()}")
        return records

    def train_step(self, step: int) -> StepRecord:
        started = time.perf_counter()
        lr = learning_rate(step, self.cfg.optim.lr, self.cfg.optim.warmup_steps, self.cfg.trainer.max_steps,
                           self.cfg.optim.schedule, self.cfg.optim.final_lr_ratio)
        self.grad_sync.start_step()
        loss_tokens = self.loader.global_loss_tokens(step)
        micro_batches = self.loader.micro_batches(step)
        if self.engine is None:
            ce, z = forward_backward(self.chunks[0], micro_batches, loss_tokens, self.cfg.optim.z_loss, self.ps.device)
        else:
            ce, z = self.engine.run(micro_batches, loss_tokens, self.cfg.optim.z_loss)
            self.account_pipeline(step + 1, self.engine.last_record)
        self.synchronize_gradients()
        sums = all_reduce_sum(all_reduce_sum(torch.stack([ce, z]), self.ps.dp_group), self.ps.pp_group)
        grad_norm = self.optimizer.step(lr)
        elapsed = time.perf_counter() - started
        tokens_per_sec = self.tokens_per_step / elapsed
        mfu = (tokens_per_sec * self.flops_per_token / self.peak_flops_total) if self.peak_flops_total else None
        denominator = max(loss_tokens, 1)
        z_loss = self.cfg.optim.z_loss * float(sums[1]) / denominator
        return StepRecord(step + 1, float(sums[0]) / denominator, z_loss, grad_norm, lr,
                          (step + 1) * self.tokens_per_step, tokens_per_sec, mfu)

    def synchronize_gradients(self) -> None:
        """Finish the data-parallel bucket reductions, then sum across the TP group the gradients of
        weights that saw only a sequence shard (sums commute, so the order does not matter)."""
        self.grad_sync.finish()
        for grad in self.sequence_parallel_grads:
            all_reduce_sum(grad, self.ps.tp_group)

    def account_pipeline(self, step: int, record: ScheduleRecord) -> None:
        busy, span = busy_and_span(record)
        self.pipeline_time[0] += busy
        self.pipeline_time[1] += span
        self.max_alive_activations = max(self.max_alive_activations, record.max_alive)
        if step in self.cfg.trainer.profile_steps:
            records = [None] * self.ps.world_size if self.ps.is_main else None
            dist.gather_object(record, records, dst=0)
            if self.ps.is_main:
                trace, png = write_timeline(records, self.run_dir.path, step)
                self.log(f"pipeline timeline of step {step}: {trace} and {png}")

    def bubble_fractions(self) -> dict:
        """Measured (mean over ranks of idle / forward-backward time) beside the theoretical bubble."""
        totals = torch.tensor(self.pipeline_time, dtype=torch.float64)
        all_reduce_sum(totals, self.ps.world_group)
        alive = [None] * self.ps.world_size
        dist.all_gather_object(alive, (self.ps.pp_rank, self.max_alive_activations))
        p = self.cfg.parallel
        return {"max_alive_activation_sets_per_stage": [max(n for r, n in alive if r == s) for s in range(self.ps.pp)],
                "measured": float((totals[1] - totals[0]) / totals[0]) if totals[0] > 0 else None,
                "theoretical": theoretical_bubble(p.pipeline, self.loader.num_micro_batches, p.virtual_pipeline),
                "micro_batches": self.loader.num_micro_batches, "virtual_pipeline": p.virtual_pipeline}

    # -- reporting ------------------------------------------------------------------------------
    def summary(self, records: list[StepRecord] | None = None) -> dict:
        local = torch.tensor([self.buffers.param_bytes, self.buffers.grad_bytes, self.optimizer.state_bytes()],
                             dtype=torch.float64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
        summary = {
            "model": self.model_cfg.to_dict(),
            "precision": self.cfg.precision,
            "fp8": self.fp8.__dict__ if self.cfg.precision == "fp8" else None,
            "kernels": self.kernels.to_dict(),
            "layout": {"world_size": self.ps.world_size, "tensor": self.ps.tp, "pipeline": self.ps.pp,
                       "data": self.ps.dp, "sequence_parallel": self.tp.sequence_parallel},
            "parameters": {"total": count_parameters(self.model_cfg),
                           "per_rank": sum(p.numel() for p in self.model.parameters())},
            "bytes_per_rank_max": {"params": int(local[0]), "grads": int(local[1]), "optimizer_state": int(local[2])},
        }
        if self.engine is not None:
            summary["pipeline_bubble"] = self.bubble_fractions() if records else None
            summary["pipeline_layers"] = [len(r) for r in self.layer_ranges]
        if records:
            rates = [r.tokens_per_sec for r in records]
            summary.update(steps=records[-1].step, tokens=records[-1].tokens, final_loss=records[-1].loss,
                           median_tokens_per_sec=statistics.median(rates),
                           mfu=statistics.median([r.mfu for r in records]) if records[-1].mfu is not None else None)
        return summary

    def log(self, message: str) -> None:
        if self.ps.is_main:
            print(message, file=sys.stdout, flush=True)
