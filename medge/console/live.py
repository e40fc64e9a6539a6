"""The live ultrasound image for the console page: the newest frame of ``{robot}/state/us``.

One slot, no queue: each frame replaces the previous one, and the page pulls the newest at its
own display rate, so a slow browser skips frames instead of falling behind (``skipped`` counts
the frames replaced before anyone looked at them). A payload that is not a live-view message
(docs/ultrasound.md, "Live view") is refused and counted with the reason; it never replaces a
good frame and never raises into the MQTT link.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import structlog

from daemons.manipulator.ultrasound import age_ms, parse_live
from medge.console.settings import is_finite_number

MAX_FRAME_BYTES = 4 * 1024 * 1024
"""Far above a 1024×768 JPEG (~100 KB); anything bigger is not a live-view frame."""
JPEG_START = b"\xff\xd8"

log = structlog.get_logger(__name__)


class BadFrame(ValueError):
    """A live-view payload that cannot be shown; the message names the field."""


@dataclass(frozen=True)
class LiveFrame:
    header: dict[str, Any]
    jpeg: bytes
    received_at: float
    """``time.monotonic()`` at receipt: "no image for > 2 s" is judged on our own clock."""


class LiveImage:
    """The newest valid live-view frame and what happened to the others."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self.frame: LiveFrame | None = None
        self.received = 0
        self.refused = 0
        self.skipped = 0
        self.served = 0
        self.last_error: str | None = None
        self._served_seq: int | None = None

    async def on_message(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        self.accept(bytes(payload) if isinstance(payload, bytes | bytearray) else b"")

    def accept(self, payload: bytes) -> bool:
        """Keep ``payload`` as the newest frame if it is a valid one; count it either way."""
        try:
            header, jpeg = check_frame(payload)
        except BadFrame as exc:
            self.refused += 1
            if str(exc) != self.last_error:  # once per kind of fault, not 10 lines a second
                log.warning("console.us_frame_refused", error=str(exc))
            self.last_error = str(exc)
            return False
        if self.frame is not None and self.frame.header["seq"] != self._served_seq:
            self.skipped += 1
        self.frame = LiveFrame(header, jpeg, self.clock())
        self.received += 1
        return True

    def take(self) -> tuple[dict[str, Any], bytes] | None:
        """The newest frame for the page: its header (with its age now) and the JPEG."""
        frame = self.frame
        if frame is None:
            return None
        if frame.header["seq"] != self._served_seq:
            self._served_seq = frame.header["seq"]
            self.served += 1
        return self._described(frame), frame.jpeg

    def summary(self) -> dict[str, Any]:
        """What the state stream tells the page (no image bytes)."""
        frame = self.frame
        return {
            "frame": None if frame is None else self._described(frame),
            "received": self.received, "refused": self.refused, "skipped": self.skipped,
            "served": self.served, "error": self.last_error,
        }

    def _described(self, frame: LiveFrame) -> dict[str, Any]:
        header = frame.header
        return {
            "seq": header["seq"], "width": header["width"], "height": header["height"],
            "pose": header.get("pose"), "force_n": header.get("force_n"),
            "recording": header.get("recording"),
            "age_ms": round(age_ms(header, self.wall_clock()), 1),
            "received_age_ms": round((self.clock() - frame.received_at) * 1000.0, 1),
        }


def check_frame(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """A live-view message → (header, JPEG); :class:`BadFrame` naming what is wrong."""
    if len(payload) > MAX_FRAME_BYTES:
        raise BadFrame(f"live frame: {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        header, jpeg = parse_live(payload)
    except (ValueError, RecursionError) as exc:
        raise BadFrame(f"live frame header: {exc}") from None
    _integer(header, "seq", 0)
    _integer(header, "width", 1)
    _integer(header, "height", 1)
    for key in ("captured_at", "published_at", "age_ms"):
        _finite(header.get(key), key)
    pose = header.get("pose")
    if pose is not None:
        if not isinstance(pose, dict):
            raise BadFrame(f"live frame pose: must be an object or null, got {pose!r:.60}")
        for key, length in (("tip", 3), ("tilt", 2)):
            values = pose.get(key)
            if not isinstance(values, list) or len(values) != length:
                raise BadFrame(f"live frame pose.{key}: must be {length} numbers")
            for value in values:
                _finite(value, f"pose.{key}")
    if header.get("force_n") is not None:
        _finite(header["force_n"], "force_n")
    recording = header.get("recording")
    if recording is not None and not isinstance(recording, str):
        raise BadFrame(f"live frame recording: must be a string or null, got {recording!r:.60}")
    if not jpeg.startswith(JPEG_START):
        raise BadFrame("live frame image: not a JPEG (no start-of-image marker)")
    return header, jpeg


def _finite(value: object, key: str) -> float:
    if not is_finite_number(value):
        raise BadFrame(f"live frame {key}: must be a finite number, got {value!r:.60}")
    return float(value)


def _integer(header: dict[str, Any], key: str, minimum: int) -> int:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadFrame(f"live frame {key}: must be an integer ≥ {minimum}, got {value!r:.60}")
    return value
