"""Token and parameter counts as people write them: ``4T``, ``100B``, ``190M``, read and written."""
from __future__ import annotations

import re

from megolmo.errors import MegolmoConfigError

SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_count(text: str) -> int:
    """``4T``, ``100B``, ``190M``, ``1.5e9`` or a plain integer."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBT]?)\s*", text.upper())
    if not match:
        raise MegolmoConfigError(f"{text!r}: not a count (e.g. 4T, 100B, 190M, 1000000)")
    return round(float(match[1]) * SUFFIXES.get(match[2], 1))


def short_count(n: float) -> str:
    """A count at a glance, three significant digits: 1.9B, 4T, 865K."""
    for suffix, scale in reversed(SUFFIXES.items()):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:,.0f}"
