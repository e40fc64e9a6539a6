"""Probe-holder kinematics: round trips, remote centre of motion, free spin, limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.manipulator.kinematics import (
    HolderGeometry,
    HolderKinematics,
    ProbePose,
    Twist,
    UnreachablePose,
    WorkspaceBox,
    probe_axis,
    tilts_for_axis,
)
from firmware_sim.dynamixel import DynamixelSim
from firmware_sim.probe_world import ProbeWorld
from medge.config import ConfigError, from_mapping

KIN = HolderKinematics()
G = KIN.geometry

joints_in_limits = st.tuples(*(st.floats(lo, hi) for lo, hi in zip(G.lower, G.upper,
                                                                      strict=True)))


@settings(max_examples=200, deadline=None)
@given(joints_in_limits)
def test_forward_then_inverse_round_trips(joints: tuple[float, ...]) -> None:
    assert KIN.inverse(KIN.forward(joints), check_limits=False) == pytest.approx(joints, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(joints_in_limits)
def test_forward_agrees_with_the_simulators_independent_model(joints: tuple[float, ...]) -> None:
    world = ProbeWorld(lambda: KIN.joints_to_servo(joints))
    tip, axis = world.tip_and_axis()
    pose = KIN.forward(joints)
    assert pose.tip == pytest.approx(tip, abs=1e-12)
    assert pose.axis == pytest.approx(axis, abs=1e-12)


def test_home_pose_points_straight_down() -> None:
    pose = KIN.forward((0, 0, 0, 0, 0))
    assert pose == pytest.approx((0, 0, -0.20, 0, 0))
    assert pose.axis == pytest.approx((0, 0, -1))


@given(st.floats(-1.2, 1.2), st.floats(-1.2, 1.2))
def test_axis_angles_round_trip(tilt_a: float, tilt_b: float) -> None:
    assert tilts_for_axis(probe_axis(tilt_a, tilt_b)) == pytest.approx((tilt_a, tilt_b))


@pytest.mark.parametrize("angular", [(0.3, 0, 0), (0, 0.3, 0), (0.2, -0.25, 0.1)])
def test_rotation_about_the_tip_keeps_the_tip_still(angular: tuple[float, float, float]) -> None:
    start = KIN.forward((0.01, -0.02, 0.03, 0.1, -0.05))
    pose, dt = start, 0.01
    for _ in range(100):  # one second of a pure rotation command
        rates, _spin = KIN.pose_rates(pose, Twist((0, 0, 0), angular))
        pose = KIN.integrate(pose, rates, dt)
        joints = KIN.inverse(pose)
        assert KIN.forward(joints).tip == pytest.approx(start.tip, abs=1e-12)
    assert pose.axis != pytest.approx(start.axis, abs=1e-3)  # it did rotate


def test_small_rotation_turns_the_axis_as_commanded() -> None:
    pose = KIN.forward((0, 0, 0, 0.2, 0.1))
    omega = (0.1, -0.2, 0.05)
    rates, _spin = KIN.pose_rates(pose, Twist((0, 0, 0), omega))
    dt = 1e-6
    after = KIN.integrate(pose, rates, dt).axis
    derivative = [(b - a) / dt for a, b in zip(pose.axis, after, strict=True)]
    u = pose.axis
    expected = (omega[1] * u[2] - omega[2] * u[1], omega[2] * u[0] - omega[0] * u[2],
                omega[0] * u[1] - omega[1] * u[0])  # du/dt = ω × u
    assert derivative == pytest.approx(expected, abs=1e-5)


def test_spin_about_the_probe_axis_is_the_free_dimension() -> None:
    pose = KIN.forward((0, 0, 0, 0.3, -0.2))
    spin_only = Twist((0, 0, 0), tuple(0.5 * c for c in pose.axis))  # type: ignore[arg-type]
    rates, spin = KIN.pose_rates(pose, spin_only)
    assert rates == pytest.approx((0, 0, 0, 0, 0), abs=1e-12)
    assert spin == pytest.approx(0.5)


def test_linear_twist_moves_only_the_tip() -> None:
    pose = KIN.forward((0, 0, 0, 0.1, 0.1))
    rates, spin = KIN.pose_rates(pose, Twist((0.01, -0.02, 0.03), (0, 0, 0)))
    assert rates == pytest.approx((0.01, -0.02, 0.03, 0, 0)) and spin == 0


def test_limits_name_the_joint() -> None:
    with pytest.raises(UnreachablePose, match="joint x"):
        KIN.inverse(ProbePose(0.5, 0, -0.2, 0, 0))
    with pytest.raises(UnreachablePose, match="joint tilt_b"):
        KIN.inverse(KIN.forward((0, 0, 0, 0, 0.9)))
    assert KIN.limit_violations((0.079, 0, 0, 0, 0), margin=(0.005,) * 5) == [("x", 0.079)]
    assert KIN.limit_violations((0.07, 0, 0, 0, 0), margin=(0.005,) * 5) == []


def test_servo_angle_mapping() -> None:
    joints = (0.03, -0.015, 0.0, 0.2, -0.1)
    assert KIN.joints_to_servo(joints) == pytest.approx([1.0, -0.5, 0.0, 0.2, -0.1])
    assert KIN.servo_to_joints(KIN.joints_to_servo(joints)) == pytest.approx(joints)


def test_simulated_bus_angles_give_the_same_tip_as_kinematics() -> None:
    bus = DynamixelSim()
    for servo, angle in zip(bus.servos, (0.5, -0.3, -0.8, 0.25, -0.15), strict=True):
        servo.position = angle
    tip, _ = ProbeWorld(bus.positions).tip_and_axis()
    assert KIN.forward(KIN.servo_to_joints(bus.positions())).tip == pytest.approx(tip)


def test_bad_geometry_and_box_are_refused() -> None:
    with pytest.raises(ValueError, match="joint y"):
        HolderGeometry(lower=(-0.1, 0.1, -0.1, -0.5, -0.5), upper=(0.1, 0.0, 0.1, 0.5, 0.5))
    with pytest.raises(ValueError, match="90"):
        HolderGeometry(lower=(-0.1, -0.1, -0.1, -0.5, -1.6), upper=(0.1, 0.1, 0.1, 0.5, 1.6))
    with pytest.raises(ValueError, match="workspace"):
        WorkspaceBox(lower=(0, 0, 0), upper=(0, 1, 1))
    box = WorkspaceBox()
    assert box.outside((0.0, 0.0, -0.2)) == []
    assert box.outside((0.095, 0.0, -0.2), margin=0.01) == [0]


def test_geometry_loads_from_config_with_clear_errors() -> None:
    geometry = from_mapping({"tip_length_m": 0.2, "lower": [-0.1, -0.1, -0.1, -0.5, -0.5]},
                            HolderGeometry, source="manipulator.toml")
    assert geometry.tip_length_m == 0.2 and geometry.lower[0] == -0.1
    with pytest.raises(ConfigError, match="manipulator.toml: .*lower needs 5 values, got 2"):
        from_mapping({"lower": [-1, -1]}, HolderGeometry, source="manipulator.toml")
    with pytest.raises(ConfigError, match="tip_length_m"):
        from_mapping({"tip_length_m": -1}, HolderGeometry, source="manipulator.toml")
