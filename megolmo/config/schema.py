"""The typed schema of megolmo's config: one dataclass per Hydra group, each field with its type, default
and one line of help.

Hydra merges every YAML file of ``conf/`` and every command-line override into these types, so a value of
the wrong type fails while composing; ``megolmo.config.load`` refuses keys the schema does not name. The
defaults of ``data``, ``optim``, ``parallel`` and ``trainer`` live here alone (they are those groups'
``default``/``adamw`` options); the model sizes live in ``conf/model/*.yaml``. ``docs/config.md`` is
generated from this module (``python -m megolmo.config --markdown``).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from megolmo.data.token_file import TOKEN_DTYPES
from megolmo.kernels.select import FP8_RECIPES, PRECISIONS
from megolmo.model.config import ModelConfig
from megolmo.optim.schedule import SCHEDULES as LR_SCHEDULES
from megolmo.pipeline.schedules import SCHEDULES as PIPELINE_SCHEDULES


def setting(default: Any, help: str, choices: typing.Iterable[str] = ()) -> Any:
    """A schema field: its default, one line of help, and for string fields the accepted values."""
    metadata = {"help": help, "choices": tuple(choices)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _model_section() -> type:
    """The ``model`` group's schema: ``ModelConfig``'s fields (named like ``Olmo2Config``'s), but mutable,
    since Hydra writes the overrides into it."""
    hints = typing.get_type_hints(ModelConfig)
    return dataclasses.make_dataclass("ModelSection", [
        (f.name, hints[f.name], field(default=f.default, metadata=f.metadata)) for f in dataclasses.fields(ModelConfig)])


ModelSection = _model_section()


@dataclass
class InstanceFilterSection:
    enabled: bool = setting(False, "mask out of the loss instances where a short pattern repeats (OLMo 2 recipes: on)")
    min_period: int = setting(1, "shortest repeated pattern, in tokens")
    max_period: int = setting(13, "longest repeated pattern, in tokens")
    max_count: int = setting(32, "an instance with a pattern repeated this many times in a row is masked")


@dataclass
class DataSection:
    paths: list[str] = setting([], "token files: raw 1-D memmaps (uint16 or uint32), EOS-separated documents")
    mix: str | None = setting(None, "a named mix instead of paths: conf/mixes/<mix>.yaml (olmo-mix-1124, "
                              "dolmino-mix-1124), its files under data.root")
    root: str | None = setting(None, "directory that relative paths (and a mix's files) are under")
    label_mask_paths: list[str] = setting(
        [], "optional, one per path: one byte per token, 1 = the token is a training label (SFT)")
    weights: list[float] | None = setting(None, "mixture weights, one per path (default: proportional to size)")
    seq_len: int = setting(4096, "tokens per training instance")
    dtype: str | None = setting(None, "token id type of the files; default: the mix's, else the files' sidecars' "
                                "(written by tools/prepare_data.py), else uint32", TOKEN_DTYPES)
    seed: int = setting(0, "the global data order; identical for every parallel layout")
    instance_filter: InstanceFilterSection = field(default_factory=InstanceFilterSection)
    prefetch_steps: int = setting(2, "steps of batches read ahead on a background thread; 0 reads on the loop")


@dataclass
class SkipStepSection:
    enabled: bool = setting(False, "OLMo 2 32B's guard: skip an optimizer step whose loss or grad norm exceeds the "
                            "mean of the last `window` steps by more than `sigma` standard deviations")
    sigma: float = setting(6.0, "standard deviations above the mean that skip a step")
    window: int = setting(128, "steps of loss and grad-norm history")
    min_history: int = setting(64, "no step is skipped before this many steps of history")


@dataclass
class OptimSection:
    lr: float = setting(4.0e-4, "peak learning rate")
    betas: list[float] = setting([0.9, 0.95], "AdamW's beta1, beta2")
    eps: float = setting(1.0e-8, "AdamW's epsilon")
    weight_decay: float = setting(0.1, "decoupled weight decay, on everything but the embeddings")
    warmup_steps: int = setting(0, "linear warm-up from 0 to optim.lr over this many steps")
    schedule: str = setting("cosine", "after warm-up: cosine (to final_lr_ratio x lr), linear (to zero at the "
                            "last step), constant",
                            LR_SCHEDULES)
    final_lr_ratio: float = setting(0.1, "the cosine schedule's final learning rate, as a fraction of optim.lr")
    lr_from_load_path: bool = setting(
        False, "stage 2: the peak is the LR load_path's schedule stood at at its step (optim.lr is not used)")
    clip_grad_norm: float = setting(1.0, "global gradient-norm clipping threshold; <= 0 disables clipping")
    z_loss: float = setting(1.0e-5, "weight of the z-loss, mean(logsumexp^2) over loss-bearing tokens")
    skip_step: SkipStepSection = field(default_factory=SkipStepSection)
    max_nonfinite_steps: int = setting(8, "steps with a NaN or infinite loss or grad norm are skipped on every rank; "
                                       "this many in a row stop the job, naming the first non-finite gradient")


@dataclass
class ParallelSection:
    tensor: int = setting(1, "tensor-parallel ranks (heads, kv heads and intermediate size divisible by it)")
    pipeline: int = setting(1, "pipeline stages")
    virtual_pipeline: int = setting(1, "model chunks per pipeline rank (interleaved and zbv schedules)")
    pipeline_schedule: str | None = setting(
        None, "pipeline schedule; default 1f1b, interleaved_1f1b with virtual_pipeline > 1", PIPELINE_SCHEDULES)
    pipeline_layers: list[int] | None = setting(None, "explicit (uneven) layer split over the chunks, e.g. [3, 2]")
    sequence_parallel: bool = setting(False, "norms and residuals on sequence shards (needs parallel.tensor > 1)")
    distributed_optimizer: bool = setting(
        False, "ZeRO-1: shard fp32 master weights and Adam states over data-parallel ranks")
    overlap_grad_reduce: bool = setting(True, "launch each bucket's reduction as soon as its gradients are final")
    bucket_size: int = setting(40_000_000, "elements per data-parallel gradient bucket")
    timeout_s: int = setting(600, "process-group timeout: a failed rank ends the job within this time")


@dataclass
class TrainerSection:
    global_batch_size: int = setting(8, "sequences per optimizer step, over all data-parallel ranks")
    micro_batch_size: int = setting(4, "sequences per forward/backward on one rank")
    max_steps: int = setting(100, "the schedule's horizon: the job trains up to this step")
    stop_at: int | None = setting(None, "end this job after this step (after a save) without changing the schedule")
    time_limit: str | None = setting(
        None, "end this job with a save before this wall-clock budget runs out (e.g. 3h50m; counted from start-up)")
    seed: int = setting(1234, "model initialisation")
    run_dir: str | None = setting(None, "default: runs/<model>-<timestamp>, chosen once for all ranks")
    save_interval: int = setting(1000, "a checkpoint every this many steps, and one at the end of the job")
    async_save: bool = setting(False, "interval checkpoints are written in the background: training waits only "
                               "while the state is copied to host memory (the last save stays synchronous)")
    step_timeout_s: float | None = setting(
        None, "hang watchdog: a step or save that takes longer dumps every thread's stack into the run directory's "
        "hangs/ and exits non-zero on every rank (null: off)")
    keep_last: int = setting(2, "complete checkpoints kept (plus trainer.keep_steps)")
    keep_steps: list[int] = setting([], "checkpoints at these steps are never pruned")
    log_interval: int = setting(1, "print a step line every this many steps")
    compile: bool = setting(False, "torch.compile each transformer block (fuses norms, RoPE, SwiGLU)")
    peak_tflops: float | None = setting(None, "per-device peak for MFU; default: known GPUs, none on CPUs")
    plots: bool = setting(True, "draw loss.png (and eval_*.png) into the run directory at the end of the job")
    profile_steps: list[int] = setting([], "steps whose pipeline timeline is written into the run directory")
    stage: int = setting(1, "names checkpoints stage{stage}-...")
    ingredient: int | None = setting(None, "stage-2 ingredient number: stage2-ingredient{K}-step...")


@dataclass
class Fp8Section:
    recipe: str = setting("delayed", "Transformer Engine's scaling: delayed or current (torchao needs current)",
                          FP8_RECIPES)
    bf16_first_last: bool = setting(False, "keep the first and the last transformer block in BF16")


@dataclass
class WandbSection:
    project: str | None = setting(None, "log to this Weights & Biases project; null = off (WANDB_MODE=offline "
                                  "logs without network)")
    entity: str | None = setting(None, "W&B team or user (default: the logged-in user's)")
    name: str | None = setting(None, "W&B run name (default: the run directory's name)")
    group: str | None = setting(None, "W&B run group, e.g. one per sweep")
    tags: list[str] = setting([], "W&B run tags")


@dataclass
class LoggingSection:
    wandb: WandbSection = field(default_factory=WandbSection)
    tensorboard: bool = setting(False, "write TensorBoard event files into the run directory's tensorboard/")


@dataclass
class LmEvalSection:
    sets: dict[str, list[str]] = setting(
        {}, "held-out sets, name -> token files (rooted and typed like data.paths), e.g. {c4_en-validation: [...]}")


@dataclass
class DownstreamEvalSection:
    tasks: list[str] = setting([], "olmo_eval tasks, e.g. [hellaswag, arc_easy, piqa, arc_challenge_rc_5shot]; "
                               "needs eval.tokenizer and the eval extra")
    limit: int | None = setting(None, "score only each task's first this many documents (quick checks); null: all")


@dataclass
class EvalSection:
    interval: int | None = setting(None, "evaluate every this many steps (and after the job's last step); "
                                   "null: after the last step only")
    tokenizer: str | None = setting(None, "tokenizer.json for the downstream tasks (OLMo 2: allenai_dolma2.json)")
    lm: LmEvalSection = field(default_factory=LmEvalSection)
    downstream: DownstreamEvalSection = field(default_factory=DownstreamEvalSection)


@dataclass
class MegolmoConfig:
    model: ModelSection = field(default_factory=ModelSection)  # type: ignore[valid-type]
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    precision: str = setting("fp32", "compute precision; master weights and reductions stay fp32", PRECISIONS)
    fp8: Fp8Section = field(default_factory=Fp8Section)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    load_path: str | None = setting(None, "start from this megolmo checkpoint (its architecture comes with it)")
    required: list[str] = setting([], "keys a recipe leaves to you: the job starts only once each is given as an "
                                  "override")
    reset_trainer_state: bool = setting(
        False, "with load_path: step, data position and schedule start afresh (AdamW moments kept where it has them)")
    reset_optimizer_state: bool = setting(False, "with load_path: fresh AdamW moments (separate from "
                                          "reset_trainer_state)")


GROUP_DEFAULTS = {"data": ("default", DataSection), "optim": ("adamw", OptimSection),
                  "parallel": ("default", ParallelSection), "trainer": ("default", TrainerSection)}


def register() -> None:
    """Put the schema into Hydra's ConfigStore: the root (``megolmo_schema``, first in ``conf/config.yaml``'s
    defaults) and the groups' default options."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="megolmo_schema", node=MegolmoConfig)
    for group, (name, section) in GROUP_DEFAULTS.items():
        store.store(group=group, name=name, node=section)
