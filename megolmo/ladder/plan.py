"""The ladder's runs: every size at every duration, with OLMo's ladder rules for batch, LR and warm-up, as
megolmo overrides, and their compute beside the target's.

Rules (N from ``sizes.ladder_params``, D = 20 N k tokens for k x Chinchilla): batch
``round(160 (N / 108e6)^(2/3))`` sequences of 2048 (halved in sequences at 4096, the same tokens); peak LR
``0.0047 (N / 108e6)^(-1/3)`` (divided by 4 at 4096); warm-up over N tokens; cosine to 0.1 x the peak.
OLMo's published runs round the batch further (the 190M's is 128 x 4096 where the rule gives 117): the plan
follows the rule as written, and ``run`` rounds it to what the layout can split (``PlannedRun.with_batch``).
A ladder of other shapes (``plan_custom``: the miniature's tiny models) keeps the duration and warm-up rules
and may set its own batch and LR, which OLMo's rules, fitted at 10^8 parameters and more, do not give.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from megolmo.errors import MegolmoConfigError
from megolmo.evaluation.assets import DEFAULT_CACHE
from megolmo.ladder.sizes import LADDER_SHAPES, ladder_params, ladder_shape, shape_config
from megolmo.ladder.tasks import eval_labels
from megolmo.model.config import ModelConfig
from megolmo.units import short_count

MULTIPLIERS = (0.5, 1.0, 2.0, 5.0, 10.0)
SEQ_LENS = (2048, 4096)
EVALS_PER_RUN = 40  # the step-2 fit needs intermediate evaluations: ~36 after the first 10% are dropped
DEFAULT_TOKENIZER = str(DEFAULT_CACHE / "allenai_dolma2.json")  # where `python -m megolmo.evaluation.assets` puts it
BASE_MODEL = "olmo2_1b"


@dataclass(frozen=True)
class PlannedRun:
    size: str
    multiplier: float  # k: the run trains on k x Chinchilla (20 N) tokens
    n: int
    seq_len: int
    batch: int  # sequences per optimizer step
    lr: float
    warmup_steps: int
    max_steps: int
    model: tuple[str, ...]  # the architecture as overrides: model=BASE, then the fields that differ from it
    downstream: bool = True  # the eight tasks in the loop; False: held-out LM sets only (eval.lm.sets)
    evals: int = EVALS_PER_RUN

    @property
    def name(self) -> str:
        return f"{self.size}-{self.multiplier:g}xC"

    @property
    def tokens(self) -> int:
        return self.max_steps * self.batch * self.seq_len

    @property
    def flops(self) -> float:
        """6 N D, with the ladder's N and the tokens the run trains on."""
        return 6.0 * self.n * self.tokens

    def with_batch(self, batch: int) -> "PlannedRun":
        """The same run at another batch: steps and warm-up recounted so that it keeps its D and N tokens."""
        return dataclasses.replace(self, batch=batch, **_steps(self.n, self.multiplier, batch, self.seq_len))

    def overrides(self, tokenizer: str = DEFAULT_TOKENIZER) -> list[str]:
        """The run as ``megolmo.train`` overrides (data, layout and run directory are the launcher's)."""
        evaluation = [f"eval.interval={max(1, self.max_steps // self.evals)}"]
        if self.downstream:
            evaluation += [f"eval.tokenizer={tokenizer}", f"eval.downstream.tasks=[{','.join(eval_labels())}]"]
        return [
            *self.model, f"data.seq_len={self.seq_len}", f"trainer.global_batch_size={self.batch}",
            f"trainer.max_steps={self.max_steps}", f"optim.lr={self.lr:.6g}", f"optim.warmup_steps={self.warmup_steps}",
            "optim.schedule=cosine", "optim.final_lr_ratio=0.1", *evaluation,
        ]


def batch_size(n: int, seq_len: int) -> int:
    return max(1, round(160 * (n / 108e6) ** (2 / 3) * 2048 / seq_len))


def learning_rate(n: int, seq_len: int) -> float:
    return 0.0047 * (n / 108e6) ** (-1 / 3) / (4 if seq_len == 4096 else 1)


def _steps(n: int, multiplier: float, batch: int, seq_len: int) -> dict[str, int]:
    """20 N k tokens in whole steps, warm-up over N tokens of them (all of them below k = 0.05)."""
    tokens_per_step = batch * seq_len
    max_steps = math.ceil(20 * n * multiplier / tokens_per_step)
    return {"warmup_steps": min(max_steps, max(1, round(n / tokens_per_step))), "max_steps": max_steps}


def model_overrides(cfg: ModelConfig, base: str) -> tuple[str, ...]:
    """``model=BASE`` and every field of ``cfg`` that differs from the base's, as Hydra overrides."""
    base_fields = ModelConfig.named(base).to_dict()
    changed = [(key, value) for key, value in cfg.to_dict().items() if value != base_fields[key]]
    return (f"model={base}", *(f"model.{key}={_hydra(value)}" for key, value in changed))


def _hydra(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def plan_custom(shapes: Mapping[str, Mapping[str, Any]], multipliers: list[float] | None = None, seq_len: int = 4096,
                base: str = BASE_MODEL, batch: int | None = None, lr: float | None = None, downstream: bool = True,
                evals: int = EVALS_PER_RUN) -> list[PlannedRun]:
    """Every shape (name -> model fields over ``base``, see ``sizes.shape_config``) at every duration; batch and
    LR from OLMo's rules unless given."""
    if (batch is None or lr is None) and seq_len not in SEQ_LENS:
        raise MegolmoConfigError(f"seq_len={seq_len}: the ladder's rules are set for {' or '.join(map(str, SEQ_LENS))}"
                                 " (or give the batch and the LR)")
    if batch is not None and batch < 1:
        raise MegolmoConfigError(f"batch {batch}: must be >= 1 sequence")
    if evals < 1:
        raise MegolmoConfigError(f"evaluations per run {evals}: must be >= 1")
    runs = []
    for size, shape in shapes.items():
        cfg = shape_config(size, shape, base)
        n = ladder_params(cfg)
        for k in multipliers or MULTIPLIERS:
            if k <= 0:
                raise MegolmoConfigError(f"duration {k:g} x Chinchilla: must be > 0")
            run_batch = batch or batch_size(n, seq_len)
            runs.append(PlannedRun(size, k, n, seq_len, run_batch, lr or learning_rate(n, seq_len),
                                   model=model_overrides(cfg, base), downstream=downstream, evals=evals,
                                   **_steps(n, k, run_batch, seq_len)))
    return runs


def plan_run(size: str, multiplier: float, seq_len: int) -> PlannedRun:
    return plan([size], [multiplier], seq_len)[0]


def plan(sizes: list[str] | None = None, multipliers: list[float] | None = None,
         seq_len: int = 4096) -> list[PlannedRun]:
    """The paper's ladder: OLMo 2 at ``sizes.LADDER_SHAPES``, every size at every duration."""
    return plan_custom({size: ladder_shape(size) for size in sizes or LADDER_SHAPES}, multipliers, seq_len)


def plan_table(runs: list[PlannedRun], target_n: int, target_tokens: int, target_name: str) -> str:
    """The runs with their compute, each and in all, as a fraction of the target's 6 N D."""
    target_flops = 6.0 * target_n * target_tokens
    lines = [f"{'run':<12}{'N':>15}{'tokens':>10}{'batch':>12}{'lr':>10}{'warmup':>8}{'steps':>9}"
             f"{'FLOPs':>11}{'of target':>11}"]
    for r in runs:
        lines.append(f"{r.name:<12}{r.n:>15,}{short_count(r.tokens):>10}{f'{r.batch} x {r.seq_len}':>12}{r.lr:>10.3g}"
                     f"{r.warmup_steps:>8}{r.max_steps:>9}{r.flops:>11.3g}{r.flops / target_flops:>11.3%}")
    total = sum(r.flops for r in runs)
    lines.append(f"ladder: {len(runs)} runs, {total:.3g} FLOPs = {total / target_flops:.2%} of the target "
                 f"({target_name}: 6 N D = 6 x {target_n:,} x {short_count(target_tokens)} = {target_flops:.3g} FLOPs)")
    return "\n".join(lines)
