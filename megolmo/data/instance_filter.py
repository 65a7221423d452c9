"""OLMo 2's repeated n-gram instance filter, with OLMo-core's definition.

OLMo 2 masks out of the loss every training instance that holds a long run of one short repeated pattern:
such degenerate text (a token or an n-gram over and over) drives loss spikes, and masking it is one of
OLMo 2's stability measures (OLMo-core's ``InstanceFilterConfig``, defaults kept here).

Definition (OLMo-core's ``find_periodic_sequences`` and ``_validate_instance``). For each period ``p`` in
``[min_period, min(max_period, len(ids) // 3)]``, a run is a maximal span ``[start, end)`` of the instance
with ``ids[i] == ids[i - p]`` for every ``i`` in ``[start + p, end)``; it repeats ``times = (end - start) // p``
times, so a partial trailing (or leading) repeat does not count, and runs with ``times < 3`` are not
reported. The instance is masked when some run has ``times >= max_count``. Only the instance's own tokens
are looked at: a run split between two consecutive instances of a stream counts in each separately.
(OLMo-core finds the runs by comparing the instance reshaped to rows of ``p`` tokens with its previous
row, then extends each block of equal rows by the partial matches of the rows around it; that reports
exactly the runs above.)

Loss denominator: a masked instance's labels are all ignored, but OLMo-core's train module adds
``seq_len`` tokens back to ``batch_num_tokens_for_loss`` per masked instance, so the instance stays in the
denominator as zero-loss tokens (the original OLMo divided by ``input_ids.numel()``, the same convention).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megolmo.errors import MegolmoConfigError


def _runs(eq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and (exclusive) ends of the maximal runs of True in the boolean array ``eq``."""
    edges = np.flatnonzero(np.diff(eq.view(np.int8), prepend=0, append=0))
    return edges[::2], edges[1::2]


def _has_run(eq: np.ndarray, length: int) -> bool:
    """Whether ``eq`` holds ``length`` (>= 2) consecutive Trues; cheap tests first."""
    if np.count_nonzero(eq) < length:
        return False
    step = length // 2  # such a run covers two consecutive multiples of step: two consecutive samples are True
    sampled = eq[::step]
    if not (sampled[1:] & sampled[:-1]).any():
        return False
    starts, ends = _runs(eq)
    return bool((ends - starts).max() >= length)


def find_periodic_runs(ids: np.ndarray, min_period: int, max_period: int) -> list[tuple[int, int, int]]:
    """``(start, period, times)`` of every run OLMo-core's ``find_periodic_sequences`` reports, in its order
    (by period, then start)."""
    ids = np.asarray(ids)
    found = []
    for period in range(min_period, min(max_period, len(ids) // 3) + 1):
        starts, ends = _runs(ids[period:] == ids[:-period])
        times = (ends - starts + period) // period  # the run [start, end + period) of ids
        found += [(int(s), period, int(t)) for s, t in zip(starts[times >= 3], times[times >= 3])]
    return found


@dataclass(frozen=True)
class RepetitionFilter:
    """OLMo 2's instance filter: rejects an instance where a pattern of ``min_period`` to ``max_period``
    tokens repeats ``max_count`` or more times in a row (see the module docstring)."""

    min_period: int = 1
    max_period: int = 13
    max_count: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min_period <= self.max_period:
            raise MegolmoConfigError(f"data.instance_filter.min_period={self.min_period}, max_period="
                                     f"{self.max_period}: need 1 <= min_period <= max_period")
        if self.max_count < 3:
            raise MegolmoConfigError(f"data.instance_filter.max_count={self.max_count}: OLMo-core only reports "
                                     "runs of 3 or more repeats, so it must be >= 3")

    def keeps(self, ids: np.ndarray) -> bool:
        """True when the 1-D instance ``ids`` trains; False when it is masked out of the loss."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"an instance is 1-D, got shape {ids.shape}")
        for period in range(self.min_period, self.max_period + 1):
            if self.max_count * period > len(ids):
                break
            # times >= max_count  <=>  the run of ids[i] == ids[i - period] is >= (max_count - 1) * period long
            if _has_run(ids[period:] == ids[:-period], (self.max_count - 1) * period):
                return False
        return True
