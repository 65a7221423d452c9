"""The repeated n-gram instance filter (megolmo.data.instance_filter) against OLMo-core's definition."""
from __future__ import annotations

import numpy as np
import pytest

from megolmo.data.instance_filter import RepetitionFilter, find_periodic_runs
from megolmo.errors import MegolmoConfigError

SEQ_LEN = 512
PATTERN_TOKENS = 100  # patterns draw from [1, 100); filler from [100, 1100), so filler never extends a run


def filler(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct tokens, none a pattern token: no run of any period of its own."""
    return rng.permutation(np.arange(PATTERN_TOKENS, PATTERN_TOKENS + 1000))[:n]


def pattern(rng: np.random.Generator, period: int) -> np.ndarray:
    """``period`` distinct pattern tokens: its smallest period is ``period``."""
    return rng.permutation(np.arange(1, PATTERN_TOKENS))[:period]


def reference_runs(ids: np.ndarray, min_period: int, max_period: int) -> list[tuple[int, int, int]]:
    """OLMo-core's runs by a plain scan: per period, each maximal span with ids[i] == ids[i - p], its
    (end - start) // p repeats, reported when >= 3 (find_periodic_sequences' `out.times > 2`)."""
    ids = [int(t) for t in ids]
    found = []
    for p in range(min_period, min(max_period, len(ids) // 3) + 1):
        i = p
        while i < len(ids):
            if ids[i] != ids[i - p]:
                i += 1
                continue
            start = i - p
            while i < len(ids) and ids[i] == ids[i - p]:
                i += 1
            if (i - start) // p >= 3:
                found.append((start, p, (i - start) // p))
    return found


def reference_keeps(ids: np.ndarray, min_period: int = 1, max_period: int = 13, max_count: int = 32) -> bool:
    """OLMo-core's `_validate_instance`: False as soon as a run has `m.times >= repetition_max_count`."""
    return not any(times >= max_count for _, _, times in reference_runs(ids, min_period, max_period))


def planted(rng: np.random.Generator, period: int, length: int, where: str) -> tuple[np.ndarray, int]:
    """A SEQ_LEN instance of filler with ``length`` tokens of a period-``period`` pattern at the start, in the
    middle or at the end; also the run's start."""
    start = {"start": 0, "middle": (SEQ_LEN - length) // 2, "end": SEQ_LEN - length}[where]
    ids = filler(rng, SEQ_LEN)
    ids[start:start + length] = np.resize(pattern(rng, period), length)
    return ids, start


@pytest.mark.parametrize("dtype", [np.uint32, np.int64])
def test_acceptance_set(dtype):
    """31 repeats train, 32 are masked, at any place; partial repeats do not count; nothing else is masked."""
    rng = np.random.default_rng(0)
    filt = RepetitionFilter()
    cases = []  # (instance, expected keeps, expected minimal-period run)
    for period in (1, 7, 13):
        for where in ("start", "middle", "end"):
            for length, kept in [(31 * period, True), (32 * period, False),
                                 (32 * period - 1, True),  # 31 repeats and all but one token of a 32nd
                                 (33 * period - 1, False)]:  # 32 repeats and a partial 33rd
                ids, start = planted(rng, period, length, where)
                cases.append((ids.astype(dtype), kept, (start, period, length // period)))
    cases += [(filler(rng, SEQ_LEN).astype(dtype), True, None) for _ in range(20)]

    assert [filt.keeps(ids) for ids, _, _ in cases] == [kept for _, kept, _ in cases]
    for ids, _, run in cases:
        runs = find_periodic_runs(ids, 1, 13)
        if run is None:
            assert runs == []
        else:  # the planted run, and otherwise only multiples of its period
            assert run in runs and all(p % run[1] == 0 for _, p, _ in runs)


def test_run_split_between_instances_counts_in_each():
    """32 repeats across the boundary of two consecutive instances (16 + 16): neither is masked."""
    rng = np.random.default_rng(1)
    filt = RepetitionFilter()
    for period in (1, 7, 13):
        stream = filler(rng, 2 * SEQ_LEN)
        stream[SEQ_LEN - 16 * period:SEQ_LEN + 16 * period] = np.resize(pattern(rng, period), 32 * period)
        assert not filt.keeps(stream)  # as one instance it would be
        assert filt.keeps(stream[:SEQ_LEN]) and filt.keeps(stream[SEQ_LEN:])


def test_period_above_max_period_is_not_caught():
    """14 distinct tokens repeated 40 times: no period <= 13 covers it."""
    rng = np.random.default_rng(2)
    ids = filler(rng, 2 * SEQ_LEN)
    ids[100:100 + 14 * 40] = np.resize(pattern(rng, 14), 14 * 40)
    assert RepetitionFilter().keeps(ids)
    assert not RepetitionFilter(max_period=14).keeps(ids)
    assert [p for _, p, _ in find_periodic_runs(ids, 1, 14)] == [14]


def random_instance(rng: np.random.Generator) -> np.ndarray:
    """Random filler (sometimes from a tiny vocabulary, so with short accidental runs) with a few planted
    runs of random period and length near the 32-repeat threshold, possibly overlapping or cut by the edges."""
    n = int(rng.choice([0, 2, 5, 40, 300, SEQ_LEN]))
    vocab = int(rng.choice([3, 50, 1000]))
    ids = rng.integers(0, vocab, n)
    for _ in range(rng.integers(0, 3)):
        period = int(rng.integers(1, 16))
        length = int(rng.integers(29, 35)) * period + int(rng.integers(0, period))
        start = int(rng.integers(-period, max(1, n - length + period)))
        run = np.resize(rng.integers(0, vocab, period), length)[max(0, -start):]
        start = max(0, start)
        ids[start:start + len(run)] = run[:n - start]
    return ids


def test_matches_reference_on_random_instances():
    rng = np.random.default_rng(4)
    masked = 0
    for _ in range(300):
        ids = random_instance(rng).astype(rng.choice([np.uint32, np.int64]))
        for lo, hi, count in [(1, 13, 32), (2, 5, 4)]:
            assert find_periodic_runs(ids, lo, hi) == reference_runs(ids, lo, hi)
            keeps = reference_keeps(ids, lo, hi, count)
            assert RepetitionFilter(lo, hi, count).keeps(ids) == keeps
            masked += not keeps
    assert masked > 50  # the planted runs do cross the thresholds


def test_bad_configs_are_refused():
    for kwargs in [{"min_period": 0}, {"min_period": 5, "max_period": 4}, {"max_count": 2}]:
        with pytest.raises(MegolmoConfigError):
            RepetitionFilter(**kwargs)
    with pytest.raises(ValueError):
        RepetitionFilter().keeps(np.zeros((2, 8), dtype=np.int64))
