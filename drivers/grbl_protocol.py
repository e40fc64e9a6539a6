"""GRBL 1.1 host-side line protocol: classifying and parsing what the controller prints.

Pure functions and tables, no I/O, so the parser is tested against the published wire
examples on its own. Meanings of ``error:N`` and ``ALARM:N`` follow GRBL's interface.md.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from drivers.stage import StageError

DEFAULT_RX_BUFFER = 128
LINE_MAX_SIGNIFICANT = 79
"""GRBL's line buffer is 80 bytes with a terminator: 79 kept characters at most (error:11)."""

ERROR_MEANINGS: dict[int, str] = {
    1: "G-code words consist of a letter and a value; letter was not found",
    2: "bad number format: missing or invalid numeric value",
    3: "'$' system command was not recognized or supported",
    4: "negative value received for an expected positive value",
    5: "homing cycle is not enabled via settings ($22)",
    6: "minimum step pulse time must be greater than 3 µs",
    7: "EEPROM read failed; settings restored to defaults",
    8: "'$' command cannot be used unless GRBL is IDLE",
    9: "G-code locked out during alarm or jog state",
    10: "soft limits cannot be enabled without homing also enabled",
    11: "max characters per line exceeded; line was not processed",
    12: "'$' setting value exceeds the maximum step rate supported",
    13: "safety door detected as opened and door state initiated",
    14: "build info or startup line exceeded the EEPROM line length limit",
    15: "jog target exceeds machine travel; command ignored",
    16: "jog command with no '=' or containing prohibited G-code",
    17: "laser mode requires PWM output",
    20: "unsupported or invalid G-code command found in block",
    21: "more than one G-code command from the same modal group found in block",
    22: "feed rate has not yet been set or is undefined",
    23: "G-code command in block requires an integer value",
    24: "two G-code commands that both require the use of the XYZ axis words",
    25: "a G-code word was repeated in the block",
    26: "a G-code command implicitly or explicitly requires XYZ axis words in the block",
    27: "N line number value is not within the valid range of 1 - 9,999,999",
    28: "a G-code command was sent, but is missing some required P or L value words",
    29: "GRBL supports six work coordinate systems G54-G59; G59.1-G59.3 are not supported",
    30: "the G53 G-code command requires either a G0 seek or G1 feed motion mode",
    31: "there are unused axis words in the block and G80 motion mode cancel is active",
    32: "a G2 or G3 arc was commanded but there are no XYZ axis words in the selected plane",
    33: "the motion command has an invalid target",
    34: "a G2 or G3 arc, traced with the radius definition, had a mathematical error",
    35: "a G2 or G3 arc, traced with the offset definition, is missing the IJK offset word",
    36: "there are unused, leftover G-code words that aren't used by any command in the block",
    37: "the G43.1 dynamic tool length offset command cannot apply an offset to a non-tool axis",
    38: "tool number greater than max supported value",
}

ALARM_MEANINGS: dict[int, str] = {
    1: "hard limit triggered; position likely lost, re-homing is highly recommended",
    2: "soft limit: motion target exceeds machine travel; position retained",
    3: "reset while in motion; position lost, re-homing is highly recommended",
    4: "probe fail: probe not in the expected initial state before starting the probe cycle",
    5: "probe fail: probe did not contact the workpiece within the programmed travel",
    6: "homing fail: reset during active homing cycle",
    7: "homing fail: safety door was opened during active homing cycle",
    8: "homing fail: cycle failed to clear limit switch when pulling off",
    9: "homing fail: could not find limit switch within search distance",
}

POSITION_LOST_ALARMS = frozenset({1, 3, 6, 7, 8, 9})
"""Alarms after which the machine position cannot be trusted until homed again."""


class ProtocolError(StageError):
    """The controller printed something that does not parse."""


class NotGrblError(StageError):
    """The device on the line is not a GRBL 1.1 controller."""


class GrblError(StageError):
    """``error:N`` for a line the controller refused."""

    def __init__(self, code: int, line: str = "") -> None:
        self.code = code
        self.meaning = ERROR_MEANINGS.get(code, "unknown error code")
        self.line = line
        where = f" for {line!r}" if line else ""
        super().__init__(f"error:{code}{where}: {self.meaning}")


class GrblAlarm(StageError):
    """``ALARM:N``: the controller stopped and locked out G-code."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.meaning = ALARM_MEANINGS.get(code, "unknown alarm code")
        self.position_lost = code in POSITION_LOST_ALARMS
        super().__init__(f"ALARM:{code}: {self.meaning}")


class GrblReset(StageError):
    """The controller reset (or rebooted) before answering; queued lines were discarded."""


class LineTooLong(StageError, ValueError):
    """The line has more significant characters than GRBL's line buffer holds."""


class Kind(enum.Enum):
    OK = "ok"
    ERROR = "error"
    ALARM = "alarm"
    STATUS = "status"
    MESSAGE = "message"
    """``[MSG:...]`` feedback message."""
    REPORT = "report"
    """Any other ``[...]`` line (``VER``, ``OPT``, ``GC``, ``G54``, ``HLP``...)."""
    SETTING = "setting"
    BANNER = "banner"
    STARTUP = "startup"
    """``>line:ok`` echo of an executed startup line."""
    OTHER = "other"


BANNER_RE = re.compile(r"Grbl (\d+\.\d+[a-z]?) \[.*\]")
_SETTING_RE = re.compile(r"\$(\d+)=(-?\d+(?:\.\d*)?)")
_CODE_RE = re.compile(r"(?:error|ALARM):(\d+)")


def classify(line: str) -> Kind:
    """Kind of one received line (without its line end)."""
    if line == "ok":
        return Kind.OK
    if line.startswith("error:"):
        return Kind.ERROR
    if line.startswith("ALARM:"):
        return Kind.ALARM
    if line.startswith("<") and line.endswith(">"):
        return Kind.STATUS
    if line.startswith("[MSG:") and line.endswith("]"):
        return Kind.MESSAGE
    if line.startswith("[") and line.endswith("]"):
        return Kind.REPORT
    if _SETTING_RE.fullmatch(line):
        return Kind.SETTING
    if BANNER_RE.fullmatch(line):
        return Kind.BANNER
    if line.startswith(">") and line.endswith(":ok"):
        return Kind.STARTUP
    return Kind.OTHER


def parse_code(line: str) -> int:
    """The N of ``error:N`` or ``ALARM:N``."""
    match = _CODE_RE.fullmatch(line)
    if match is None:
        raise ProtocolError(f"malformed error/alarm line {line!r}")
    return int(match[1])


def parse_banner(line: str) -> str:
    """The version in the banner; refuse anything but GRBL 1.1."""
    match = BANNER_RE.fullmatch(line)
    if match is None:
        raise NotGrblError(f"not a GRBL banner: {line[:60]!r}")
    if not match[1].startswith("1.1"):
        raise NotGrblError(f"GRBL {match[1]} is not supported: this driver speaks GRBL 1.1")
    return match[1]


def parse_setting(line: str) -> tuple[int, float]:
    match = _SETTING_RE.fullmatch(line)
    if match is None:
        raise ProtocolError(f"malformed setting line {line!r}")
    return int(match[1]), float(match[2])


@dataclass(frozen=True)
class BuildInfo:
    version: str
    options: str
    planner_blocks: int | None
    rx_buffer_bytes: int | None


def parse_build_info(lines: list[str]) -> BuildInfo:
    """``$I`` reply: ``[VER:1.1h.20190830:]`` and (1.1) ``[OPT:V,15,128]``."""
    version, options, blocks, rx = "", "", None, None
    for line in lines:
        if line.startswith("[VER:") and line.endswith("]"):
            version = line[5:-1].split(":", 1)[0]
        elif line.startswith("[OPT:") and line.endswith("]"):
            parts = line[5:-1].split(",")
            options = parts[0]
            try:
                if len(parts) >= 3:
                    blocks, rx = int(parts[1]), int(parts[2])
            except ValueError:
                raise ProtocolError(f"malformed build options {line!r}") from None
            if rx is not None and not 16 <= rx <= 65536:
                raise ProtocolError(f"implausible RX buffer size in {line!r}")
    if not version:
        raise ProtocolError(f"$I reply without [VER:...]: {lines!r}")
    return BuildInfo(version, options, blocks, rx)


Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Status:
    """One ``<...>`` report. Positions in mm; the other frame is filled in from ``wco``."""

    state: str
    substate: int | None
    mpos: Triple | None
    wpos: Triple | None
    wco: Triple | None = None
    planner_free: int | None = None
    rx_free: int | None = None
    line_number: int | None = None
    feed: float | None = None
    spindle: float | None = None
    pins: str = ""
    overrides: tuple[int, int, int] | None = None
    accessories: str = ""

    @property
    def is_idle(self) -> bool:
        return self.state == "Idle"


STATES = frozenset({"Idle", "Run", "Hold", "Jog", "Alarm", "Door", "Check", "Home", "Sleep"})


def _floats(text: str, count: int, line: str) -> tuple[float, ...]:
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ProtocolError(f"bad number in status {line!r}") from None
    if len(values) < count or not all(math.isfinite(v) for v in values):
        raise ProtocolError(f"expected {count} values in {text!r} of {line!r}")
    return values


def _triple(text: str, line: str) -> Triple:
    values = _floats(text, 3, line)
    return (values[0], values[1], values[2])


def parse_status(line: str, wco: Triple | None = None) -> Status:
    """Parse a status report; ``wco`` is the last known work offset (sent only now and then)."""
    if not (line.startswith("<") and line.endswith(">")):
        raise ProtocolError(f"not a status report: {line!r}")
    fields = line[1:-1].split("|")
    state, _, sub = fields[0].partition(":")
    if state not in STATES:
        raise ProtocolError(f"unknown machine state {fields[0]!r} in {line!r}")
    substate = None
    if sub:
        if not sub.isascii() or not sub.isdigit():
            raise ProtocolError(f"bad substate in {line!r}")
        substate = int(sub)
    mpos = wpos = None
    planner_free = rx_free = line_number = None
    feed = spindle = None
    pins = accessories = ""
    overrides = None
    for item in fields[1:]:
        name, sep, text = item.partition(":")
        if not sep:
            raise ProtocolError(f"field without ':' ({item!r}) in {line!r}")
        if name == "MPos":
            mpos = _triple(text, line)
        elif name == "WPos":
            wpos = _triple(text, line)
        elif name == "WCO":
            wco = _triple(text, line)
        elif name == "Bf":
            blocks, rx = _floats(text, 2, line)[:2]
            planner_free, rx_free = int(blocks), int(rx)
        elif name == "Ln":
            line_number = int(_floats(text, 1, line)[0])
        elif name == "FS":
            feed, spindle = _floats(text, 2, line)[:2]
        elif name == "F":
            feed = _floats(text, 1, line)[0]
        elif name == "Pn":
            pins = text
        elif name == "Ov":
            ov = _floats(text, 3, line)
            overrides = (int(ov[0]), int(ov[1]), int(ov[2]))
        elif name == "A":
            accessories = text
        # unknown fields (grblHAL extensions) are ignored on purpose
    if mpos is None and wpos is None:
        raise ProtocolError(f"status without MPos/WPos: {line!r}")
    if wco is not None:
        if mpos is None and wpos is not None:
            mpos = (wpos[0] + wco[0], wpos[1] + wco[1], wpos[2] + wco[2])
        elif wpos is None and mpos is not None:
            wpos = (mpos[0] - wco[0], mpos[1] - wco[1], mpos[2] - wco[2])
    return Status(
        state, substate, mpos, wpos, wco, planner_free, rx_free, line_number, feed, spindle,
        pins, overrides, accessories,
    )


def significant_length(line: str) -> int:
    """Characters GRBL keeps from ``line`` (no spaces, controls or comments)."""
    count, comment = 0, ""
    for char in line:
        if comment == "(":
            comment = "" if char == ")" else comment
        elif comment == ";" or char <= " " or char == "/":
            continue
        elif char in "(;":
            comment = char
        else:
            count += 1
    return count
