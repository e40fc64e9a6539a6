"""3Dconnexion SpaceMouse input read on the Python side through Linux hidraw.

Report layouts (protocols.md §12, after spacenavd and pyspacemouse): report 1 carries the
translation (or all six axes on "combined" devices), report 2 the rotation, report 3 the
buttons. Axes are signed 16-bit little-endian counts with full scale ±350; pyspacemouse's sign
mapping (y, z, pitch, roll inverted) turns them into a right-handed device frame. The latest
report of each kind wins: the console samples the device at its own setpoint rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

VENDOR_IDS = frozenset({0x046D, 0x256F})
COMBINED_PRODUCT_IDS = frozenset({0xC631, 0xC632, 0xC638, 0xC633, 0xC62E, 0xC62F, 0xC63A,
                                  0xC652})
"""Products sending all six axes in report 1 (Enterprise, Wireless, Pro Wireless, receivers)."""
SPLIT_PRODUCT_IDS = frozenset({0xC625, 0xC626, 0xC627, 0xC628, 0xC629, 0xC62B, 0xC635, 0xC636,
                               0xC641})
FULL_SCALE = 350.0
SIGNS = (1.0, -1.0, -1.0, -1.0, -1.0, 1.0)
"""x, y, z, pitch, roll, yaw (pyspacemouse)."""
MAX_REPORT = 64
Axes = tuple[float, float, float, float, float, float]


class SpaceMouseError(Exception):
    """A report that does not follow the layout, or a device that cannot be opened."""


@dataclass(frozen=True)
class SpaceMouseState:
    """Six normalized axes in -1..1 (x, y, z, pitch, roll, yaw) and the button bitmask."""

    axes: Axes = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    buttons: int = 0


def apply_report(state: SpaceMouseState, report: bytes, combined: bool) -> SpaceMouseState:
    """The device state after one input report (byte 0 = report ID)."""
    if not report:
        raise SpaceMouseError("empty report")
    report_id, data = report[0], report[1:]
    if report_id == 3:
        if not data:
            raise SpaceMouseError(f"button report without data: {report.hex()}")
        return SpaceMouseState(state.axes, int.from_bytes(data[:4], "little"))
    if report_id == 1:
        first = 0
        count = 6 if combined else 3
    elif report_id == 2 and not combined:
        first, count = 3, 3
    else:
        return state  # LED feedback, battery and vendor reports carry no motion
    if len(data) < 2 * count:
        raise SpaceMouseError(f"report {report_id} has {len(data)} data bytes, needs "
                              f"{2 * count}: {report.hex()}")
    values = list(state.axes)
    for offset, count_value in enumerate(struct.unpack_from(f"<{count}h", data)):
        axis = first + offset
        values[axis] = SIGNS[axis] * max(-1.0, min(1.0, count_value / FULL_SCALE))
    return SpaceMouseState((values[0], values[1], values[2], values[3], values[4], values[5]),
                           state.buttons)


@dataclass(frozen=True)
class HidrawDevice:
    path: Path
    vendor: int
    product: int

    @property
    def combined(self) -> bool:
        return self.product in COMBINED_PRODUCT_IDS


_HID_ID = re.compile(r"^HID_ID=([0-9A-Fa-f]+):([0-9A-Fa-f]+):([0-9A-Fa-f]+)$", re.MULTILINE)


def find_devices(sys_root: Path = Path("/sys/class/hidraw"),
                 dev_root: Path = Path("/dev")) -> list[HidrawDevice]:
    """SpaceMice among the hidraw nodes, by the USB IDs in their uevent."""
    found = []
    for node in sorted(sys_root.glob("hidraw*")):
        with contextlib.suppress(OSError):
            match = _HID_ID.search((node / "device" / "uevent").read_text())
            if match is None:
                continue
            vendor, product = int(match.group(2), 16), int(match.group(3), 16)
            if vendor in VENDOR_IDS and product in COMBINED_PRODUCT_IDS | SPLIT_PRODUCT_IDS:
                found.append(HidrawDevice(dev_root / node.name, vendor, product))
    return found


class SpaceMouseReader:
    """``async with SpaceMouseReader(path, combined)``: ``state`` follows the device.

    Reads are non-blocking on the event loop (``add_reader``); an unplugged device or a bad
    report is noted in ``error`` and zeroes the axes — a device that stopped talking must not
    keep the last deflection alive.
    """

    def __init__(self, path: Path, combined: bool) -> None:
        self.path = path
        self.combined = combined
        self.state = SpaceMouseState()
        self.reports = 0
        self.error: str | None = None
        self._fd: int | None = None

    async def __aenter__(self) -> SpaceMouseReader:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise SpaceMouseError(f"cannot open {self.path}: {exc.strerror}") from None
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            report = os.read(self._fd, MAX_REPORT)
        except BlockingIOError:
            return
        except OSError as exc:
            report, self.error = b"", f"{self.path}: {exc.strerror}"
        if not report:
            self.error = self.error or f"{self.path}: device gone"
            self.state = SpaceMouseState()
            self._close()
            return
        try:
            self.state = apply_report(self.state, report, self.combined)
            self.reports += 1
        except SpaceMouseError as exc:
            self.error = str(exc)
            self.state = SpaceMouseState(buttons=self.state.buttons)
