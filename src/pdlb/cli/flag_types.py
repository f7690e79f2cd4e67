"""argparse types for the `pdlb` commands' numeric flags: a value out of range is argparse's one-line
refusal naming the flag (exit 2), never a traceback from the request builder or a run that hangs.

The words are the services' (`expected an integer`, `expected a number`), whether the value came
from the command line or from the flag's PDLB_<COMMAND>_<FLAG> variable; never int()'s own."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from pdlb.common.config import integer, number

UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An integer in [low, high]; the bounds are the protobuf field's (uint32, uint64) or what the
    command needs to make progress (a concurrency of 0 would never send anything)."""

    def parse(text: str) -> int:
        value = integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: an integer from {low} to {high}")
        return value

    return parse


def float_in(low: float, high: float) -> Callable[[str], float]:
    """A finite number in [low, high]."""

    def parse(text: str) -> float:
        value = number(text)
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: a number from {low:g} to {high:g}")
        return value

    return parse


def int_from(low: int, what: str, why: str = "") -> Callable[[str], int]:
    """An integer of at least `low`, with no upper bound of its own; a refusal names `what` the
    number counts (`dispatchers per role`), the accepted range and, when given, `why` it is so."""

    def parse(text: str) -> int:
        value = integer(text)
        if value < low:
            because = f" ({why})" if why else ""
            raise argparse.ArgumentTypeError(f"{value} {what}: expected an integer of {low} or more{because}")
        return value

    return parse
