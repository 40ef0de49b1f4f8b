"""The number check every policies parser shares (policy YAML, cluster YAML, the FIFO clock's settings)."""

from __future__ import annotations

import math
import numbers


def finite_number(value: object) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool; numpy's and ``Fraction``
    count), else None: a string, None, NaN, an infinity, or an int beyond any float (YAML and Python
    ints have no limit)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
