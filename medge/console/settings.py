"""Per-user console settings: dead-band, speed scaling, per-axis inversion, and the display rate
of the live ultrasound image.

Stored as JSON under the user's config directory (``$XDG_CONFIG_HOME/medge/console/USER.json``)
so that each sonographer finds the console as they left it. Every input (keyboard, gamepad,
SpaceMouse) goes through :meth:`InputSettings.twist`, one mapping for all devices.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeGuard

from daemons.manipulator.kinematics import Twist
from daemons.manipulator.teleop_protocol import check_level

AXES = ("x", "y", "z", "rx", "ry", "rz")
MAX_LINEAR_M_S = 0.05
MAX_ANGULAR_RAD_S = 0.5
MAX_US_DISPLAY_HZ = 30.0
"""The grabber's rate: the page cannot show frames the daemon does not send."""


class SettingsError(ValueError):
    """A settings value out of range or of the wrong type; names the key (and file)."""


def is_finite_number(value: object) -> TypeGuard[int | float]:
    """A JSON number the console can use: not a bool (JSON true is no number), not NaN/inf."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _check_range(key: str, value: object, low: float, high: float) -> float:
    if not is_finite_number(value) or not low <= value <= high:
        raise SettingsError(f"{key}: must be a number in {low}..{high}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class InputSettings:
    deadband: float = 0.08
    """Fraction of full deflection ignored around centre (SpaceMouse, gamepad sticks)."""
    linear_m_s: float = 0.02
    """Probe speed at full deflection."""
    angular_rad_s: float = 0.2
    invert: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(AXES, False))
    us_display_hz: float = 10.0
    """Live ultrasound frames the page shows per second (it skips the rest)."""

    def __post_init__(self) -> None:
        _check_range("deadband", self.deadband, 0.0, 0.5)
        _check_range("linear_m_s", self.linear_m_s, 0.0, MAX_LINEAR_M_S)
        _check_range("angular_rad_s", self.angular_rad_s, 0.0, MAX_ANGULAR_RAD_S)
        _check_range("us_display_hz", self.us_display_hz, 1.0, MAX_US_DISPLAY_HZ)
        if not isinstance(self.invert, dict) or set(self.invert) - set(AXES) \
                or not all(isinstance(v, bool) for v in self.invert.values()):
            raise SettingsError(f"invert: must map axes {list(AXES)} to true/false, "
                                f"got {self.invert!r}")
        object.__setattr__(self, "invert", {axis: self.invert.get(axis, False) for axis in AXES})

    @classmethod
    def from_dict(cls, document: object) -> InputSettings:
        if not isinstance(document, dict):
            raise SettingsError("settings: must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(document) - known)
        if unknown:
            raise SettingsError(f"{unknown[0]}: unknown setting (known: {sorted(known)})")
        try:
            return cls(**document)
        except TypeError as exc:
            raise SettingsError(f"settings: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def twist(self, axes: Sequence[float]) -> Twist:
        """Six deflections in -1..1 (x, y, z, rx, ry, rz; probe frame) → a probe twist."""
        if len(axes) != len(AXES):
            raise SettingsError(f"axes: need {len(AXES)} values, got {len(axes)}")
        shaped = []
        for axis, value in zip(AXES, axes, strict=True):
            value = max(-1.0, min(1.0, _check_range(f"axes.{axis}", value, -math.inf, math.inf)))
            magnitude = max(0.0, (abs(value) - self.deadband) / (1.0 - self.deadband))
            sign = -1.0 if (value < 0) != self.invert[axis] else 1.0
            shaped.append(sign * magnitude if magnitude else 0.0)
        lin, ang = self.linear_m_s, self.angular_rad_s
        return Twist((shaped[0] * lin, shaped[1] * lin, shaped[2] * lin),
                     (shaped[3] * ang, shaped[4] * ang, shaped[5] * ang))


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "medge" / "console"


class SettingsStore:
    """One user's settings file; a missing file means the defaults."""

    def __init__(self, user: str, directory: Path | None = None) -> None:
        check_level("user", user)
        self.path = (directory or config_dir()) / f"{user}.json"

    def load(self) -> InputSettings:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return InputSettings()
        except OSError as exc:
            raise SettingsError(f"{self.path}: {exc.strerror}") from None
        try:
            return InputSettings.from_dict(json.loads(text))
        except (ValueError, RecursionError) as exc:
            raise SettingsError(f"{self.path}: {exc}") from None

    def save(self, settings: InputSettings) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(settings.as_dict(), indent=2) + "\n")
        partial.replace(self.path)


def probe_to_base(twist: Twist, tilt_a: float, tilt_b: float) -> Twist:
    """Express a probe-frame twist in the base frame the daemon takes: R = Rx(a)·Ry(b), the
    holder's own tilt order (kinematics.probe_axis), so "forward" follows the probe."""

    def rotate(v: tuple[float, float, float]) -> tuple[float, float, float]:
        ca, sa, cb, sb = math.cos(tilt_a), math.sin(tilt_a), math.cos(tilt_b), math.sin(tilt_b)
        wx, wy, wz = v[0] * cb + v[2] * sb, v[1], -v[0] * sb + v[2] * cb
        return wx, wy * ca - wz * sa, wy * sa + wz * ca

    return Twist(rotate(twist.linear), rotate(twist.angular))
