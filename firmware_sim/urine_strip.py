"""What a simulated urine test strip shows, before any analyzer formats it for its wire.

Shared by the ASTM and printout simulators so both produce the same realistic mix of results
for a kidney-stone patient (mostly normal, sometimes infected or bloody; clinical-data.md §5).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Generic, TypeVar

from firmware_sim.sim_options import add_clock_offset, non_negative, positive

Rendered = TypeVar("Rendered")


@dataclass(frozen=True)
class PadResult:
    code: str
    """ASTM-style pad code: PH SG LEU NIT BLD PRO GLU KET BIL UBG."""
    grade: str
    """``""`` for pH and SG; else ``neg``, ``norm``, ``trace``, ``1+``…, ``pos``."""
    amount: str
    """Concentration as printed (``"6.5"``, ``"1.015"``, ``"70"``), ``""`` when none."""
    unit: str
    """UCUM unit of ``amount`` (``""`` for SG and nitrite)."""
    abnormal: bool


def _graded(rng: random.Random, code: str, unit: str, blocks: list[tuple[str, str]],
            weights: list[int]) -> PadResult:
    grade, amount = rng.choices(blocks, weights)[0]
    return PadResult(code, grade, amount, unit, grade not in ("neg", "norm"))


def random_strip(rng: random.Random) -> list[PadResult]:
    ph = rng.choice([5.0, 5.5, 6.0, 6.0, 6.5, 6.5, 7.0, 7.5, 8.0])
    sg = rng.choice([1.005, 1.010, 1.010, 1.015, 1.015, 1.020, 1.025, 1.030])
    return [
        PadResult("PH", "", f"{ph:.1f}", "[pH]", not 5.0 <= ph <= 8.0),
        PadResult("SG", "", f"{sg:.3f}", "", False),
        _graded(rng, "LEU", "{Leu}/uL",
                [("neg", ""), ("trace", "15"), ("1+", "70"), ("2+", "125"), ("3+", "500")],
                [80, 8, 6, 4, 2]),
        _graded(rng, "NIT", "", [("neg", ""), ("pos", "")], [92, 8]),
        _graded(rng, "BLD", "{Ery}/uL",
                [("neg", ""), ("trace", "10"), ("1+", "25"), ("2+", "80"), ("3+", "200")],
                [70, 10, 10, 6, 4]),
        _graded(rng, "PRO", "mg/dL", [("neg", ""), ("trace", "15"), ("1+", "30")], [85, 10, 5]),
        _graded(rng, "GLU", "mg/dL", [("neg", ""), ("trace", "100")], [97, 3]),
        _graded(rng, "KET", "mg/dL", [("neg", ""), ("trace", "5"), ("1+", "15")], [90, 7, 3]),
        _graded(rng, "BIL", "mg/dL", [("neg", ""), ("1+", "1")], [97, 3]),
        _graded(rng, "UBG", "mg/dL", [("norm", "0.2"), ("1+", "2")], [95, 5]),
    ]


@dataclass(frozen=True)
class Strip(Generic[Rendered]):
    """One result in the analyzer's memory: its number, its device time, its wire form."""

    number: int
    taken_at: datetime
    """Device clock (naive) when the strip was read."""
    rendered: Rendered


class StripAnalyzer(Generic[Rendered]):
    """The analyzer's own life: a strip read every ``--every`` seconds (the first soon after
    start-up), rendered for the wire by ``render(pads, device_time, number)`` and kept in a
    bounded result memory until sent; its clock runs ``--clock-offset`` away from UTC.

    ``wire_time_format`` is the strftime pattern of the device time as the wire shows it;
    ``handed_over(strip)`` records, with ``--handed-over-log``, a strip the device considers
    delivered and no longer keeps."""

    def __init__(
        self, args: argparse.Namespace,
        render: Callable[[list[PadResult], datetime, int], Rendered], wire_time_format: str,
    ) -> None:
        self.every: float = args.every
        self.clock_offset = timedelta(seconds=args.clock_offset)
        self.rng = random.Random(getattr(args, "seed", None))
        self.memory: deque[Strip[Rendered]] = deque(maxlen=args.memory)
        self.count = 0
        self.wire_time_format = wire_time_format
        self.handed_over_log: Path | None = getattr(args, "handed_over_log", None)
        self._render = render
        self._next = time.monotonic() + args.first_after

    def device_now(self) -> datetime:
        return datetime.now(UTC).replace(tzinfo=None) + self.clock_offset

    def seconds_to_next(self) -> float:
        return float(self._next - time.monotonic())

    def read_due_strips(self) -> None:
        """Read the strips due by now; beyond what memory holds they would be lost anyway."""
        late = time.monotonic() - self._next
        if late < 0:
            return
        due = int(late // self.every) + 1
        for _ in range(min(due, self.memory.maxlen or due)):
            self.count += 1
            moment = self.device_now()
            self.memory.append(Strip(self.count, moment,
                                     self._render(random_strip(self.rng), moment, self.count)))
        self._next += due * self.every

    def handed_over(self, strip: Strip[Rendered]) -> None:
        """The device considers ``strip`` delivered and has deleted it from its memory: one
        JSON line appended to ``--handed-over-log`` (if set), flushed at once."""
        if self.handed_over_log is None:
            return
        line = json.dumps({"strip": strip.number,
                           "device_time": strip.taken_at.strftime(self.wire_time_format),
                           "time_format": self.wire_time_format})
        with self.handed_over_log.open("a") as log:
            log.write(line + "\n")


def add_strip_arguments(parser: argparse.ArgumentParser, clock_note: str = "") -> None:
    parser.add_argument("--every", type=positive, default=300.0, metavar="SECONDS",
                        help="a strip is read every SECONDS (default 300)")
    parser.add_argument("--first-after", type=non_negative, default=1.0, metavar="SECONDS",
                        help="first strip this long after start-up (default 1)")
    parser.add_argument("--memory", type=int, default=100, metavar="N",
                        help="results kept until sent; the oldest is lost beyond (default 100)")
    add_clock_offset(parser, clock_note)
    parser.add_argument(
        "--handed-over-log", type=Path, metavar="PATH",
        help="append one JSON line to PATH for every strip the analyzer considers delivered and "
        "deletes from its memory: {\"strip\": N, \"device_time\": as on the wire, "
        "\"time_format\": its strftime pattern}; flushed per line, appended across restarts "
        "(strip numbers restart at 1), for end-to-end loss checks")
