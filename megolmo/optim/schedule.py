"""Learning-rate schedules: linear warmup, then cosine to ``final_lr_ratio`` x peak (OLMo 2 stage 1),
linear to zero (stage 2 annealing: from the peak on the first step after warm-up to 0 on the last, as OLMo's
stage 2 ends) or constant. ``step`` counts optimizer steps from 0."""
from __future__ import annotations

import math

from megolmo.errors import MegolmoConfigError

SCHEDULES = ("cosine", "linear", "constant")


def check_schedule(name: str, warmup_steps: int, max_steps: int) -> None:
    if name not in SCHEDULES:
        raise MegolmoConfigError(f"optim.schedule={name}: unknown schedule (choices: {', '.join(SCHEDULES)})")
    if warmup_steps < 0 or warmup_steps > max_steps:
        raise MegolmoConfigError(f"optim.warmup_steps={warmup_steps}: must be between 0 and "
                                 f"trainer.max_steps={max_steps}")


def learning_rate(step: int, peak: float, warmup_steps: int, max_steps: int, schedule: str,
                  final_lr_ratio: float = 0.1) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    decay_steps = max(1, max_steps - warmup_steps)
    if schedule == "linear":
        return peak * (1.0 - min(1.0, (step - warmup_steps) / max(1, decay_steps - 1)))
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    final = peak * final_lr_ratio
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))
