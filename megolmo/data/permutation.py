"""A seeded pseudo-random permutation of ``range(n)`` evaluated one index at a time, in O(1) memory.

A keyed Feistel network on the smallest even number of bits that covers ``n`` is a bijection of
``range(2**bits)``; walking the cycle (applying it again while the result is ``>= n``) restricts it to a
bijection of ``range(n)``, and since ``2**bits < 4 n`` a walk takes fewer than four rounds on average. The
dataset's epoch order is built from it, so an epoch of a billion instances costs a few integers of state
instead of an 8 GB index on every rank, and start-up does not grow with the corpus.
"""
from __future__ import annotations

import numpy as np

ROUNDS = 6
_MASK64 = (1 << 64) - 1


def _mix(value: int) -> int:
    """splitmix64's finaliser: a strong 64-bit mixing of ``value``."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
    return value ^ (value >> 31)


class Permutation:
    """``perm[i]`` for ``i`` in ``range(n)``: a bijection determined by ``n`` and ``key`` alone."""

    def __init__(self, n: int, key: list[int]):
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        bits = max(2, (n - 1).bit_length() + (n - 1).bit_length() % 2)
        self.half = bits // 2
        self.half_mask = (1 << self.half) - 1
        self.keys = [int(k) for k in np.random.default_rng(key).integers(0, 2**63, size=ROUNDS)]

    def _feistel(self, value: int) -> int:
        left, right = value >> self.half, value & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.half_mask)
        return (left << self.half) | right

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} outside a permutation of {self.n}")
        value = self._feistel(index)
        while value >= self.n:
            value = self._feistel(value)
        return value
