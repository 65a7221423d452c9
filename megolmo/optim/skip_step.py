"""OLMo 2 32B's instability guard: an optimizer step whose loss or gradient norm is far above its recent
history is not applied.

The rule is OLMo-core's (``SkipStepOptimizer``): every step's loss and pre-clip gradient norm join a history
of the last ``window`` steps, applied or not; once ``min_history`` earlier steps are there, a step is skipped
when its loss or its norm exceeds the history's mean by more than ``sigma`` sample standard deviations. The
first ``min_history`` steps are never skipped. A NaN or an infinity is the non-finite guard's
(``megolmo/optim/nonfinite.py``) and never joins the history: it would make the mean non-finite and every
later step an outlier. Both inputs are all-reduced values, equal on every rank; the trainer still agrees the
decision across ranks, and records a step (on every rank alike) only when no rank saw it non-finite.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from megolmo.errors import MegolmoConfigError


@dataclass(frozen=True)
class SkipStepSettings:
    sigma: float = 6.0
    window: int = 128
    min_history: int = 64


def skip_step_settings(section: Any) -> SkipStepSettings | None:
    """``optim.skip_step`` checked: None when the guard is off."""
    if not section.enabled:
        return None
    if not 2 <= section.min_history <= section.window:
        raise MegolmoConfigError(f"optim.skip_step.min_history={section.min_history}: must be between 2 and "
                                 f"optim.skip_step.window={section.window}")
    if not section.sigma > 0:
        raise MegolmoConfigError(f"optim.skip_step.sigma={section.sigma}: must be positive")
    return SkipStepSettings(float(section.sigma), int(section.window), int(section.min_history))


def within(value: float, history: list[float], sigma: float) -> bool:
    return value - statistics.fmean(history) <= sigma * statistics.stdev(history)


@dataclass
class SkipStepGuard:
    settings: SkipStepSettings
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)

    def allows(self, loss: float, grad_norm: float) -> bool:
        """Whether this step's update is applied, judged against the history before it."""
        s = self.settings
        return len(self.losses) < s.min_history or (
            within(loss, self.losses, s.sigma) and within(grad_norm, self.grad_norms, s.sigma))

    def record(self, loss: float, grad_norm: float) -> None:
        """A judged step's values join the history, applied or not; non-finite ones never do."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return
        window = self.settings.window
        self.losses = [*self.losses, loss][-window:]
        self.grad_norms = [*self.grad_norms, grad_norm][-window:]

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses, self.grad_norms = list(state["losses"]), list(state["grad_norms"])
