"""Helpers shared by simulators that play a scenario: periodic episodes and option types.

Option types raise ``argparse.ArgumentTypeError`` so a bad ``medge sim`` option stops at the
command line with a usage message instead of failing inside the running simulator.
"""

from __future__ import annotations

import argparse
import math


def episode(every: float, length: float, t: float) -> float | None:
    """Seconds into the current episode of a periodic event (the first one at ``every``), or
    ``None`` between episodes and when ``every`` is 0 (never)."""
    if every <= 0 or t < every:
        return None
    into = (t - every) % every
    return into if into < length else None


def _number(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return number


def positive(text: str) -> float:
    """argparse type: a finite number > 0."""
    number = _number(text)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return number


def non_negative(text: str) -> float:
    """argparse type: a finite number >= 0 (0 usually means "never")."""
    number = _number(text)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return number
