"""Compact urine strip analyzer that sends its printout between STX and ETX.

``--dialect consult120`` (default) prints like a McKesson Consult 120 (ID/Date/Operator/No.
lines, then ``[*]LABEL [grade] value [unit]``, no checksum, input ignored);
``--dialect clinitek50`` like a Bayer Clinitek 50 (German labels and words, YYMMDDhhmm date,
20-column lines, XOR checksum; a NAK from the host makes it print the report again, up to
3 times; it waits ``--nak-window`` after each print before the next report). Reports produced
while no host is connected wait in the analyzer's memory.
Independent of ``drivers/urine_printout.py`` on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from datetime import datetime

from firmware_sim.link import DeviceLink, Handler
from firmware_sim.sim_options import ends_on_unplug, non_negative
from firmware_sim.urine_strip import PadResult, StripAnalyzer, add_strip_arguments

HELP = "urine strip analyzer printing its report between STX and ETX (Consult 120, Clinitek 50)"

STX, ETX, NAK = b"\x02", b"\x03", 0x15
REPRINTS = 3

CONSULT_LABELS = {"PH": "pH", "SG": "SG", "LEU": "LEU", "NIT": "NIT", "BLD": "BLO",
                  "PRO": "PRO", "GLU": "GLU", "KET": "KET", "BIL": "BIL", "UBG": "URO"}
CONSULT_ORDER = ["LEU", "NIT", "UBG", "PRO", "PH", "BLD", "SG", "KET", "BIL", "GLU"]
CONSULT_GRADES = {"neg": "-", "norm": "-", "trace": "+-", "pos": "+"}
CONSULT_UNITS = {"{Leu}/uL": "Leu/uL", "{Ery}/uL": "Ery/uL", "mg/dL": "mg/dL"}

CLINITEK_LABELS = {"PH": "pH", "SG": "SG", "LEU": "LEU", "NIT": "NIT", "BLD": "OBL",
                   "PRO": "PRO", "GLU": "GLU", "KET": "KET", "BIL": "BIL", "UBG": "UBG"}
CLINITEK_ORDER = ["GLU", "BIL", "KET", "SG", "PH", "PRO", "UBG", "NIT", "BLD", "LEU"]
CLINITEK_COLOURS = ["HELL GELB", "GELB", "DUNKELGELB", "STROHGELB"]
CONSULT_TIME = "%d-%m-%Y %H:%M"
CLINITEK_TIME = "%y%m%d%H%M"
"""The device time as each dialect prints it (minutes; the Clinitek with a 2-digit year)."""


def consult120_report(pads: list[PadResult], moment: datetime, number: int) -> bytes:
    by_code = {pad.code: pad for pad in pads}
    lines = [f"ID:{number % 100}", f"Date:{moment.strftime(CONSULT_TIME)}", "Operator: 100",
             f"No. {100000 + number}"]
    for code in CONSULT_ORDER:
        pad = by_code[code]
        star = "*" if pad.abnormal else " "
        label = CONSULT_LABELS[code]
        if not pad.grade:  # pH and SG: a bare value
            lines.append(f"{star}{label:<9}{pad.amount:>9}")
            continue
        grade = CONSULT_GRADES.get(pad.grade, pad.grade)
        shown = pad.amount or ("neg" if grade == "-" else "pos")
        unit = CONSULT_UNITS.get(pad.unit, "") if pad.amount else ""
        lines.append(f"{star}{label:<9} {grade:<6}{shown:>10}  {unit}".rstrip())
    return STX + "".join(f" {line}\r\n" for line in lines).encode() + ETX


def clinitek_checksum(data: bytes) -> bytes:
    total = 0
    for byte in data:
        total ^= byte
    return f"{total:02X}".encode()


def _clinitek_value(pad: PadResult) -> str:
    if pad.code == "SG" and pad.amount == "1.030":
        return ">=1.030"
    if not pad.grade:
        return pad.amount
    if pad.code == "NIT":
        return "POSITIV" if pad.grade == "pos" else "NEGATIV"
    unit = pad.unit.replace("{", "").replace("}", "")
    if pad.code in ("LEU", "BLD", "UBG"):  # these pads print an amount even when negative
        amount = pad.amount or "0"
        approx = "Ca " if pad.code == "BLD" and pad.grade != "neg" else ""
        return f"{approx}{amount} {unit}"
    return f"{pad.amount} {unit}" if pad.amount else "NEGATIV"


def clinitek50_report(pads: list[PadResult], moment: datetime, number: int, colour: str) -> bytes:
    """Clinitek 50 layout; the device clock's year is printed with two digits only."""
    by_code = {pad.code: pad for pad in pads}
    lines = [f"6510  01.02 {moment.strftime(CLINITEK_TIME)}",
             f"{number % 1000:03d} {colour}".ljust(18)]
    for code in CLINITEK_ORDER:
        pad = by_code[code]
        label = CLINITEK_LABELS[code] + ("*" if pad.abnormal else "")
        lines.append(f"{label:<5}{_clinitek_value(pad)}".ljust(20))
    text = "".join(line + "\r\n" for line in lines).encode()
    return STX + b"\r\n" + text + clinitek_checksum(text) + ETX


class PrintoutUrineDevice:
    def __init__(self, args: argparse.Namespace) -> None:
        self.dialect: str = args.dialect
        self.nak_window: float = args.nak_window
        self.strips = StripAnalyzer(
            args, self._report, CLINITEK_TIME if self.dialect == "clinitek50" else CONSULT_TIME)

    def _report(self, pads: list[PadResult], moment: datetime, number: int) -> bytes:
        if self.dialect == "clinitek50":
            colour = CLINITEK_COLOURS[number % len(CLINITEK_COLOURS)]
            return clinitek50_report(pads, moment, number, colour)
        return consult120_report(pads, moment, number)

    @ends_on_unplug
    async def serve(self, link: DeviceLink) -> None:
        """Print reports as they are due, each followed by ``nak_window`` of quiet; a NAK (at
        any time, a Clinitek only) reprints the last report, up to 3 times. The session ends
        as soon as the host hangs up, so that no report is printed into a line nobody reads
        (and the next host may connect)."""
        naks = asyncio.Queue[None]()
        listener = asyncio.create_task(self._listen(link, naks))
        printer = asyncio.create_task(self._print(link, naks))
        try:
            done, _ = await asyncio.wait({listener, printer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (listener, printer):
                task.cancel()
            for task in (listener, printer):
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await task
        for task in done:
            task.result()  # the host hung up (HostDisconnected), or a bug

    async def _print(self, link: DeviceLink, naks: asyncio.Queue[None]) -> None:
        """A report is handed over (``--handed-over-log``) once its first print was written:
        the analyzer keeps no copy in its memory after that, only the last report for a
        reprint. A print that failed (the host went away) leaves the report in the memory."""
        last, reprints, quiet_until = b"", 0, 0.0
        window = self.nak_window if self.dialect == "clinitek50" else 0.0
        while True:
            self.strips.read_due_strips()
            now = time.monotonic()
            if self.strips.memory and now >= quiet_until:
                strip = self.strips.memory[0]
                await link.write(strip.rendered)
                self.strips.handed_over(self.strips.memory.popleft())
                last, reprints = strip.rendered, REPRINTS
            else:
                strips = self.strips
                wait = quiet_until - now if strips.memory else strips.seconds_to_next()
                if not await _nak_before(naks, wait) or not reprints:
                    continue
                reprints -= 1
                await link.write(last)
            quiet_until = time.monotonic() + window

    async def _listen(self, link: DeviceLink, naks: asyncio.Queue[None]) -> None:
        while True:
            if NAK in await link.read() and self.dialect == "clinitek50":
                naks.put_nowait(None)


async def _nak_before(naks: asyncio.Queue[None], seconds: float) -> bool:
    try:
        async with asyncio.timeout(max(seconds, 0.0)):
            await naks.get()
    except TimeoutError:
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dialect", choices=("consult120", "clinitek50"), default="consult120",
                        help="printout layout (default consult120)")
    add_strip_arguments(parser, "; the Clinitek prints a 2-digit year, read as 1970-2069")
    parser.add_argument("--nak-window", type=non_negative, default=1.0, metavar="SECONDS",
                        help="clinitek50: a NAK within SECONDS of a report asks for a reprint "
                        "before the next report is printed (default 1)")


def create(args: argparse.Namespace) -> Handler:
    return PrintoutUrineDevice(args).serve
