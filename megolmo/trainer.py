"""The training loop: a short loop over the ``TrainStep``, with callbacks at fixed points.

Everything that can be checked is checked before the model is allocated, so a bad config costs
seconds, not a queue wait plus a model build. Everything that observes or interrupts the loop
(console, metrics file, summary, checkpoints, pipeline timeline) is a callback (``megolmo/callbacks``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from megolmo.callbacks import (Callback, CallbackList, Checkpointing, ConsoleLog, MetricsFile, PipelineTimeline,
                               RunSummary, StepRecord, StopRequest, StopRequests)
from megolmo.callbacks.evaluation import Evaluation
from megolmo.callbacks.plots import LossPlots
from megolmo.callbacks.stop_requests import parse_duration, process_started
from megolmo.checkpoint.manager import CheckpointManager, LoadedState, SaveReport, checkpoint_name, resolve_checkpoint
from megolmo.data.fingerprint import FINGERPRINT_KEY, check_same_data, data_fingerprint
from megolmo.data.loader import GlobalBatchLoader, StepBatch, build_loader
from megolmo.data.prefetch import Prefetcher
from megolmo.data.sources import resolve_sources
from megolmo.errors import MegolmoConfigError
from megolmo.evaluation.downstream import build_tasks
from megolmo.evaluation.lm import build_held_out_sets
from megolmo.evaluation.suite import Evaluations
from megolmo.flops import device_peak_flops, training_flops_per_token
from megolmo.kernels.select import Fp8Settings, check_fp8_shapes, choose_kernels
from megolmo.model.config import ModelConfig
from megolmo.optim.adamw import AdamWSettings
from megolmo.optim.nonfinite import nonfinite_steps
from megolmo.optim.schedule import check_schedule, learning_rate
from megolmo.optim.skip_step import skip_step_settings
from megolmo.parallel.agree import agree_on_errors
from megolmo.parallel.bootstrap import discover
from megolmo.parallel.collectives import all_gather_objects, all_reduce_values, barrier, world_group
from megolmo.parallel.state import check_layout, initialize
from megolmo.pipeline.layout import chunk_layer_ranges
from megolmo.pipeline.schedules import check_schedule_layout, schedule_name
from megolmo.run_dir import RunDirectory, choose_run_dir
from megolmo.start_point import check_start_point, stage_start_lr
from megolmo.step import ChunkSettings, StepSettings, build_train_step
from megolmo.watchdog import HangWatchdog

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


def default_callbacks(cfg: DictConfig, pipelined: bool, evaluations: Evaluations | None = None) -> list[Callback]:
    """In call order: the summary first (written before step 1), the timeline and the evaluation before the
    step's metrics, the stop decision before the checkpoint, the checkpoint last (after the step is logged)."""
    from megolmo.callbacks import TensorBoardLog, WandbLog

    t = cfg.trainer
    callbacks: list[Callback] = [RunSummary()]
    if pipelined:
        callbacks.append(PipelineTimeline(list(t.profile_steps)))
    time_limit = parse_duration(t.time_limit) if t.time_limit is not None else None
    if evaluations:
        callbacks.append(Evaluation(evaluations, cfg.eval.interval))
    callbacks.append(MetricsFile())  # the loggers after it: the same values, metrics.jsonl first
    loggers = cfg.get("logging")
    if loggers is not None and loggers.wandb.project is not None:
        w = loggers.wandb
        callbacks.append(WandbLog(w.project, w.entity, w.name, w.group, list(w.tags)))
    if loggers is not None and loggers.tensorboard:
        callbacks.append(TensorBoardLog())
    callbacks += [ConsoleLog(t.log_interval), StopRequests(time_limit, process_started()),
                  Checkpointing(t.save_interval, bool(t.async_save))]
    return callbacks + [LossPlots()] if t.plots else callbacks


class Trainer:
    def __init__(self, cfg: DictConfig, callbacks: list[Callback] | None = None):
        self.cfg = cfg
        self.model_cfg = ModelConfig.from_mapping(cfg.model)
        t, p = cfg.trainer, cfg.parallel
        check_schedule(cfg.optim.schedule, cfg.optim.warmup_steps, t.max_steps)
        self.skip_step = skip_step_settings(cfg.optim.skip_step)
        self.nonfinite = nonfinite_steps(cfg.optim.max_nonfinite_steps)  # the count of NaN/inf steps, in a row
        if t.stop_at is not None and not 0 < t.stop_at <= t.max_steps:
            raise MegolmoConfigError(f"trainer.stop_at={t.stop_at}: must be in 1..trainer.max_steps={t.max_steps}")
        if p.virtual_pipeline > 1 and p.pipeline == 1:
            raise MegolmoConfigError(f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline > 1")
        self.schedule = schedule_name(p.get("pipeline_schedule"), p.virtual_pipeline)
        self.layer_ranges = chunk_layer_ranges(self.model_cfg.num_hidden_layers, p.pipeline, p.virtual_pipeline,
                                               p.pipeline_layers)
        check_layout(discover().world_size, p.tensor, p.pipeline)
        self.load_path = resolve_checkpoint(Path(cfg.load_path)) if cfg.load_path else None
        if self.load_path is not None and not self.load_path.exists():
            raise MegolmoConfigError(f"load_path={cfg.load_path}: no such checkpoint")
        self.peak_lr = stage_start_lr(self.load_path) if cfg.optim.lr_from_load_path else cfg.optim.lr
        resume_point = check_start_point(t.run_dir, self.load_path, bool(cfg.reset_trainer_state), t.max_steps,
                                         t.stop_at)
        if t.time_limit is not None:
            parse_duration(t.time_limit)  # a malformed limit fails now, not after the model is built
        if t.step_timeout_s is not None and not t.step_timeout_s > 0:
            raise MegolmoConfigError(f"trainer.step_timeout_s={t.step_timeout_s}: must be positive (or null: off)")
        check_model_layout(self.model_cfg, p.tensor, cfg.data.seq_len, p.sequence_parallel)
        self.fp8 = Fp8Settings.from_mapping(cfg.get("fp8"))
        self.ps = initialize(p.tensor, p.pipeline, p.timeout_s)
        error = None
        try:  # checks that may differ between ranks: agreed on before anyone goes further
            self.kernels = choose_kernels(self.model_cfg.backend, cfg.precision, self.ps.device, self.fp8,
                                          bool(t.compile))
            if cfg.precision == "fp8":
                check_fp8_shapes(self.model_cfg, p.tensor, t.micro_batch_size * cfg.data.seq_len)
            sources = resolve_sources(cfg.data)
            self.data_fingerprint = data_fingerprint(sources, cfg.data.seq_len, cfg.data.seed, t.global_batch_size)
            if resume_point is not None and self.continues_its_stage(*resume_point):
                check_same_data(resume_point[1].get(FINGERPRINT_KEY), self.data_fingerprint, str(resume_point[0]))
            self.loader: GlobalBatchLoader = build_loader(cfg.data, cfg.trainer, self.model_cfg.vocab_size,
                                                          self.ps.dp_rank, self.ps.dp, self.model_cfg.eos_token_id,
                                                          sources)
            m = self.model_cfg
            self.evaluations = Evaluations(
                build_held_out_sets(cfg.eval.lm.sets, cfg.data, t, m.vocab_size, m.eos_token_id, self.ps),
                build_tasks(cfg.eval, cfg.data.seq_len, m.vocab_size, m.eos_token_id, m.pad_token_id))
            if p.pipeline > 1:
                check_schedule_layout(self.schedule, p.pipeline, p.virtual_pipeline, self.loader.num_micro_batches,
                                      bool(t.compile))
        except MegolmoConfigError as raised:
            error = raised
        agree_on_errors(error)
        self.run_dir = RunDirectory(choose_run_dir(t.run_dir, self.model_cfg.name), self.ps.is_main)
        self.checkpoints = CheckpointManager(self.run_dir.path, t.keep_last, list(t.keep_steps), self.published)
        self.last_save: SaveReport | None = None
        self.save_blocked_s: float | None = None  # the last save's, reported with the next step
        self.step_fn = build_train_step(self.ps, self.step_settings(), self.chunk_settings())
        self.schedule_step = 0  # optimizer steps applied in this stage: the LR schedule's position
        self.start_step, self.resumed_from = self.restore()
        self.run_dir.write_config(cfg)
        self.max_steps = t.max_steps
        self.last_step = t.stop_at or t.max_steps
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        peak = t.peak_tflops * 1e12 if t.peak_tflops else device_peak_flops(self.ps.device)
        self.peak_flops_total = peak * self.ps.world_size if peak else None
        self.flops_per_token = training_flops_per_token(self.model_cfg, cfg.data.seq_len)
        self.records: list[StepRecord] = []
        self.stop_request: StopRequest | None = None  # set by a callback: save this step and leave the loop
        self.batches = Prefetcher(self.loader.read_step, (), 0, False)  # steps run outside fit read in place
        self.watchdog = HangWatchdog(t.step_timeout_s, self.run_dir.path, self.ps.rank)
        self.callbacks = CallbackList(default_callbacks(cfg, self.ps.pp > 1, self.evaluations) if callbacks is None
                                      else callbacks)

    def continues_its_stage(self, checkpoint: Path, state: dict) -> bool:
        """A resume (its data must not change): this run's own checkpoint, or a ``load_path`` of the same
        stage and ingredient. Stage 2 started from stage 1's optimizer state is a new stage on new data."""
        same_stage = (state.get("stage"), state.get("ingredient")) == (self.cfg.trainer.stage,
                                                                      self.cfg.trainer.ingredient)
        return checkpoint != self.load_path or same_stage

    def chunk_settings(self) -> ChunkSettings:
        """A run that ``restore`` will start from a checkpoint builds its weights undrawn: the load fills them."""
        fresh = self.checkpoints.latest() is None and self.load_path is None
        return ChunkSettings(self.model_cfg, COMPUTE_DTYPES[self.cfg.precision], self.kernels, self.fp8,
                             self.cfg.trainer.seed, tuple(self.layer_ranges),
                             bool(self.cfg.parallel.sequence_parallel), bool(self.cfg.trainer.compile), fresh)

    def step_settings(self) -> StepSettings:
        o, p, t = self.cfg.optim, self.cfg.parallel, self.cfg.trainer
        return StepSettings(AdamWSettings(self.peak_lr, tuple(o.betas), o.eps, o.weight_decay, o.clip_grad_norm),
                            self.loader.num_micro_batches, t.micro_batch_size, self.cfg.data.seq_len, o.z_loss,
                            int(p.bucket_size), bool(p.distributed_optimizer), bool(p.overlap_grad_reduce),
                            self.schedule, p.virtual_pipeline, self.kernels.optimizer, self.skip_step)

    @property
    def chunks(self) -> list[nn.Module]:
        return self.step_fn.chunks

    @property
    def model(self) -> nn.ModuleList:
        return self.step_fn.model

    @property
    def optimizer(self):
        return self.step_fn.optimizer

    def restore(self) -> tuple[int, Path | None]:
        """Where this job starts; the metrics of later steps (an earlier attempt's, killed before it saved them
        in a checkpoint) are dropped, since the job recomputes them."""
        start, source = self.load_start_point()
        self.run_dir.truncate_metrics(start)
        return start, source

    def load_start_point(self) -> tuple[int, Path | None]:
        """Resume from this run's latest checkpoint if there is one, else start from ``load_path`` if given."""
        latest = self.checkpoints.latest()
        if latest is not None:
            loaded = CheckpointManager.load(latest, self.optimizer, weights_only=False, chunks=self.chunks)
            self.resume_loop(loaded)
            return loaded.step, latest
        if self.load_path is not None:
            loaded = CheckpointManager.load(self.load_path, self.optimizer,
                                            weights_only=bool(self.cfg.reset_optimizer_state), chunks=self.chunks)
            if self.cfg.reset_trainer_state:
                return 0, self.load_path
            self.resume_loop(loaded)
            return loaded.step, self.load_path
        return 0, None

    def resume_loop(self, loaded: LoadedState) -> None:
        """The schedule's position (steps the guards skipped do not advance it), the skip-step guard's history and
        the non-finite steps in a row."""
        state = loaded.trainer_state
        self.schedule_step = state.get("schedule_step", loaded.step)
        if "nonfinite" in state:
            self.nonfinite.load_state_dict(state["nonfinite"])
        if self.step_fn.skip_guard is not None and "skip_step" in state:
            self.step_fn.skip_guard.load_state_dict(state["skip_step"])

    def save(self, step: int, asynchronous: bool = False) -> None:
        """``asynchronous``: return once the state is staged (``CheckpointManager``)."""
        self.callbacks.call("before_save", self, step)
        t = self.cfg.trainer
        tokens = step * self.tokens_per_step
        state = {"step": step, "tokens": tokens, "optimizer_steps": self.optimizer.step_count,
                 "schedule_step": self.schedule_step, "nonfinite": self.nonfinite.state_dict(),
                 "lr": self.learning_rate(self.schedule_step),  # where the schedule stands: a stage 2 starts there
                 "stage": t.stage, "ingredient": t.ingredient,
                 "data_seed": self.cfg.data.seed, FINGERPRINT_KEY: self.data_fingerprint,
                 "layout": {"tensor": self.ps.tp, "pipeline": self.ps.pp, "data": self.ps.dp}}
        if self.step_fn.skip_guard is not None:
            state["skip_step"] = self.step_fn.skip_guard.state_dict()
        with self.watchdog.watching(f"the checkpoint save after step {step}"):
            self.last_save = self.checkpoints.save(
                self.optimizer, checkpoint_name(step, tokens, t.stage, t.ingredient), state, self.model_cfg.to_dict(),
                self.chunks, writes_module_state=self.ps.tp_rank == 0 and self.ps.dp_rank == 0,
                asynchronous=asynchronous)
        self.save_blocked_s = self.last_save.blocked_s
        self.callbacks.call("after_save", self, step, self.last_save.path)

    def published(self, path: Path, seconds: float) -> None:
        """A checkpoint is complete (global rank 0; for an asynchronous save, on its publishing thread)."""
        if self.last_save is not None and self.last_save.asynchronous and self.last_save.path == path:
            self.log(f"checkpoint {path} complete, {seconds:.1f} s after its save began")

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> list[StepRecord]:
        steps = range(self.start_step, self.last_step)
        self.batches = Prefetcher(self.loader.read_step, steps, self.cfg.data.prefetch_steps,
                                  pin_memory=self.ps.device.type == "cuda")
        try:
            self.callbacks.call("on_start", self)
            for step in steps:
                with self.watchdog.watching(f"step {step + 1}"):
                    self.records.append(self.train_step(step))
                self.callbacks.call("on_step_end", self, self.records[-1])
                if self.stop_request is not None:
                    self.log(f"stopping after step {self.stop_request.step}: {self.stop_request.reason} "
                             "(checkpoint saved)")
                    break
            with self.watchdog.watching("the end of the job"):
                self.checkpoints.wait()
                self.callbacks.call("on_end", self)
                barrier(world_group())  # no rank exits (making its launcher stop the others) while one still writes
        except BaseException as error:
            self.callbacks.call("on_failure", self, error)
            raise
        finally:
            self.batches.close()
            self.watchdog.close()
        return self.records

    def train_step(self, step: int) -> StepRecord:
        started = time.perf_counter()
        lr = self.learning_rate(self.schedule_step)
        batch, loss_tokens, masked, waited = self.read_batch(step)
        result = self.step_fn.run(batch.micro_batches, loss_tokens, lr)
        self.schedule_step += result.applied
        if self.nonfinite.count(result.nonfinite):  # the same count on every rank: all raise the same error
            raise self.nonfinite.diverged(step + 1, self.step_fn.nonfinite_gradients())
        step_time = time.perf_counter() - started
        tokens_per_sec = self.tokens_per_step / step_time
        mfu = tokens_per_sec * self.flops_per_token / self.peak_flops_total if self.peak_flops_total else None
        extra = {"skipped_step": int(result.skipped)} if self.step_fn.skip_guard is not None else {}
        extra["nonfinite_step"] = int(result.nonfinite)
        if self.save_blocked_s is not None:  # the save after the previous step held training this long
            extra["checkpoint_blocked_s"], self.save_blocked_s = self.save_blocked_s, None
        return StepRecord(step + 1, result.ce_sum / loss_tokens, self.cfg.optim.z_loss * result.z_sum / loss_tokens,
                          result.grad_norm, lr, (step + 1) * self.tokens_per_step, tokens_per_sec, mfu, waited,
                          masked, step_time, *self.peak_memory_gb(), extra=extra)

    def learning_rate(self, step: int) -> float:
        o = self.cfg.optim
        return learning_rate(step, self.peak_lr, o.warmup_steps, self.max_steps, o.schedule, o.final_lr_ratio)

    def peak_memory_gb(self) -> tuple[float | None, float | None]:
        """This step's peak allocated and reserved CUDA memory (None on CPUs); the peaks restart each step."""
        if self.ps.device.type != "cuda":
            return None, None
        allocated, reserved = torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9
        torch.cuda.reset_peak_memory_stats()
        return allocated, reserved

    def read_batch(self, step: int) -> tuple[StepBatch, int, int, float]:
        """This rank's batch, the step's loss denominator and filtered instances (summed over the data-parallel
        ranks, each of which reads only its rows), and the seconds the loop waited. A rank whose read failed
        says so in the same reduction and every rank raises its one-line error, rather than the others
        waiting for it in the step's collectives."""
        error = None
        try:
            batch, waited = self.batches.get(step)
            local = [batch.loss_tokens, batch.masked_instances, 0]
        except MegolmoConfigError as raised:
            error, local = raised, [0, 0, 1]
        loss_tokens, masked, failed = all_reduce_values(local, "sum", self.ps.dp_group)
        if failed:
            messages = all_gather_objects(None if error is None else str(error), self.ps.dp_group)
            raise error or MegolmoConfigError(next(m for m in messages if m is not None))
        return batch, max(int(loss_tokens), 1), int(masked), waited

    def log(self, message: str) -> None:
        if self.ps.is_main:
            print(message, file=sys.stdout, flush=True)
