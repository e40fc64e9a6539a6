"""Each safety rule of the supervisor, triggered by the fault it guards against.

The supervisor is pure logic with an injected clock: these tests step it cycle by cycle at
100 Hz, feeding setpoints and force readings exactly as the control loop would.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.manipulator.kinematics import HolderKinematics, ProbePose, Twist, WorkspaceBox
from daemons.manipulator.supervisor import (
    ArmState,
    CycleOutput,
    Reason,
    Setpoint,
    Supervisor,
    SupervisorConfig,
)
from drivers.force_sensor import FLAG_BRIDGE_FAULT, ForceReading
from medge.config import ConfigError, from_mapping

HOME = (0.0, 0.0, 0.0, 0.0, 0.0)
HEALTHY = (0, 0, 0, 0, 0)
PERIOD = 0.01
FORWARD = Twist((0.02, 0.0, 0.0), (0.0, 0.0, 0.0))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A supervisor, its clock, an operator console and a force sensor, stepped together."""

    def __init__(self, config: SupervisorConfig | None = None, operator: str = "alice") -> None:
        self.clock = Clock()
        self.kin = HolderKinematics()
        self.sup = Supervisor(self.kin, HOME, config, clock=self.clock)
        self.operator = operator
        self.seq = 0
        self.force_n = 0.0
        self.force_flags = 0
        self.sensor_alive = True
        self.sender_lag = 0.0
        """Extra transit delay of the next setpoints (sender stamp earlier than receipt)."""
        self.outputs: list[CycleOutput] = []
        self._force_stamp = self.clock.now

    def arm(self) -> None:
        assert self.sup.arm(self.operator, self.joints()).granted

    def joints(self) -> tuple[float, ...]:
        return self.outputs[-1].joint_goals if self.outputs else HOME

    def setpoint(self, enable: bool = True, twist: Twist | None = FORWARD,
                 pose: ProbePose | None = None, operator: str | None = None) -> Setpoint:
        self.seq += 1
        now = self.clock.now
        return Setpoint(operator or self.operator, self.seq, enable, now - self.sender_lag, now,
                        twist, pose)

    def cycle(self, setpoint: Setpoint | None = None, faults: tuple[int, ...] = ()) -> CycleOutput:
        self.clock.now += PERIOD
        if setpoint is not None:
            setpoint = dataclasses.replace(setpoint, received_at=self.clock.now,
                                           sent_at=self.clock.now - self.sender_lag)
            self.sup.submit(setpoint)
        if self.sensor_alive:
            self._force_stamp = self.clock.now
        reading = ForceReading(self.force_n, 0, self.force_flags, self._force_stamp)
        out = self.sup.step(reading, faults)
        self.outputs.append(out)
        return out

    def drive(self, cycles: int, make: Callable[[], Setpoint | None] | None = None,
              faults: tuple[int, ...] = ()) -> CycleOutput:
        maker = make or self.setpoint
        out = self.outputs[-1] if self.outputs else None
        for _ in range(cycles):
            out = self.cycle(maker(), faults)
        assert out is not None
        return out

    def idle(self, cycles: int) -> CycleOutput:
        return self.drive(cycles, lambda: None)


def assert_smooth(outputs: list[CycleOutput], config: SupervisorConfig) -> None:
    """No velocity step: every change of rate respects the acceleration and jerk limits."""
    accels: list[tuple[float, ...]] = []
    for before, after in itertools.pairwise(outputs):
        accel = tuple((b - a) / PERIOD for a, b in zip(before.pose_rates, after.pose_rates,
                                                        strict=True))
        for i, value in enumerate(accel):
            limit = config.max_linear_accel if i < 3 else config.max_angular_accel
            assert abs(value) <= limit * 1.0001
        accels.append(accel)
    for before_a, after_a in itertools.pairwise(accels):
        for i, (a, b) in enumerate(zip(before_a, after_a, strict=True)):
            limit = config.max_linear_jerk if i < 3 else config.max_angular_jerk
            assert abs(b - a) / PERIOD <= limit * 1.0001 + 1e-9


def test_nothing_moves_unless_armed() -> None:
    rig = Rig()
    out = rig.drive(20)
    assert out.status.state is ArmState.DISARMED and Reason.NOT_ARMED in out.status.reasons
    assert not out.status.moving and out.pose.tip == pytest.approx((0, 0, -0.2))
    assert rig.sup.submit(rig.setpoint()) is Reason.NOT_ARMED


def test_fresh_enabled_setpoints_move_at_the_commanded_speed() -> None:
    rig = Rig()
    rig.arm()
    out = rig.drive(100)
    assert out.status.reasons == {Reason.OK} and out.status.moving
    assert out.pose_rates[0] == pytest.approx(0.02)
    assert out.status.command_age_s == pytest.approx(0.0) and out.status.speed_scale == 1.0
    assert out.pose.tip_x == pytest.approx(0.02 * 1.0, abs=0.003)
    assert_smooth(rig.outputs, rig.sup.config)


def test_speed_is_capped() -> None:
    rig = Rig()
    rig.arm()
    out = rig.drive(100, lambda: rig.setpoint(twist=Twist((1.0, 0, 0), (0, 0, 3.0))))
    assert math.hypot(*out.pose_rates[:3]) == pytest.approx(0.05)


def test_deadman_release_is_a_decelerating_stop() -> None:
    rig = Rig()
    rig.arm()
    rig.drive(50)
    out = rig.drive(40, lambda: rig.setpoint(enable=False))
    assert Reason.DEADMAN_RELEASED in out.status.reasons
    assert not out.status.moving
    assert_smooth(rig.outputs, rig.sup.config)
    assert rig.outputs[50].status.moving  # it took more than one cycle: no step


def test_cut_link_stops_within_three_missed_setpoints_then_disarms_after_a_second() -> None:
    rig = Rig()
    rig.arm()
    rig.drive(50)
    rig.idle(2)
    assert rig.outputs[-1].status.reasons == {Reason.OK}  # two missed setpoints are tolerated
    out = rig.idle(1)
    assert Reason.COMMAND_STALE in out.status.reasons
    stop_time = rig.sup.config.stopping_time()
    out = rig.idle(math.ceil(stop_time / PERIOD))
    assert not out.status.moving
    assert_smooth(rig.outputs, rig.sup.config)
    rig.idle(round(1.0 / PERIOD) - len(rig.outputs) + 50)
    out = rig.idle(1)
    assert out.status.state is ArmState.DISARMED
    assert Reason.COMMAND_LOST in {r for o in rig.outputs for r in o.status.reasons}
    assert rig.sup.submit(rig.setpoint()) is Reason.NOT_ARMED  # re-arm required


def test_delayed_setpoints_scale_speed_then_stop() -> None:
    rig = Rig()
    rig.arm()
    rig.drive(60)
    rig.sender_lag = 0.175  # 175 ms more transit than the best seen: halfway to stale
    out = rig.drive(60)
    assert Reason.COMMAND_DELAYED in out.status.reasons
    assert out.status.speed_scale == pytest.approx(0.5)
    assert out.pose_rates[0] == pytest.approx(0.01)
    rig.sender_lag = 0.3
    out = rig.drive(60)
    assert Reason.COMMAND_STALE in out.status.reasons and not out.status.moving


def test_reordered_replayed_malformed_and_badly_stamped_setpoints_are_dropped() -> None:
    rig = Rig()
    rig.arm()
    rig.drive(10)
    late = dataclasses.replace(rig.setpoint(), seq=rig.seq - 5)
    assert rig.sup.submit(late) is Reason.SETPOINT_OUT_OF_ORDER
    latest = rig.setpoint()
    assert rig.sup.submit(latest) is Reason.OK
    assert rig.sup.submit(latest) is Reason.SETPOINT_OUT_OF_ORDER  # replay
    back_in_time = dataclasses.replace(rig.setpoint(), sent_at=latest.sent_at - 1.0)
    assert rig.sup.submit(back_in_time) is Reason.SENDER_CLOCK_INVALID
    from_the_future = dataclasses.replace(rig.setpoint(), sent_at=latest.sent_at + 60.0)
    assert rig.sup.submit(from_the_future) is Reason.SENDER_CLOCK_INVALID
    not_a_time = dataclasses.replace(rig.setpoint(), sent_at=math.nan)
    assert rig.sup.submit(not_a_time) is Reason.SENDER_CLOCK_INVALID
    nan_twist = rig.setpoint(twist=Twist((math.nan, 0, 0), (0, 0, 0)))
    assert rig.sup.submit(nan_twist) is Reason.SETPOINT_INVALID
    inf_pose = rig.setpoint(twist=None, pose=ProbePose(0, 0, -math.inf, 0, 0))
    assert rig.sup.submit(inf_pose) is Reason.SETPOINT_INVALID
    both = rig.setpoint(pose=ProbePose(0, 0, -0.2, 0, 0))
    assert rig.sup.submit(both) is Reason.SETPOINT_INVALID
    out = rig.cycle()
    assert all(math.isfinite(q) for q in out.joint_goals)
    assert out.status.dropped_setpoints == 8
    assert Reason.SETPOINT_OUT_OF_ORDER in out.status.reasons


def test_second_operator_is_refused_and_reported() -> None:
    rig = Rig()
    rig.arm()
    rig.drive(30)
    assert rig.sup.arm("mallory", rig.joints()).reason is Reason.FOREIGN_OPERATOR
    assert rig.sup.submit(rig.setpoint(operator="mallory", enable=False)) \
        is Reason.FOREIGN_OPERATOR
    assert rig.sup.disarm("mallory").granted is False
    out = rig.cycle(rig.setpoint())
    assert out.status.foreign_setpoints == 1 and rig.sup.last_foreign_operator == "mallory"
    assert Reason.FOREIGN_OPERATOR in out.status.reasons
    assert out.status.moving and out.status.operator == "alice"
    assert rig.sup.disarm("alice").granted
    assert rig.sup.arm("mallory", rig.joints()).granted  # the lease is free again


def test_disarm_and_rearm_mid_motion_never_steps_the_velocity() -> None:
    rig = Rig()
    rig.arm()
    rig.drive(50)
    assert rig.sup.disarm("alice").granted
    rig.drive(3)
    rig.arm()  # still decelerating: carries on from the commanded rate
    out = rig.drive(60)
    assert out.status.moving and out.pose_rates[0] == pytest.approx(0.02)
    assert_smooth(rig.outputs, rig.sup.config)


def test_joint_limit_margin_stops_before_the_limit() -> None:
    rig = Rig()
    rig.arm()
    out = rig.drive(600, lambda: rig.setpoint(twist=Twist((0.05, 0, 0), (0, 0, 0))))
    upper = rig.kin.geometry.upper[0]
    assert Reason.JOINT_LIMIT in out.status.reasons and not out.status.moving
    assert max(o.joint_goals[0] for o in rig.outputs) < upper
    assert out.joint_goals[0] > upper - 2 * rig.sup.config.joint_margin[0]
    assert_smooth(rig.outputs, rig.sup.config)
    back = rig.drive(20, lambda: rig.setpoint(twist=Twist((-0.05, 0, 0), (0, 0, 0))))
    assert back.status.moving and back.pose_rates[0] < 0  # moving away is allowed


def test_workspace_box_stops_the_tip() -> None:
    config = SupervisorConfig(workspace=WorkspaceBox((-0.1, -0.1, -0.3), (0.1, 0.1, -0.19)))
    rig = Rig(config)
    rig.arm()
    out = rig.drive(300, lambda: rig.setpoint(twist=Twist((0, 0, 0.02), (0, 0, 0))))
    assert Reason.WORKSPACE_LIMIT in out.status.reasons and not out.status.moving
    assert max(o.pose.tip_z for o in rig.outputs) < -0.19


def test_joint_speed_limit_scales_the_whole_command() -> None:
    config = SupervisorConfig(max_joint_speed=(0.15, 0.15, 0.15, 0.2, 0.2))
    rig = Rig(config)
    rig.arm()
    out = rig.drive(100, lambda: rig.setpoint(twist=Twist((0, 0, 0), (0.5, 0, 0))))
    assert Reason.VELOCITY_LIMITED in out.status.reasons
    assert out.pose_rates[3] == pytest.approx(0.2, rel=0.02)


def test_rotation_commands_pivot_about_the_tip() -> None:
    rig = Rig()
    rig.arm()
    start = rig.cycle(rig.setpoint(twist=None)).pose.tip
    out = rig.drive(100, lambda: rig.setpoint(twist=Twist((0, 0, 0), (0.3, -0.2, 0))))
    assert out.pose.tilt_a > 0.1
    for o in rig.outputs:
        assert rig.kin.forward(o.joint_goals).tip == pytest.approx(start, abs=1e-9)


def test_spin_about_the_probe_axis_is_reported_not_executed() -> None:
    rig = Rig()
    rig.arm()
    out = rig.drive(20, lambda: rig.setpoint(twist=Twist((0, 0, 0), (0, 0, 0.4))))
    assert Reason.SPIN_IGNORED in out.status.reasons
    assert out.status.spin_ignored_rad_s == pytest.approx(-0.4)  # axis points down: -z
    assert not out.status.moving


def test_absolute_pose_target_is_reached_and_unreachable_ones_refused() -> None:
    rig = Rig()
    rig.arm()
    target = ProbePose(0.01, -0.01, -0.21, 0.1, 0.0)
    out = rig.drive(400, lambda: rig.setpoint(twist=None, pose=target))
    assert tuple(out.pose) == pytest.approx(tuple(target), abs=1e-4)
    assert_smooth(rig.outputs, rig.sup.config)
    out = rig.drive(10, lambda: rig.setpoint(twist=None, pose=ProbePose(0.5, 0, -0.2, 0, 0)))
    assert Reason.UNREACHABLE_TARGET in out.status.reasons


def test_force_warning_then_stop_and_retract_along_the_probe_axis() -> None:
    rig = Rig()
    rig.arm()
    press = Twist((0, 0, -0.02), (0, 0, 0))
    rig.drive(30, lambda: rig.setpoint(twist=press))
    rig.force_n = 16.0
    out = rig.drive(5, lambda: rig.setpoint(twist=press))
    assert Reason.FORCE_WARNING in out.status.reasons and out.status.moving
    assert out.pose_rates[2] < 0
    rig.force_n = 26.0
    spike_at = rig.outputs[-1].pose.tip
    out = rig.drive(20, lambda: rig.setpoint(twist=press))
    assert Reason.FORCE_LIMIT in out.status.reasons
    assert out.pose_rates[2] > 0  # backing out, against the operator's push
    rig.force_n = 3.0
    out = rig.drive(200, lambda: rig.setpoint(twist=press))
    assert not out.status.moving and Reason.FORCE_LIMIT in out.status.reasons
    assert out.pose.tip_z - spike_at[2] >= rig.sup.config.retract_distance_m - 0.002
    assert_smooth(rig.outputs, rig.sup.config)
    rig.drive(2, lambda: rig.setpoint(enable=False))  # operator lets go and presses again
    out = rig.drive(20, lambda: rig.setpoint(twist=press))
    assert out.status.moving and Reason.FORCE_LIMIT not in out.status.reasons


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("silent", Reason.FORCE_SENSOR_SILENT), ("nan", Reason.FORCE_SENSOR_IMPLAUSIBLE),
     ("flag", Reason.FORCE_SENSOR_IMPLAUSIBLE), ("huge", Reason.FORCE_SENSOR_IMPLAUSIBLE)],
)
def test_untrustworthy_force_sensor_stops_motion(fault: str, reason: Reason) -> None:
    rig = Rig()
    rig.arm()
    rig.drive(50)
    if fault == "silent":
        rig.sensor_alive = False
    elif fault == "nan":
        rig.force_n = math.nan
    elif fault == "flag":
        rig.force_flags = FLAG_BRIDGE_FAULT
    else:
        rig.force_n = 500.0
    out = rig.drive(60)
    assert reason in out.status.reasons and not out.status.moving
    assert_smooth(rig.outputs, rig.sup.config)


@pytest.mark.parametrize("source", [Reason.ESTOP_COMMAND, Reason.ESTOP_LOCAL])
def test_estop_latches_until_reset_and_rearm(source: Reason) -> None:
    rig = Rig()
    rig.arm()
    rig.drive(50)
    rig.sup.estop(source)
    out = rig.drive(60)
    assert out.status.state is ArmState.ESTOP and source in out.status.reasons
    assert not out.status.moving
    assert_smooth(rig.outputs, rig.sup.config)
    assert rig.sup.arm("alice", rig.joints()).reason is source
    assert rig.sup.submit(rig.setpoint()) is Reason.NOT_ARMED
    assert rig.sup.reset(rig.joints(), HEALTHY).granted
    out = rig.drive(5)
    assert out.status.state is ArmState.DISARMED and not out.status.moving
    rig.arm()
    assert rig.drive(30).status.moving
    with pytest.raises(ValueError, match="not an E-stop"):
        rig.sup.estop(Reason.OK)


def test_servo_hardware_error_latches_estop_and_blocks_reset_while_present() -> None:
    rig = Rig()
    rig.arm()
    rig.drive(30)
    out = rig.drive(1, faults=(0, 0, 32, 0, 0))
    assert out.status.state is ArmState.ESTOP
    assert Reason.ESTOP_SERVO_FAULT in out.status.reasons
    rig.drive(60, faults=(0, 0, 32, 0, 0))
    assert rig.sup.reset(rig.joints(), (0, 0, 32, 0, 0)).reason is Reason.SERVO_FAULT_PRESENT
    assert rig.sup.reset(rig.joints(), HEALTHY).granted  # after the servo's reboot


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="fresh_s < stale_s"):
        SupervisorConfig(fresh_s=0.3)
    with pytest.raises(ValueError, match="force_warn_n < force_stop_n"):
        SupervisorConfig(force_warn_n=30.0)
    with pytest.raises(ValueError, match="stopping distance"):
        SupervisorConfig(workspace_margin_m=0.0001)
    with pytest.raises(ConfigError, match="exam.toml: joint_margin needs 5 values"):
        from_mapping({"joint_margin": [0.01, 0.01]}, SupervisorConfig, source="exam.toml")
    exam = from_mapping({"force_warn_n": 8.0, "force_stop_n": 12.0}, SupervisorConfig)
    assert (exam.force_warn_n, exam.force_stop_n) == (8.0, 12.0)  # a gentler exam profile


@pytest.mark.parametrize("seed", range(12))
def test_a_stop_under_uneven_cycle_times_stays_stopped(seed: int) -> None:
    """A loaded machine runs cycles late and unevenly: once stopped, the rate must stay 0."""
    rig = Rig()
    rig.arm()
    rig.drive(60, lambda: rig.setpoint(twist=Twist((0.03, -0.02, 0.01), (0.3, -0.2, 0))))
    rig.sup.estop(Reason.ESTOP_COMMAND)
    uneven = random.Random(seed)
    stopped = False
    for _ in range(300):
        rig.clock.now += uneven.choice([0.001, 0.01, 0.02, 0.03])
        out = rig.sup.step(ForceReading(0.0, 0, 0, rig.clock.now))
        assert not (stopped and out.status.moving)
        stopped = stopped or not out.status.moving
    assert stopped


EVENTS = st.lists(st.tuples(st.sampled_from(
    ["send", "send_released", "silence", "press", "spike", "relax", "sensor_dead", "sensor_back",
     "estop", "reset", "arm", "disarm", "intruder"]), st.integers(1, 40)), min_size=1, max_size=14)
TWISTS = st.builds(Twist, st.tuples(*[st.floats(-0.08, 0.08)] * 3),
                   st.tuples(*[st.floats(-0.8, 0.8)] * 3))


@settings(max_examples=150, deadline=None)
@given(EVENTS, TWISTS)
def test_safety_invariants_hold_for_any_sequence_of_events(
    events: list[tuple[str, int]], twist: Twist
) -> None:
    """Whatever happens, in any order: no velocity step, goals inside the limits, and motion
    only shortly after a fresh enabled setpoint (or while retracting from excess force)."""
    rig = Rig()
    cfg = rig.sup.config
    geometry = rig.kin.geometry
    grace = cfg.stale_s + cfg.stopping_time() + 2 * PERIOD
    last_permit: float | None = None
    """Last cycle with a reason to move: a fresh enabled setpoint, or a force retract."""
    estop_at: float | None = None
    for event, cycles in events:
        if event == "arm":
            rig.sup.arm(rig.operator, rig.joints())
        elif event == "disarm":
            rig.sup.disarm(rig.operator)
        elif event == "estop":
            rig.sup.estop(Reason.ESTOP_COMMAND)
            estop_at = estop_at or rig.clock.now
        elif event == "reset" and rig.sup.reset(rig.joints(), HEALTHY).granted:
            estop_at = None
        elif event in ("spike", "press", "relax"):
            rig.force_n = {"spike": 30.0, "press": 18.0, "relax": 2.0}[event]
        elif event in ("sensor_dead", "sensor_back"):
            rig.sensor_alive = event == "sensor_back"
        for _ in range(cycles):
            setpoint = None
            if event in ("send", "send_released", "intruder"):
                setpoint = rig.setpoint(enable=event != "send_released", twist=twist,
                                        operator="mallory" if event == "intruder" else None)
            out = rig.cycle(setpoint)
            status = out.status
            if (setpoint is not None and setpoint.enable and event == "send"
                    and rig.sup.operator == rig.operator) or Reason.FORCE_LIMIT in status.reasons:
                last_permit = rig.clock.now
            for q, low, high in zip(out.joint_goals, geometry.lower, geometry.upper, strict=True):
                assert low <= q <= high
            if status.moving:
                assert last_permit is not None and rig.clock.now - last_permit <= grace
            if status.state is ArmState.ESTOP and status.moving:
                assert estop_at is not None and rig.clock.now - estop_at <= grace
    assert_smooth(rig.outputs, cfg)
