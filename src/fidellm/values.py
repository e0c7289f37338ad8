"""Type checks for values read from JSON and configs, where `true` must not pass as the number 1."""

from __future__ import annotations

import numbers


def is_integer(value: object) -> bool:
    """An integer (Python or NumPy) that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number (Python or NumPy) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
