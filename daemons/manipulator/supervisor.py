"""The probe manipulator's safety supervisor: pure logic, run once per control cycle.

A stopped robot is always acceptable; a robot moving without a fresh, authorised operator
command never is. Every cycle :meth:`Supervisor.step` turns the latest accepted setpoint, the
force reading and the servo fault flags into the next commanded probe pose (and joint goals),
after these rules (docs/manipulator-safety.md lists the numbers and the test proving each):

* lease: :meth:`Supervisor.arm` grants motion to one operator identity; setpoints from anyone
  else are ignored and counted;
* dead-man: motion only while the latest fresh setpoint carries ``enable=True`` — there is no
  "release" message to lose;
* freshness: setpoint age on the daemon's monotonic clock (plus any transit delay beyond the
  best seen, from the sender stamp); sequence numbers and sender stamps must increase;
  full speed up to 100 ms, scaled down to zero at 250 ms, stop at 250 ms or 3 missed setpoints,
  disarm after 1 s;
* limits: joint limits with margins and a workspace box (motion towards them is refused),
  speed caps, and every change of velocity shaped by acceleration and jerk limits, so every
  stop is a decelerating stop, never a step;
* force: warning at 15 N, stop and retract along the probe axis at 25 N; a silent or
  implausible force sensor stops motion;
* E-stop: latched from a command, a local input or a servo hardware error; only ``reset`` then
  ``arm`` clears it.

Time comes from an injectable monotonic clock so tests drive it cycle by cycle.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from daemons.manipulator.kinematics import (
    HolderKinematics,
    ProbePose,
    Twist,
    UnreachablePose,
    WorkspaceBox,
)
from drivers.force_sensor import ForceReading
from medge.config import bounds

_POSE_DIMENSIONS = 5
_LINEAR = (0, 1, 2)


class ArmState(enum.Enum):
    DISARMED = "disarmed"
    ARMED = "armed"
    ESTOP = "estop"


class Reason(enum.Enum):
    """Why the robot is (or is not) moving; published on the state topic."""

    OK = "ok"
    NOT_ARMED = "not_armed"
    NO_SETPOINT = "no_setpoint"
    DEADMAN_RELEASED = "deadman_released"
    COMMAND_DELAYED = "command_delayed"
    """Setpoint 100-250 ms old: speed scaled down."""
    COMMAND_STALE = "command_stale"
    """Setpoint older than 250 ms or 3 setpoints missed: controlled stop."""
    COMMAND_LOST = "command_lost"
    """No setpoint for over 1 s: disarmed, re-arm required."""
    SETPOINT_INVALID = "setpoint_invalid"
    """Non-finite numbers, or both a twist and a pose target: dropped."""
    SETPOINT_OUT_OF_ORDER = "setpoint_out_of_order"
    SENDER_CLOCK_INVALID = "sender_clock_invalid"
    FOREIGN_OPERATOR = "foreign_operator"
    JOINT_LIMIT = "joint_limit"
    WORKSPACE_LIMIT = "workspace_limit"
    VELOCITY_LIMITED = "velocity_limited"
    UNREACHABLE_TARGET = "unreachable_target"
    SPIN_IGNORED = "spin_ignored"
    """The twist asked for spin about the probe axis, which the holder does not have."""
    FORCE_WARNING = "force_warning"
    FORCE_LIMIT = "force_limit"
    FORCE_SENSOR_SILENT = "force_sensor_silent"
    FORCE_SENSOR_IMPLAUSIBLE = "force_sensor_implausible"
    ESTOP_COMMAND = "estop_command"
    ESTOP_LOCAL = "estop_local"
    ESTOP_SERVO_FAULT = "estop_servo_fault"
    ESTOP_SERVO_LINK = "estop_servo_link"
    ESTOP_SERVO_WATCHDOG = "estop_servo_watchdog"
    """The host was silent on the bus longer than the servos' watchdog: they stopped and ignore
    goals until re-enabled, so the daemon must not believe it is still moving them."""
    SERVO_FAULT_PRESENT = "servo_fault_present"


ESTOP_REASONS = frozenset({Reason.ESTOP_COMMAND, Reason.ESTOP_LOCAL, Reason.ESTOP_SERVO_FAULT,
                           Reason.ESTOP_SERVO_LINK, Reason.ESTOP_SERVO_WATCHDOG})


@dataclass(frozen=True)
class Setpoint:
    """One operator command. Exactly what arrived, stamped on the daemon's clock at receipt."""

    operator: str
    seq: int
    enable: bool
    """The dead-man: True only while the operator holds the enable button."""
    sent_at: float
    """Sender's clock (seconds, any epoch): used for ordering and transit delay only."""
    received_at: float
    """Daemon monotonic clock at receipt: the basis of the command's age."""
    twist: Twist | None = None
    pose: ProbePose | None = None
    """Absolute target; if both are None the operator asks to hold still."""


@dataclass(frozen=True)
class SupervisorConfig:
    period_s: float = field(default=0.01, metadata=bounds(min=0.001, max=0.1))
    fresh_s: float = field(default=0.10, metadata=bounds(min=0.0))
    stale_s: float = field(default=0.25, metadata=bounds(min=0.0))
    lost_s: float = field(default=1.0, metadata=bounds(min=0.0))
    setpoint_period_s: float = field(default=0.01, metadata=bounds(min=0.001))
    """The operator console's send period; ``max_missed_setpoints`` of them missing → stop."""
    max_missed_setpoints: int = field(default=3, metadata=bounds(min=1))
    max_clock_jump_s: float = field(default=0.5, metadata=bounds(min=0.0))
    """How far the sender stamp may run ahead of the daemon's clock between two setpoints."""
    max_linear_speed: float = field(default=0.05, metadata=bounds(min=0.0))
    max_angular_speed: float = field(default=0.5, metadata=bounds(min=0.0))
    max_linear_accel: float = field(default=0.5, metadata=bounds(min=0.0, min_exclusive=True))
    max_angular_accel: float = field(default=5.0, metadata=bounds(min=0.0, min_exclusive=True))
    max_linear_jerk: float = field(default=10.0, metadata=bounds(min=0.0, min_exclusive=True))
    max_angular_jerk: float = field(default=100.0, metadata=bounds(min=0.0, min_exclusive=True))
    max_joint_speed: tuple[float, float, float, float, float] = (0.15, 0.15, 0.15, 2.0, 2.0)
    joint_margin: tuple[float, float, float, float, float] = (0.01, 0.01, 0.01, 0.05, 0.05)
    workspace: WorkspaceBox = field(default_factory=WorkspaceBox)
    workspace_margin_m: float = field(default=0.008, metadata=bounds(min=0.0))
    pose_gain: float = field(default=2.0, metadata=bounds(min=0.0, min_exclusive=True))
    """1/s: how briskly an absolute pose target is approached (before the speed caps)."""
    force_warn_n: float = field(default=15.0, metadata=bounds(min=0.0))
    force_stop_n: float = field(default=25.0, metadata=bounds(min=0.0))
    force_timeout_s: float = field(default=0.05, metadata=bounds(min=0.0))
    force_plausible_min_n: float = -5.0
    force_plausible_max_n: float = 80.0
    retract_speed: float = field(default=0.01, metadata=bounds(min=0.0, min_exclusive=True))
    retract_distance_m: float = field(default=0.01, metadata=bounds(min=0.0))

    def validate(self) -> None:
        for label, values in (("max_joint_speed", self.max_joint_speed),
                              ("joint_margin", self.joint_margin)):
            if len(values) != _POSE_DIMENSIONS or min(values) < 0:
                raise ValueError(f"{label} needs {_POSE_DIMENSIONS} values >= 0, got {values}")
        if not 0 < self.fresh_s < self.stale_s < self.lost_s:
            raise ValueError("command ages must satisfy 0 < fresh_s < stale_s < lost_s")
        if not self.force_warn_n < self.force_stop_n <= self.force_plausible_max_n:
            raise ValueError("forces must satisfy force_warn_n < force_stop_n <= plausible max")
        stop = self.stopping_distance(self.max_linear_speed, self.max_linear_accel,
                                      self.max_linear_jerk) + self.max_linear_speed * self.period_s
        if self.workspace_margin_m < stop:
            raise ValueError(f"workspace_margin_m {self.workspace_margin_m} m is shorter than the "
                             f"stopping distance {stop:.4f} m at max_linear_speed")

    def __post_init__(self) -> None:
        self.validate()

    @staticmethod
    def stopping_distance(speed: float, accel: float, jerk: float) -> float:
        """Upper bound of the distance a jerk-limited stop from ``speed`` covers."""
        return speed * speed / (2 * accel) + speed * accel / jerk

    def stopping_time(self) -> float:
        """Upper bound of a controlled stop's duration from full speed (slowest dimension)."""
        return max(self.max_linear_speed / self.max_linear_accel
                   + self.max_linear_accel / self.max_linear_jerk,
                   self.max_angular_speed / self.max_angular_accel
                   + self.max_angular_accel / self.max_angular_jerk)


@dataclass(frozen=True)
class Status:
    state: ArmState
    reasons: frozenset[Reason]
    operator: str | None
    command_age_s: float | None
    speed_scale: float
    force_n: float | None
    moving: bool
    dropped_setpoints: int
    foreign_setpoints: int
    spin_ignored_rad_s: float


@dataclass(frozen=True)
class CycleOutput:
    pose: ProbePose
    """Commanded probe pose this cycle."""
    joint_goals: tuple[float, ...]
    pose_rates: tuple[float, ...]
    status: Status


@dataclass(frozen=True)
class Decision:
    """The answer to an arm / disarm / reset request."""

    granted: bool
    reason: Reason


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _cap_norm(values: Sequence[float], limit: float) -> tuple[float, ...]:
    """Scale a vector down to length ``limit`` keeping its direction."""
    norm = math.sqrt(sum(v * v for v in values))
    return tuple(values) if norm <= limit else tuple(v * limit / norm for v in values)


class Supervisor:
    """Arm state, operator lease, setpoint freshness, limits, force guard, E-stop latch."""

    def __init__(
        self,
        kinematics: HolderKinematics,
        initial_joints: Sequence[float],
        config: SupervisorConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kinematics = kinematics
        self.config = config or SupervisorConfig()
        self.clock = clock
        self.state = ArmState.DISARMED
        self.operator: str | None = None
        self.estop_reason: Reason | None = None
        self.dropped_setpoints = 0
        self.foreign_setpoints = 0
        self.last_foreign_operator: str | None = None
        self._pose = kinematics.forward(initial_joints)
        self._rates = [0.0] * _POSE_DIMENSIONS
        self._accels = [0.0] * _POSE_DIMENSIONS
        self._latest: Setpoint | None = None
        self._transit_baseline: float | None = None
        self._last_step: float | None = None
        self._retract_from: ProbePose | None = None
        self._force_hold = False
        self._servo_fault = False
        self._events: set[Reason] = set()

    # --- requests -------------------------------------------------------------------------

    def arm(self, operator: str, measured_joints: Sequence[float]) -> Decision:
        """Grant the lease to ``operator``.

        At rest the commanded pose restarts from the measured one; while a stop is still
        decelerating it carries on from the commanded pose and rate, so arming never steps.
        """
        if self.state is ArmState.ESTOP:
            assert self.estop_reason is not None
            return Decision(False, self.estop_reason)
        if self.operator not in (None, operator):
            self._events.add(Reason.FOREIGN_OPERATOR)
            return Decision(False, Reason.FOREIGN_OPERATOR)
        if self.state is ArmState.DISARMED and not any(self._rates):
            self._restart_from(measured_joints)
        self.state, self.operator = ArmState.ARMED, operator
        return Decision(True, Reason.OK)

    def disarm(self, operator: str) -> Decision:
        if self.operator != operator:
            self._events.add(Reason.FOREIGN_OPERATOR)
            return Decision(False, Reason.FOREIGN_OPERATOR)
        self._release()
        return Decision(True, Reason.OK)

    def estop(self, reason: Reason) -> None:
        """Latch the E-stop (from anyone: stopping is always allowed)."""
        if reason not in ESTOP_REASONS:
            raise ValueError(f"{reason} is not an E-stop reason")
        if self.state is not ArmState.ESTOP:
            self.estop_reason = reason
        self.state, self.operator, self._latest = ArmState.ESTOP, None, None

    def hold_where_measured(self, measured_joints: Sequence[float]) -> None:
        """Before torque comes back on (a reset after the servos were power cycled or moved by
        hand with torque off): a robot at rest and not armed holds where it stands, not at the
        goal it held before, which the servos would otherwise drive back to on their own."""
        if self.state is not ArmState.ARMED and not any(self._rates):
            self._restart_from(measured_joints)

    def reset(self, measured_joints: Sequence[float], servo_faults: Sequence[int]) -> Decision:
        """Clear a latched E-stop (the robot stays disarmed until someone arms it).

        ``servo_faults`` are the servos' hardware error flags as read just now.
        """
        if self.state is not ArmState.ESTOP:
            return Decision(True, Reason.OK)
        self._servo_fault = any(servo_faults)
        if self._servo_fault:
            return Decision(False, Reason.SERVO_FAULT_PRESENT)
        if any(abs(r) > 0 for r in self._rates):
            return Decision(False, self.estop_reason or Reason.ESTOP_COMMAND)  # still stopping
        self.state, self.estop_reason = ArmState.DISARMED, None
        self._restart_from(measured_joints)
        return Decision(True, Reason.OK)

    def submit(self, setpoint: Setpoint) -> Reason:
        """Accept or drop one setpoint; the answer says why (OK if accepted)."""
        if self.operator is None:
            return Reason.NOT_ARMED
        if setpoint.operator != self.operator:
            self.foreign_setpoints += 1
            self.last_foreign_operator = setpoint.operator
            self._events.add(Reason.FOREIGN_OPERATOR)
            return Reason.FOREIGN_OPERATOR
        verdict = self._check_order(setpoint)
        if verdict is not Reason.OK:
            self.dropped_setpoints += 1
            self._events.add(verdict)
            return verdict
        transit = setpoint.received_at - setpoint.sent_at
        if self._transit_baseline is None or transit < self._transit_baseline:
            self._transit_baseline = transit
        previous = self._latest
        self._latest = setpoint
        if self._force_hold and setpoint.enable and previous is not None and not previous.enable:
            self._force_hold = False  # the operator let go and pressed again
        return Reason.OK

    def _check_order(self, setpoint: Setpoint) -> Reason:
        if setpoint.twist is not None and setpoint.pose is not None:
            return Reason.SETPOINT_INVALID
        numbers = [*(setpoint.twist.linear + setpoint.twist.angular if setpoint.twist else ()),
                   *(setpoint.pose or ())]
        if not all(math.isfinite(n) for n in numbers):
            return Reason.SETPOINT_INVALID
        if not (math.isfinite(setpoint.sent_at) and math.isfinite(setpoint.received_at)):
            return Reason.SENDER_CLOCK_INVALID
        previous = self._latest
        if previous is None:
            return Reason.OK
        if setpoint.seq <= previous.seq:
            return Reason.SETPOINT_OUT_OF_ORDER
        if setpoint.sent_at < previous.sent_at:
            return Reason.SENDER_CLOCK_INVALID
        sender_advance = setpoint.sent_at - previous.sent_at
        local_advance = setpoint.received_at - previous.received_at
        if sender_advance > local_advance + self.config.max_clock_jump_s:
            return Reason.SENDER_CLOCK_INVALID
        return Reason.OK

    def _release(self) -> None:
        self.state, self.operator, self._latest = ArmState.DISARMED, None, None
        self._transit_baseline = None
        self._force_hold = False

    def _restart_from(self, joints: Sequence[float]) -> None:
        self._pose = self.kinematics.forward(joints)
        self._rates = [0.0] * _POSE_DIMENSIONS
        self._accels = [0.0] * _POSE_DIMENSIONS
        self._latest = None
        self._transit_baseline = None
        self._retract_from = None
        self._force_hold = False

    # --- the cycle ------------------------------------------------------------------------

    def step(self, force: ForceReading | None, servo_faults: Sequence[int] = ()) -> CycleOutput:
        """One control cycle: decide the wanted motion, enforce limits, shape, integrate."""
        now = self.clock()
        cfg = self.config
        dt = cfg.period_s if self._last_step is None else _clamp(
            now - self._last_step, 0.0, 3 * cfg.period_s)
        self._last_step = now
        reasons: set[Reason] = set(self._events)
        self._events.clear()
        self._servo_fault = any(servo_faults)
        if self._servo_fault:
            self.estop(Reason.ESTOP_SERVO_FAULT)
        wanted, age, scale, spin = self._operator_rates(now, reasons)
        force_n = self._force_guard(now, force, reasons)
        if force_n is None:
            wanted = [0.0] * _POSE_DIMENSIONS
        if self._retract_from is not None and self.state is ArmState.ARMED and force_n is not None:
            wanted = self._retract_rates(force_n, reasons)
        wanted = self._enforce_limits(wanted, reasons)
        self._shape(wanted, dt)
        self._pose = self.kinematics.integrate(self._pose, self._rates, dt)
        joints = self._clamped_joints()
        if self.state is ArmState.ESTOP:
            assert self.estop_reason is not None
            reasons.add(self.estop_reason)
        moving = any(abs(r) > 0 for r in self._rates)
        if not reasons:
            reasons.add(Reason.OK)
        status = Status(self.state, frozenset(reasons), self.operator, age, scale, force_n,
                        moving, self.dropped_setpoints, self.foreign_setpoints, spin)
        return CycleOutput(self._pose, joints, tuple(self._rates), status)

    def _operator_rates(
        self, now: float, reasons: set[Reason]
    ) -> tuple[list[float], float | None, float, float]:
        """The motion the operator asks for, already scaled for command age: (rates, age, scale,
        ignored spin)."""
        stop = [0.0] * _POSE_DIMENSIONS
        cfg = self.config
        if self.state is not ArmState.ARMED:
            if self.state is ArmState.DISARMED:
                reasons.add(Reason.NOT_ARMED)
            return stop, None, 0.0, 0.0
        setpoint = self._latest
        if setpoint is None:
            reasons.add(Reason.NO_SETPOINT)
            return stop, None, 0.0, 0.0
        gap = now - setpoint.received_at
        transit = setpoint.received_at - setpoint.sent_at - (self._transit_baseline or 0.0)
        age = gap + max(0.0, transit)
        missed = math.floor(gap / cfg.setpoint_period_s + 1e-9)
        if gap > cfg.lost_s:
            reasons.add(Reason.COMMAND_LOST)
            self._release()
            return stop, age, 0.0, 0.0
        if age > cfg.stale_s or missed >= cfg.max_missed_setpoints:
            reasons.add(Reason.COMMAND_STALE)
            return stop, age, 0.0, 0.0
        if not setpoint.enable:
            reasons.add(Reason.DEADMAN_RELEASED)
            return stop, age, 0.0, 0.0
        if self._force_hold:
            reasons.add(Reason.FORCE_LIMIT)
            return stop, age, 0.0, 0.0
        scale = 1.0
        if age > cfg.fresh_s:
            scale = (cfg.stale_s - age) / (cfg.stale_s - cfg.fresh_s)
            reasons.add(Reason.COMMAND_DELAYED)
        rates, spin = self._setpoint_rates(setpoint, reasons)
        linear = _cap_norm(rates[:3], cfg.max_linear_speed)
        angular = _cap_norm(rates[3:], cfg.max_angular_speed)
        return [r * scale for r in (*linear, *angular)], age, scale, spin

    def _setpoint_rates(
        self, setpoint: Setpoint, reasons: set[Reason]
    ) -> tuple[list[float], float]:
        if setpoint.twist is not None:
            try:
                rates, spin = self.kinematics.pose_rates(self._pose, setpoint.twist)
            except UnreachablePose:
                reasons.add(Reason.UNREACHABLE_TARGET)
                return [0.0] * _POSE_DIMENSIONS, 0.0
            if abs(spin) > 1e-6:
                reasons.add(Reason.SPIN_IGNORED)
            return list(rates), spin
        if setpoint.pose is not None:
            return self._approach(setpoint.pose, reasons), 0.0
        return [0.0] * _POSE_DIMENSIONS, 0.0

    def unreachable(self, target: ProbePose) -> str | None:
        """Why an absolute target is refused (joint limits with their margins, the workspace
        wall), or None; sweeps check their whole path with it before they move."""
        cfg = self.config
        try:
            self.kinematics.check_limits(self.kinematics.inverse(target, check_limits=False),
                                         cfg.joint_margin)
        except UnreachablePose as exc:
            return f"{exc} (margins included)"
        outside = cfg.workspace.outside(target.tip, cfg.workspace_margin_m)
        if outside:
            return (f"tip {'xyz'[outside[0]]} = {target.tip[outside[0]]:.4f} m is outside the "
                    f"workspace (margin {cfg.workspace_margin_m} m)")
        return None

    def _approach(self, target: ProbePose, reasons: set[Reason]) -> list[float]:
        """Rates towards an absolute target, slowing so that it arrives without overshoot."""
        cfg = self.config
        if self.unreachable(target) is not None:
            reasons.add(Reason.UNREACHABLE_TARGET)
            return [0.0] * _POSE_DIMENSIONS
        rates = []
        for index, (goal, now) in enumerate(zip(target, self._pose, strict=True)):
            error = goal - now
            accel = cfg.max_linear_accel if index in _LINEAR else cfg.max_angular_accel
            speed = min(cfg.pose_gain * abs(error), math.sqrt(accel * abs(error)))
            rates.append(math.copysign(speed, error))
        return rates

    def _force_guard(
        self, now: float, force: ForceReading | None, reasons: set[Reason]
    ) -> float | None:
        """The plausible current force, or None (and a reason) when it cannot be trusted."""
        cfg = self.config
        if force is None or now - force.received_at > cfg.force_timeout_s:
            reasons.add(Reason.FORCE_SENSOR_SILENT)
            return None
        value = force.force_n
        if (force.faulted or not math.isfinite(value)
                or not cfg.force_plausible_min_n <= value <= cfg.force_plausible_max_n):
            reasons.add(Reason.FORCE_SENSOR_IMPLAUSIBLE)
            return None
        if value >= cfg.force_stop_n and self._retract_from is None and \
                self.state is ArmState.ARMED:
            self._retract_from = self._pose
            self._force_hold = True
        if value >= cfg.force_warn_n:
            reasons.add(Reason.FORCE_WARNING)
        return value

    def _retract_rates(self, force_n: float, reasons: set[Reason]) -> list[float]:
        """Back the tip out along the probe axis until far enough and below the warning."""
        assert self._retract_from is not None
        reasons.add(Reason.FORCE_LIMIT)
        travelled = math.dist(self._pose.tip, self._retract_from.tip)
        if travelled >= self.config.retract_distance_m and force_n < self.config.force_warn_n:
            self._retract_from = None
            return [0.0] * _POSE_DIMENSIONS
        axis = self._retract_from.axis
        speed = self.config.retract_speed
        return [-axis[0] * speed, -axis[1] * speed, -axis[2] * speed, 0.0, 0.0]

    def _enforce_limits(self, wanted: list[float], reasons: set[Reason]) -> list[float]:
        """Refuse motion towards a joint-limit margin or the workspace wall; cap joint speeds."""
        if not any(wanted):
            return wanted
        cfg = self.config
        kin = self.kinematics
        joints = kin.inverse(self._pose, check_limits=False)
        probe = 1e-4
        ahead = kin.inverse(kin.integrate(self._pose, wanted, probe), check_limits=False)
        joint_rates = [(a - j) / probe for a, j in zip(ahead, joints, strict=True)]
        geometry = kin.geometry
        for q, rate, low, high, margin in zip(joints, joint_rates, geometry.lower, geometry.upper,
                                              cfg.joint_margin, strict=True):
            if (q <= low + margin and rate < 0) or (q >= high - margin and rate > 0):
                reasons.add(Reason.JOINT_LIMIT)
                return [0.0] * _POSE_DIMENSIONS
        box = cfg.workspace
        for axis in box.outside(self._pose.tip, cfg.workspace_margin_m):
            position, rate = self._pose.tip[axis], wanted[axis]
            centre = (box.lower[axis] + box.upper[axis]) / 2
            if (position - centre) * rate > 0:
                reasons.add(Reason.WORKSPACE_LIMIT)
                return [0.0] * _POSE_DIMENSIONS
        ratio = min((limit / abs(rate) for rate, limit in
                     zip(joint_rates, cfg.max_joint_speed, strict=True) if abs(rate) > limit),
                    default=1.0)
        if ratio < 1.0:
            reasons.add(Reason.VELOCITY_LIMITED)
            return [w * ratio for w in wanted]
        return wanted

    def _shape(self, wanted: Sequence[float], dt: float) -> None:
        """Move each pose rate towards ``wanted`` within the acceleration and jerk limits."""
        if dt <= 0:
            return
        cfg = self.config
        for i in range(_POSE_DIMENSIONS):
            linear = i in _LINEAR
            a_max = cfg.max_linear_accel if linear else cfg.max_angular_accel
            j_max = cfg.max_linear_jerk if linear else cfg.max_angular_jerk
            error = wanted[i] - self._rates[i]
            step = j_max * dt
            if error == 0:
                self._accels[i] = 0.0  # on the wanted rate: stay there
                continue
            if abs(error) <= step * dt and abs(error / dt - self._accels[i]) <= step:
                # land on the wanted rate: the jerk into this step and out of it are in limits
                self._rates[i], self._accels[i] = wanted[i], error / dt
                continue
            # the acceleration from which easing off by one jerk step per cycle lands exactly
            # on the wanted rate (a discrete S-curve: n(n+1)/2 steps of step·dt)
            cycles = (math.sqrt(1 + 8 * abs(error) / (step * dt)) - 1) / 2
            target = math.copysign(min(a_max, cycles * step), error)
            self._accels[i] = _clamp(target, self._accels[i] - step, self._accels[i] + step)
            self._rates[i] += self._accels[i] * dt

    def _clamped_joints(self) -> tuple[float, ...]:
        """Joint goals for the commanded pose, never beyond the hard limits (last resort)."""
        joints = self.kinematics.inverse(self._pose, check_limits=False)
        g = self.kinematics.geometry
        return tuple(_clamp(q, lo, hi) for q, lo, hi in zip(joints, g.lower, g.upper, strict=True))
