"""Sweep protocols: named probe paths over the patient surface, run under the safety supervisor.

A sweep is an operator like any other: it takes the supervisor's lease under the identity
``sweep.{name}`` and feeds it one enabled absolute-pose setpoint per control cycle (from the
control loop's cycle listener, so it never lags the loop). The supervisor therefore applies
exactly the rules it applies to a remote sonographer — speed, acceleration and jerk limits,
joint and workspace limits, force warn/stop with retraction, E-stop. The sweep never bypasses
it and never retries: whenever the supervisor stops it (E-stop, force limit, lease lost,
unreachable target) the sweep ends with that reason, and the robot is left stopped. While
the supervisor holds the robot for a passing condition (force sensor silent for a moment, force
above the warning level) the path waits instead of running ahead.

Paths (all in the robot base frame, where the registered patient surface is given):

* ``linear``: the tip from ``start`` to ``end`` (x, y) at a fixed tilt, ``press_m`` below the
  surface (the surface height under each point comes from the registered surface points, or
  from ``surface_z_m`` when no registration is available);
* ``fan``: the tip held at ``start`` while the probe tilts about the tip (the remote centre of
  motion) from ``-fan_rad`` to ``+fan_rad`` about the axis given by ``fan_axis``.

A watching doctor may **pause** (the sweep holds its current target, lease kept), **take over**
(the lease passes to the doctor at once — the supervisor carries the motion on without a step —
and the sweep stops feeding setpoints) and **hand back** (the doctor's lease is released, the
sweep re-arms, approaches the point of the path where it was taken over and continues to the
end). A hand back after an E-stop or with the lease elsewhere is refused: the sweep then ends.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import structlog

from daemons.manipulator.control import ControlLoop
from daemons.manipulator.kinematics import ProbePose
from daemons.manipulator.supervisor import ArmState, CycleOutput, Reason, Setpoint
from drivers.dynamixel import ServoState
from medge.config import bounds

log = structlog.get_logger(__name__)

ARRIVED_M = 0.001
ARRIVED_RAD = 0.01
SURFACE_RADIUS_M = 0.01
"""Registered surface points within this distance (in x, y) give the height under a point."""
SWEEP_OPERATOR_PREFIX = "sweep."
STOP_REASONS = frozenset({Reason.FORCE_LIMIT, Reason.UNREACHABLE_TARGET, Reason.COMMAND_LOST})
HOLD_REASONS = frozenset({Reason.FORCE_SENSOR_SILENT, Reason.FORCE_SENSOR_IMPLAUSIBLE,
                          Reason.FORCE_WARNING})
"""The supervisor holds the robot still (or slows it) for these: the path waits for it."""


class SweepError(RuntimeError):
    """A sweep cannot start or a doctor's request cannot be honoured (``reason`` says why)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SweepSpec:
    kind: Literal["linear", "fan"] = "linear"
    start: tuple[float, float] = (-0.03, 0.0)
    """Tip x, y (m, robot base frame) where the sweep begins."""
    end: tuple[float, float] = (0.03, 0.0)
    """Linear sweeps: where the tip ends."""
    tilt: tuple[float, float] = (0.0, 0.0)
    """Linear sweeps: the set probe tilt (rad) held along the path."""
    fan_rad: float = field(default=0.3, metadata=bounds(min=0.0, max=1.2))
    fan_axis: Literal["a", "b"] = "a"
    press_m: float = field(default=0.003, metadata=bounds(min=0.0, max=0.02))
    """How far the tip goes below the surface (contact force = tissue stiffness x this)."""
    speed: float = field(default=0.01, metadata=bounds(min=0.0, max=0.05, min_exclusive=True))
    """Linear sweeps m/s; fan sweeps rad/s (times 10: 0.01 → 0.1 rad/s)."""
    approach_timeout_s: float = field(default=20.0, metadata=bounds(min=0.1, max=600.0))

    def __post_init__(self) -> None:
        if not self.speed > 0:  # also when built in code, not only from a config file
            raise ValueError(f"sweep speed must be > 0, got {self.speed}")
        if self.kind == "linear" and math.dist(self.start, self.end) <= 0:
            raise ValueError("a linear sweep needs end different from start")
        if self.kind == "fan" and self.fan_rad <= 0:
            raise ValueError("a fan sweep needs fan_rad > 0")

    @property
    def length(self) -> float:
        """Path length in the path's own units (m, or rad for a fan)."""
        return math.dist(self.start, self.end) if self.kind == "linear" else 2 * self.fan_rad

    @property
    def rate(self) -> float:
        return self.speed if self.kind == "linear" else self.speed * 10


class Surface:
    """Height of the patient surface under an (x, y) point of the robot base frame."""

    def __init__(self, points: Sequence[Sequence[float]] = (), default_z_m: float = -0.22) -> None:
        self.points: npt.NDArray[np.float64] = np.asarray(points, np.float64).reshape(-1, 3)
        self.default_z_m = default_z_m

    def z_at(self, x: float, y: float) -> float:
        if len(self.points):
            near = np.hypot(self.points[:, 0] - x, self.points[:, 1] - y) < SURFACE_RADIUS_M
            if near.any():
                return float(np.max(self.points[near, 2]))
        return self.default_z_m


def path_pose(spec: SweepSpec, surface: Surface, progress: float) -> ProbePose:
    """The target pose at ``progress`` along the path (path units, clamped to [0, length])."""
    s = min(max(progress, 0.0), spec.length)
    if spec.kind == "linear":
        fraction = s / spec.length
        x = spec.start[0] + (spec.end[0] - spec.start[0]) * fraction
        y = spec.start[1] + (spec.end[1] - spec.start[1]) * fraction
        return ProbePose(x, y, surface.z_at(x, y) - spec.press_m, *spec.tilt)
    x, y = spec.start
    angle = s - spec.fan_rad
    tilt = (angle, 0.0) if spec.fan_axis == "a" else (0.0, angle)
    return ProbePose(x, y, surface.z_at(x, y) - spec.press_m, *tilt)


class Phase(enum.Enum):
    APPROACH = "approach"
    SWEEPING = "sweeping"
    PAUSED = "paused"
    TAKEN_OVER = "taken_over"
    DONE = "done"
    STOPPED = "stopped"


class SweepRun:
    """One execution of a sweep on the control loop; ``await run.finished()`` for the outcome."""

    def __init__(self, name: str, spec: SweepSpec, loop: ControlLoop, surface: Surface) -> None:
        self.name = name
        self.spec = spec
        self.loop = loop
        self.surface = surface
        self.operator = SWEEP_OPERATOR_PREFIX + name
        self.phase = Phase.APPROACH
        self.progress = 0.0
        self.outcome: str | None = None
        """``completed`` or the reason it stopped (``estop_command``, ``force_limit``, …)."""
        self.doctor: str | None = None
        self.on_phase: list[Callable[[SweepRun], None]] = []
        self._seq = 0
        self._approach_deadline = 0.0
        self._end_deadline: float | None = None
        """Set when the path's end is commanded: the probe must get there by then."""
        self._last_cycle: float | None = None
        self._finished = asyncio.Event()

    # --- public requests -------------------------------------------------------------------

    def start(self) -> None:
        decision = self.loop.arm(self.operator)
        if not decision.granted:
            raise SweepError(decision.reason.value,
                             f"sweep {self.name}: the robot refused the lease "
                             f"({decision.reason.value})")
        self._approach_deadline = self.loop.clock() + self.spec.approach_timeout_s
        self.loop.listeners.append(self._on_cycle)
        log.info("sweep started", sweep=self.name, kind=self.spec.kind)

    def pause(self) -> None:
        self._require(Phase.SWEEPING, "pause")
        self._set_phase(Phase.PAUSED)

    def resume(self) -> None:
        self._require(Phase.PAUSED, "resume")
        self._set_phase(Phase.SWEEPING)

    def take_over(self, doctor: str) -> None:
        """The lease passes to ``doctor`` now; the sweep stops feeding setpoints."""
        if self.phase not in (Phase.APPROACH, Phase.SWEEPING, Phase.PAUSED):
            raise SweepError("not_running", f"sweep {self.name} is {self.phase.value}")
        self.loop.disarm(self.operator)
        decision = self.loop.arm(doctor)
        if not decision.granted:
            self._finish(decision.reason.value)
            raise SweepError(decision.reason.value, f"take-over refused: {decision.reason.value}")
        self.doctor = doctor
        self._set_phase(Phase.TAKEN_OVER)
        log.warning("sweep taken over", sweep=self.name, doctor=doctor)

    def hand_back(self, doctor: str) -> None:
        """The doctor returns the lease; the sweep re-approaches where it was and goes on."""
        self._require(Phase.TAKEN_OVER, "hand back")
        if doctor != self.doctor:
            raise SweepError("not_lease_holder", f"{doctor!r} did not take this sweep over")
        if self.loop.supervisor.operator == doctor:
            self.loop.disarm(doctor)
        decision = self.loop.arm(self.operator)
        if not decision.granted:
            self._finish(decision.reason.value)
            raise SweepError(decision.reason.value, f"hand back refused: {decision.reason.value}")
        self.doctor = None
        self._approach_deadline = self.loop.clock() + self.spec.approach_timeout_s
        self._set_phase(Phase.APPROACH)

    def abort(self, reason: str = "aborted") -> None:
        """Stop feeding setpoints and release the lease: the supervisor brings it to rest."""
        if self.loop.supervisor.operator == self.operator:
            self.loop.disarm(self.operator)
        self._finish(reason)

    async def finished(self, timeout: float | None = None) -> str:
        async with asyncio.timeout(timeout):
            await self._finished.wait()
        assert self.outcome is not None
        return self.outcome

    @property
    def running(self) -> bool:
        return self.outcome is None

    def summary(self) -> dict[str, object]:
        return {"sweep": self.name, "kind": self.spec.kind, "phase": self.phase.value,
                "progress": round(self.progress / self.spec.length, 4),
                "outcome": self.outcome, "doctor": self.doctor}

    # --- the cycle -------------------------------------------------------------------------

    def _on_cycle(self, output: CycleOutput, states: Sequence[ServoState]) -> None:
        now = self.loop.clock()
        dt = 0.0 if self._last_cycle is None else now - self._last_cycle
        self._last_cycle = now
        if self.phase is Phase.TAKEN_OVER:
            if output.status.state is ArmState.ESTOP:
                self._finish(_first(output.status.reasons))
            return
        status = output.status
        if status.state is not ArmState.ARMED or status.operator != self.operator:
            self._finish(_first(status.reasons) if status.state is ArmState.ESTOP
                         else "lease_lost")
            return
        stops = status.reasons & STOP_REASONS
        if stops:
            self.abort(_first(stops))
            return
        target = path_pose(self.spec, self.surface, self.progress)
        kinematics = self.loop.kinematics
        measured = kinematics.forward(kinematics.servo_to_joints(
            [s.position_rad for s in states])) if states else None
        if self.phase is Phase.APPROACH:
            if _arrived(measured, target):
                self._set_phase(Phase.SWEEPING)
            elif now > self._approach_deadline:
                self.abort("approach_timeout")
                return
        elif self.phase is Phase.SWEEPING and not status.reasons & HOLD_REASONS:
            self.progress = min(self.spec.length, self.progress + self.spec.rate * dt)
            target = path_pose(self.spec, self.surface, self.progress)
            if self.progress >= self.spec.length:
                if _arrived(measured, target):
                    self.abort("completed")
                    return
                if self._end_deadline is None:
                    self._end_deadline = now + self.spec.approach_timeout_s
                elif now > self._end_deadline:
                    self.abort("end_not_reached")  # the servos do not follow the commands
                    return
        self._seq += 1
        self.loop.submit(Setpoint(self.operator, self._seq, True, now, now, pose=target))

    def _require(self, phase: Phase, what: str) -> None:
        if self.phase is not phase:
            raise SweepError("wrong_phase", f"cannot {what}: sweep {self.name} is "
                                            f"{self.phase.value}")

    def _set_phase(self, phase: Phase) -> None:
        self.phase = phase
        for callback in self.on_phase:
            callback(self)

    def _finish(self, outcome: str) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        # not now: the control loop is iterating over its listeners
        asyncio.get_running_loop().call_soon(self._detach)
        self._set_phase(Phase.DONE if outcome == "completed" else Phase.STOPPED)
        self._finished.set()
        log.info("sweep ended", sweep=self.name, outcome=outcome)


    def _detach(self) -> None:
        if self._on_cycle in self.loop.listeners:
            self.loop.listeners.remove(self._on_cycle)


def _first(reasons: frozenset[Reason]) -> str:
    return sorted(r.value for r in reasons)[0]


def _arrived(pose: ProbePose | None, target: ProbePose) -> bool:
    """The *measured* pose is there: a sweep is done when the probe is, not the command."""
    return pose is not None and (math.dist(pose.tip, target.tip) <= ARRIVED_M
            and max(abs(pose.tilt_a - target.tilt_a), abs(pose.tilt_b - target.tilt_b))
            <= ARRIVED_RAD)
