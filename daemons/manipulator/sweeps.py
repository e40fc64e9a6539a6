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

* ``linear``: the tip from ``start`` to ``end`` (x, y), ``press_m`` into the skin along its
  normal, the probe held at the set ``tilt`` *from the skin's normal* at every point, as a
  sonographer holds it;
* ``fan``: the tip held at ``start`` while the probe tilts about the tip (the remote centre of
  motion) from ``-fan_rad`` to ``+fan_rad`` about the axis given by ``fan_axis``, the fan
  centred on the skin's normal.

The skin's height and normal under a point come from the registered surface points: the
least-squares tangent plane of those within ``NORMAL_RADIUS_M``; with fewer than
``MIN_PLANE_POINTS`` there, the highest point within ``SURFACE_RADIUS_M`` and straight up;
with no registration, ``surface_z_m`` and straight up. A tilt ``(a, b)`` from the normal is
``probe_axis(a, b)`` turned by the smallest rotation taking the base frame's up to the normal,
so that on a level surface it is the same tilt as in the base frame. The holder reaches any
axis direction within its two tilt joints' limits (spin about the axis is free: no joint), so
before a sweep takes the lease every waypoint of its path (each millimetre, or 0.01 rad of a
fan) is checked against the supervisor's own rules for an absolute target (joint limits with
margins, the workspace box); one that fails refuses the sweep, naming the waypoint, before any
motion.

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
from daemons.manipulator.kinematics import ProbePose, Vector3, probe_axis, tilts_for_axis
from daemons.manipulator.supervisor import ArmState, CycleOutput, Reason, Setpoint, Supervisor
from drivers.dynamixel import ServoState
from medge.config import bounds

log = structlog.get_logger(__name__)

ARRIVED_M = 0.001
ARRIVED_RAD = 0.01
SURFACE_RADIUS_M = 0.01
"""Too few points for a tangent plane: the highest one within this distance gives the height."""
NORMAL_RADIUS_M = 0.015
"""Registered surface points within this distance (in x, y) give the local tangent plane."""
MIN_PLANE_POINTS = 6
UP: Vector3 = (0.0, 0.0, 1.0)
WAYPOINT_STEP_M = 0.001
WAYPOINT_STEP_RAD = 0.01
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
        """The highest registered point within ``SURFACE_RADIUS_M``, else the default."""
        if len(self.points):
            near = np.hypot(self.points[:, 0] - x, self.points[:, 1] - y) < SURFACE_RADIUS_M
            if near.any():
                return float(np.max(self.points[near, 2]))
        return self.default_z_m

    def local(self, x: float, y: float) -> tuple[float, Vector3]:
        """Height and outward unit normal of the skin at ``(x, y)`` (the module's rules)."""
        if len(self.points):
            points = self.points
            near = points[np.hypot(points[:, 0] - x, points[:, 1] - y) < NORMAL_RADIUS_M]
            if len(near) >= MIN_PLANE_POINTS:
                design = np.column_stack([near[:, 0] - x, near[:, 1] - y, np.ones(len(near))])
                solution, _, rank, _ = np.linalg.lstsq(design, near[:, 2], rcond=None)
                if rank == 3:
                    slope_x, slope_y, height = (float(v) for v in solution)
                    norm = math.sqrt(slope_x * slope_x + slope_y * slope_y + 1.0)
                    return height, (-slope_x / norm, -slope_y / norm, 1.0 / norm)
        return self.z_at(x, y), UP


def axis_from_normal(normal: Vector3, tilt: tuple[float, float]) -> Vector3:
    """The probe axis at ``tilt`` from the skin's inward normal: ``probe_axis(*tilt)`` turned by
    the smallest rotation taking up (0, 0, 1) to ``normal`` (Rodrigues; ``normal`` points up)."""
    v = probe_axis(*tilt)
    nx, ny, cos = normal
    k = (-ny, nx, 0.0)  # up x normal: the rotation axis scaled by the sine
    k_cross_v = (k[1] * v[2] - k[2] * v[1], k[2] * v[0] - k[0] * v[2], k[0] * v[1] - k[1] * v[0])
    k_dot_v = k[0] * v[0] + k[1] * v[1]
    return (v[0] * cos + k_cross_v[0] + k[0] * k_dot_v / (1.0 + cos),
            v[1] * cos + k_cross_v[1] + k[1] * k_dot_v / (1.0 + cos),
            v[2] * cos + k_cross_v[2])


def path_pose(spec: SweepSpec, surface: Surface, progress: float) -> ProbePose:
    """The target pose at ``progress`` along the path (path units, clamped to [0, length])."""
    x, y, tilt = _path_point(spec, progress)
    height, normal = surface.local(x, y)
    tilt_a, tilt_b = tilts_for_axis(axis_from_normal(normal, tilt))
    press = spec.press_m
    return ProbePose(x - press * normal[0], y - press * normal[1], height - press * normal[2],
                     tilt_a, tilt_b)


def _path_point(spec: SweepSpec, progress: float) -> tuple[float, float, tuple[float, float]]:
    """Where on the skin (x, y) and at which tilt from its normal the path is at ``progress``."""
    s = min(max(progress, 0.0), spec.length)
    if spec.kind == "linear":
        fraction = s / spec.length
        return (spec.start[0] + (spec.end[0] - spec.start[0]) * fraction,
                spec.start[1] + (spec.end[1] - spec.start[1]) * fraction, spec.tilt)
    angle = s - spec.fan_rad
    return (*spec.start, (angle, 0.0) if spec.fan_axis == "a" else (0.0, angle))


def check_reachable(name: str, spec: SweepSpec, surface: Surface,
                    supervisor: Supervisor) -> int:
    """Every waypoint of the path against the supervisor's rules for a target; raises
    :class:`SweepError` ``unreachable_waypoint`` naming the first that fails. Returns the
    number of waypoints checked."""
    step = WAYPOINT_STEP_M if spec.kind == "linear" else WAYPOINT_STEP_RAD
    count = max(1, math.ceil(spec.length / step)) + 1
    for index in range(count):
        progress = spec.length * index / (count - 1)
        pose = path_pose(spec, surface, progress)
        problem = supervisor.unreachable(pose)
        if problem is not None:
            x, y, _ = _path_point(spec, progress)
            slope = math.degrees(math.acos(surface.local(x, y)[1][2]))
            raise SweepError(
                "unreachable_waypoint",
                f"sweep {name}: waypoint {index} of {count} (x {x * 1000:.1f} mm, "
                f"y {y * 1000:.1f} mm; skin normal {slope:.1f}° from vertical) needs probe "
                f"tilts a {math.degrees(pose.tilt_a):.1f}°, b {math.degrees(pose.tilt_b):.1f}°: "
                f"{problem}")
    return count


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
        """Check the whole path, then take the lease (nothing moves if either refuses)."""
        check_reachable(self.name, self.spec, self.surface, self.loop.supervisor)
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
