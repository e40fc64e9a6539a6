"""Abstract XYZ stage, python-microscope style: public methods wrap ``_do_*`` hooks.

The base class owns what does not depend on the firmware: argument checks, soft limits
checked before anything is sent, refusing motion while the position is lost, and backlash
compensation (each axis always makes its final approach from the same side, as the
OpenFlexure ``BaseStage`` does). A firmware driver (:class:`drivers.grbl.GrblStage`)
implements the hooks. Positions are in micrometres, in the controller's machine frame.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import NamedTuple

AXES = ("x", "y", "z")


class XYZ(NamedTuple):
    x: float
    y: float
    z: float


class StageError(Exception):
    """Base of every stage failure."""


class SoftLimitError(StageError, ValueError):
    """A target lies outside the travel; nothing was sent."""

    def __init__(self, axis: str, value_um: float, low_um: float, high_um: float) -> None:
        self.axis = axis
        self.value_um = value_um
        super().__init__(
            f"{axis} = {value_um:.1f} µm is outside the travel [{low_um:.1f}, {high_um:.1f}] µm"
        )


class PositionLostError(StageError):
    """The controller's position cannot be trusted (reset in motion, reboot, replug)."""


class StageDisconnected(StageError, ConnectionError):
    """The link to the controller is down (the driver may be reconnecting)."""


class StageTimeout(StageError, TimeoutError):
    """The controller stopped answering."""


@dataclass(frozen=True)
class AxisBacklash:
    """Backlash compensation of one axis."""

    enabled: bool = True
    overshoot_um: float = 50.0
    """How far beyond the target the pre-position lies; must exceed the mechanical backlash."""
    direction: int = +1
    """+1: the final approach is in the + direction (the target is approached from below)."""

    def __post_init__(self) -> None:
        if self.direction not in (-1, 1):
            raise ValueError(f"direction must be +1 or -1, got {self.direction}")
        if not (math.isfinite(self.overshoot_um) and self.overshoot_um >= 0):
            raise ValueError(f"overshoot_um must be a finite value >= 0, got {self.overshoot_um}")


@dataclass(frozen=True)
class Backlash:
    """Per-axis compensation; on by default for X, Y and Z."""

    x: AxisBacklash = field(default_factory=AxisBacklash)
    y: AxisBacklash = field(default_factory=AxisBacklash)
    z: AxisBacklash = field(default_factory=lambda: AxisBacklash(overshoot_um=25.0))

    @classmethod
    def off(cls) -> Backlash:
        disabled = AxisBacklash(enabled=False)
        return cls(disabled, disabled, disabled)

    def axes(self) -> tuple[AxisBacklash, AxisBacklash, AxisBacklash]:
        return (self.x, self.y, self.z)


def plan_approach(
    start: XYZ,
    target: XYZ,
    engaged: tuple[bool, bool, bool],
    backlash: Backlash,
    limits: tuple[XYZ, XYZ] | None = None,
) -> list[XYZ]:
    """The waypoints that reach ``target`` with every compensated axis arriving from its side.

    An axis needs a pre-position when it would move against its approach direction, or when
    its nut is not known to be engaged and the move is shorter than the overshoot. The
    pre-position is clamped to the travel (a target at the very edge gets a shorter run-up).
    """
    waypoint = list(target)
    needed = False
    for i, axis in enumerate(backlash.axes()):
        if not axis.enabled:
            continue
        run = (target[i] - start[i]) * axis.direction
        if run < 0 or (not engaged[i] and run < axis.overshoot_um):
            waypoint[i] = target[i] - axis.direction * axis.overshoot_um
            if limits is not None:
                waypoint[i] = min(max(waypoint[i], limits[0][i]), limits[1][i])
            needed = needed or waypoint[i] != target[i]
    if not needed:
        return [target]
    return [XYZ(*waypoint), target]


class Stage(abc.ABC):
    """An XYZ stage. Subclasses implement the ``_do_*`` hooks; callers use the public API."""

    def __init__(self, backlash: Backlash | None = None) -> None:
        self.backlash = Backlash() if backlash is None else backlash
        self._engaged = (False, False, False)
        self._target: XYZ | None = None

    async def __aenter__(self) -> Stage:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._do_connect()
        self._forget_motion_state()

    async def close(self) -> None:
        await self._do_close()

    def _forget_motion_state(self) -> None:
        """After anything that may have moved the nut: no engagement, no commanded target."""
        self._engaged = (False, False, False)
        self._target = None

    # -- state -----------------------------------------------------------------------------

    @property
    def position_um(self) -> XYZ:
        """The controller's last reported position (step counter, not the carriage)."""
        return self._do_get_position()

    @property
    def position_lost(self) -> bool:
        """True until the stage is re-homed after a reset in motion, a reboot or a replug."""
        return self._do_position_lost()

    @property
    def limits_um(self) -> tuple[XYZ, XYZ] | None:
        """(lower, upper) travel enforced before sending, or None when unknown/disabled."""
        return self._do_get_limits()

    # -- motion ----------------------------------------------------------------------------

    async def home(self) -> None:
        await self._do_home()
        self._forget_motion_state()

    async def move_to(
        self,
        x: float | None = None,
        y: float | None = None,
        z: float | None = None,
        *,
        wait: bool = True,
    ) -> None:
        """Move to an absolute position in µm (None keeps an axis where it is)."""
        start = self._target or self.position_um
        target = XYZ(*(start[i] if v is None else v for i, v in enumerate((x, y, z))))
        await self._move(start, target, wait)

    async def move_by(
        self, dx: float = 0.0, dy: float = 0.0, dz: float = 0.0, *, wait: bool = True
    ) -> None:
        """Move by a relative amount in µm from the last commanded target."""
        start = self._target or self.position_um
        await self._move(start, XYZ(start.x + dx, start.y + dy, start.z + dz), wait)

    async def _move(self, start: XYZ, target: XYZ, wait: bool) -> None:
        self._check_target(target)
        if self.position_lost:
            raise PositionLostError("position lost (reset in motion, reboot or replug): home first")
        waypoints = plan_approach(start, target, self._engaged, self.backlash, self.limits_um)
        self._target = None  # unknown until every waypoint is accepted
        for waypoint in waypoints:
            await self._do_move_absolute(waypoint)
        self._target = target
        x, y, z = self.backlash.axes()
        self._engaged = (x.enabled, y.enabled, z.enabled)
        if wait:
            await self.wait_until_idle()

    async def jog_by(
        self, dx: float = 0.0, dy: float = 0.0, dz: float = 0.0, *, speed_um_s: float
    ) -> None:
        """Start an interactive jog (cancel with :meth:`stop`); the limits are checked first."""
        if not (math.isfinite(speed_um_s) and speed_um_s > 0):
            raise ValueError(f"speed_um_s must be > 0, got {speed_um_s}")
        if not (dx or dy or dz):
            return
        start = self.position_um
        target = XYZ(start.x + dx, start.y + dy, start.z + dz)
        self._check_target(target)
        if self.position_lost:
            raise PositionLostError("position lost: home first")
        self._forget_motion_state()
        await self._do_jog(XYZ(dx, dy, dz), speed_um_s)

    async def wait_until_idle(self, timeout: float | None = None) -> None:
        """Return once the stage has stopped with nothing queued; raise on an alarm."""
        await self._do_wait_until_idle(timeout)

    async def stop(self) -> None:
        """Stop as fast as the mechanics allow and drop queued motion; keep the position."""
        self._forget_motion_state()
        await self._do_stop()

    def _check_target(self, target: XYZ) -> None:
        for axis, value in zip(AXES, target, strict=True):
            if not math.isfinite(value):
                raise ValueError(f"{axis} = {value!r}: not a finite number of µm")
        limits = self.limits_um
        if limits is None:
            return
        for i, axis in enumerate(AXES):
            if not limits[0][i] <= target[i] <= limits[1][i]:
                raise SoftLimitError(axis, target[i], limits[0][i], limits[1][i])

    # -- hooks -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def _do_connect(self) -> None: ...

    @abc.abstractmethod
    async def _do_close(self) -> None: ...

    @abc.abstractmethod
    def _do_get_position(self) -> XYZ: ...

    @abc.abstractmethod
    def _do_position_lost(self) -> bool: ...

    @abc.abstractmethod
    def _do_get_limits(self) -> tuple[XYZ, XYZ] | None: ...

    @abc.abstractmethod
    async def _do_home(self) -> None: ...

    @abc.abstractmethod
    async def _do_move_absolute(self, target: XYZ) -> None:
        """Queue one straight move to ``target`` (µm); return once the controller accepted it."""

    @abc.abstractmethod
    async def _do_jog(self, delta: XYZ, speed_um_s: float) -> None: ...

    @abc.abstractmethod
    async def _do_wait_until_idle(self, timeout: float | None) -> None: ...

    @abc.abstractmethod
    async def _do_stop(self) -> None: ...
