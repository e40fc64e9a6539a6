"""GRBL 1.1h on a serial line: ``medge sim grbl --listen tcp://127.0.0.1:PORT`` or ``--pty``.

An independent implementation of GRBL's serial side (``serial.c`` and ``protocol.c``): bytes
from the host land in a 128-byte RX ring buffer (127 usable; overflowing bytes are dropped and
counted in ``machine.rx_overflows``), real-time bytes (``?`` ``!`` ``~`` 0x18 and everything
>= 0x80) are filtered out before line assembly and acted on at once, and lines are cleaned
(spaces and comments dropped, upper-cased, 79 significant characters at most, else
``error:11``) before :class:`~firmware_sim.grbl_machine.GrblMachine` runs them. A motion line
waits for a free planner block before its ``ok``, exactly like the firmware, so RX fills up
when a host streams faster than the stage moves.

Every new host connection is a power-up (opening a USB serial port resets an Arduino): step
counters restart at 0 while the mechanics stay where they were, and the banner is printed.
The controller state and mechanics live in :mod:`firmware_sim.grbl_machine`
(``GrblMachine.true_position_um()`` and ``GrblMachine.is_moving`` for the virtual camera).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from firmware_sim.grbl_machine import (
    GRBL_DEFAULTS,
    LINE_BUFFER_SIZE,
    RIG_DEFAULTS,
    RX_BUFFER_SIZE,
    Busy,
    GrblMachine,
)
from firmware_sim.link import DeviceLink, Handler, HostDisconnected, SimulatorServer

HELP = "GRBL 1.1h motion controller driving an XYZ microscope stage (with backlash)"

SOFT_RESET, JOG_CANCEL = 0x18, 0x85
OVERFLOWED = "\x00"
"""Marks a line that overflowed the line buffer (no real line can contain NUL)."""


class SerialLoop:
    """GRBL's serial ISR and main loop for one host connection."""

    def __init__(self, machine: GrblMachine, link: DeviceLink) -> None:
        self.machine = machine
        self.link = link
        self.rx = bytearray()
        self._outbox = bytearray()
        self._out_ready = asyncio.Event()
        self._line = bytearray()
        self._overflow = False
        self._comment: str | None = None
        self._blocked: tuple[str, Busy, int] | None = None
        self._unblock = asyncio.Event()

    async def run(self) -> None:
        self.machine.attach(self._send)
        self.machine.power_cycle()
        self.machine.boot()
        tasks = [asyncio.create_task(self._write_loop()), asyncio.create_task(self._main_loop())]
        try:
            while True:
                for byte in await self.link.read():
                    self._on_byte(byte)
        except HostDisconnected:
            pass
        finally:
            self.machine.attach(lambda line: None)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, HostDisconnected):
                    await task

    # -- output ----------------------------------------------------------------------------

    def _send(self, line: str) -> None:
        self._outbox += line.encode("ascii") + b"\r\n"
        self._out_ready.set()

    async def _write_loop(self) -> None:
        while True:
            await self._out_ready.wait()
            await self.machine.replies_flowing.wait()
            data = bytes(self._outbox)
            self._outbox.clear()
            self._out_ready.clear()
            await self.link.write(data)

    # -- serial ISR: real-time bytes and the RX ring buffer --------------------------------

    def _on_byte(self, byte: int) -> None:
        machine = self.machine
        if byte == SOFT_RESET:
            machine.soft_reset()
            self.rx.clear()
            self._line.clear()
            self._overflow = False
            self._comment = None
            self._blocked = None
        elif byte == ord("?"):
            report = machine.status_report(RX_BUFFER_SIZE - len(self.rx))
            if report is not None:
                self._send(report)
        elif byte == ord("!"):
            machine.feed_hold()
        elif byte == ord("~"):
            machine.cycle_start()
        elif byte == JOG_CANCEL:
            machine.jog_cancel()
        elif byte >= 0x80:
            pass  # overrides, safety door, spindle/coolant toggles: accepted, no effect here
        elif len(self.rx) >= RX_BUFFER_SIZE - 1:
            machine.rx_overflows += 1  # the ring buffer is full: the byte is lost
        else:
            self.rx.append(byte)
            machine.max_rx_used = max(machine.max_rx_used, len(self.rx))
            self._pump()

    # -- main loop: line assembly and execution --------------------------------------------

    def _pump(self) -> None:
        """Run buffered lines until one has to wait. GRBL's main loop drains the RX buffer far
        faster than 115200 baud fills it, so bytes only pile up while a line waits."""
        while self._blocked is None and self.rx and not self.machine.critical:
            line = self._assemble(self.rx.pop(0))
            if line is None:
                continue
            if line == OVERFLOWED:
                self._send("error:11")
                continue
            result = self.machine.execute_line(line)
            if isinstance(result, Busy):
                self._blocked = (line, result, self.machine.resets)
                self._unblock.set()
            else:
                for reply in result:
                    self._send(reply)

    async def _main_loop(self) -> None:
        """Finish the line that waits (planner full, homing), then drain the RX buffer."""
        machine = self.machine
        while True:
            await self._unblock.wait()
            self._unblock.clear()
            while self._blocked is not None:
                line, busy, generation = self._blocked
                await self._wait_for_machine()
                if machine.resets != generation:
                    break  # a reset discarded the line (and cleared _blocked)
                if busy is Busy.HOMING:
                    if not machine.homing_finished():
                        continue
                    replies = ["ok"]
                else:
                    result = machine.execute_line(line)
                    if isinstance(result, Busy):
                        continue
                    replies = result
                self._blocked = None
                for reply in replies:
                    self._send(reply)
            self._pump()

    def _assemble(self, byte: int) -> str | None:
        """Feed one byte to the line assembler (protocol.c); return a finished line."""
        char = chr(byte)
        if char in "\r\n":
            line = OVERFLOWED if self._overflow else self._line.decode("ascii")
            self._line.clear()
            self._overflow = False
            self._comment = None
            return line
        if self._comment == "(":
            if char == ")":
                self._comment = None
        elif self._comment == ";" or char <= " " or char == "/":
            pass
        elif char in "(;":
            self._comment = char
        elif len(self._line) >= LINE_BUFFER_SIZE - 1:
            self._overflow = True
        else:
            self._line.append(ord(char.upper()))
        return None

    async def _wait_for_machine(self) -> None:
        """Wait for a real-time event or the next block/homing end, whichever comes first."""
        self.machine.changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.machine.seconds_until_event()):
                await self.machine.changed.wait()


def serve(machine: GrblMachine) -> Handler:
    """The ``handler(link)`` putting ``machine`` on a serial line."""

    async def handler(link: DeviceLink) -> None:
        await SerialLoop(machine, link).run()

    return handler


# -- medge sim grbl ------------------------------------------------------------------------


def _backlash(text: str) -> tuple[float, float, float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected UM or X,Y,Z in µm") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 or 3 values >= 0 (µm)")
    return (values[0], values[1], values[2])


def _setting(text: str) -> tuple[int, float]:
    number, _, value = text.removeprefix("$").partition("=")
    try:
        parsed = (int(number), float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N=VALUE, e.g. 110=800") from None
    if parsed[0] not in GRBL_DEFAULTS:
        raise argparse.ArgumentTypeError(f"{text!r}: GRBL 1.1h has no setting ${parsed[0]}")
    return parsed


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("GRBL stage")
    group.add_argument("--homing", action=argparse.BooleanOptionalAction, default=True,
                       help="homing switches ($22); with homing GRBL boots in Alarm "
                            "(default: on)")
    group.add_argument("--soft-limits", action=argparse.BooleanOptionalAction, default=True,
                       help="soft limits ($20; needs homing) (default: on)")
    group.add_argument("--backlash-um", type=_backlash, default=(20.0, 20.0, 10.0),
                       metavar="UM|X,Y,Z", help="mechanical backlash per axis in µm "
                       "(default: 20,20,10)")
    group.add_argument("--time-scale", type=_positive, default=1.0, metavar="K",
                       help="run motion K times faster than real time (default: 1, real time)")
    group.add_argument("--setting", type=_setting, action="append", default=[], metavar="N=V",
                       help="override a $N setting of the rig, e.g. --setting 110=800 "
                            "(repeatable; rig defaults: 1 µm steps, 75x50x10 mm travel, "
                            "600/600/120 mm/min, 50/50/20 mm/s²)")
    group.add_argument("--spurious-reset-every", type=_positive, default=None, metavar="S",
                       help="fault: reboot the controller every S seconds (default: never)")


def create(args: argparse.Namespace) -> Handler:
    settings = dict(RIG_DEFAULTS)
    settings[22] = 1 if args.homing else 0
    settings[20] = 1 if (args.soft_limits and args.homing) else 0
    settings.update(dict(args.setting))
    machine = GrblMachine(settings, time_scale=args.time_scale, backlash_um=args.backlash_um)
    args.grbl_machine = machine
    return serve(machine)


async def background(args: argparse.Namespace, server: SimulatorServer) -> None:
    if args.spurious_reset_every is None:
        return
    machine: GrblMachine = args.grbl_machine
    while True:
        await asyncio.sleep(args.spurious_reset_every)
        machine.spurious_reset()
