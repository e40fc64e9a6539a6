"""Kinematics of the 3-translation + 2-rotation ultrasound probe holder.

Joints (in this order): ``x``, ``y``, ``z`` — a gantry moving the wrist, in metres — then
``tilt_a`` about the base X axis and ``tilt_b`` about the tilted Y axis, in radians. The tool
point is the probe tip; the probe axis points out of the tip into the patient. A probe pose is
the tip position plus the axis direction (two angles): rotation commands turn the probe *about
the tip* (a software remote centre of motion — the translations compensate), and the sixth
dimension, spin about the probe axis, is free: the holder has no joint for it, so twist
commands report the spin they could not execute instead of raising or drifting (the case MoveIt
Servo stopped supporting when it dropped drift dimensions).

Linear joints are driven by servos through a pinion: joint metres = servo radians x radius.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from medge.config import bounds

JOINT_NAMES = ("x", "y", "z", "tilt_a", "tilt_b")
FREE_DIMENSION = "spin about the probe axis"

Vector3 = tuple[float, float, float]


class UnreachablePose(ValueError):
    """A pose or joint target outside the holder's joint limits (names the joint)."""


class ProbePose(NamedTuple):
    """Tip position (m, base frame) and probe-axis direction as the two tilt angles (rad)."""

    tip_x: float
    tip_y: float
    tip_z: float
    tilt_a: float
    tilt_b: float

    @property
    def tip(self) -> Vector3:
        return self.tip_x, self.tip_y, self.tip_z

    @property
    def axis(self) -> Vector3:
        """Unit vector along the probe, pointing out of the tip (into the patient)."""
        return probe_axis(self.tilt_a, self.tilt_b)


class Twist(NamedTuple):
    """Tip velocity (m/s) and angular velocity about the tip (rad/s), base frame."""

    linear: Vector3
    angular: Vector3


def probe_axis(tilt_a: float, tilt_b: float) -> Vector3:
    """Rx(a)·Ry(b)·(0, 0, -1)."""
    return (-math.sin(tilt_b), math.sin(tilt_a) * math.cos(tilt_b),
            -math.cos(tilt_a) * math.cos(tilt_b))


def tilts_for_axis(axis: Sequence[float]) -> tuple[float, float]:
    """Inverse of :func:`probe_axis` for a (not necessarily unit) direction."""
    norm = math.sqrt(sum(c * c for c in axis))
    if norm < 1e-9:
        raise ValueError("probe axis direction is a zero vector")
    ux, uy, uz = (c / norm for c in axis)
    return math.atan2(uy, -uz), math.asin(max(-1.0, min(1.0, -ux)))


@dataclass(frozen=True)
class HolderGeometry:
    """Dimensions and joint limits (defaults: the simulated holder in firmware_sim)."""

    wrist_offset_m: float = field(default=0.05, metadata=bounds(min=0.0, max=1.0))
    """From the first tilt axis down to the second, along the probe."""
    tip_length_m: float = field(default=0.15, metadata=bounds(min=0.01, max=1.0))
    """From the second tilt axis down to the probe tip."""
    pinion_radius_m: float = field(default=0.03, metadata=bounds(min=0.001, max=1.0,
                                                                   min_exclusive=True))
    """Linear travel per radian of a translation servo."""
    lower: tuple[float, float, float, float, float] = (-0.08, -0.08, -0.08, -0.6, -0.6)
    upper: tuple[float, float, float, float, float] = (0.08, 0.08, 0.08, 0.6, 0.6)

    def validate(self) -> None:
        for label, values in (("lower", self.lower), ("upper", self.upper)):
            _require_length(label, values, len(JOINT_NAMES))
        for name, low, high in zip(JOINT_NAMES, self.lower, self.upper, strict=True):
            if not low < high:
                raise ValueError(f"joint {name}: lower limit {low} must be below upper {high}")
        if max(abs(self.lower[4]), abs(self.upper[4])) >= math.pi / 2:
            raise ValueError("tilt_b limits must stay inside ±90° (the wrist's singularity)")

    def __post_init__(self) -> None:
        self.validate()


@dataclass(frozen=True)
class WorkspaceBox:
    """Where the probe tip may go, in the base frame (m)."""

    lower: tuple[float, float, float] = (-0.10, -0.10, -0.30)
    upper: tuple[float, float, float] = (0.10, 0.10, -0.10)

    def __post_init__(self) -> None:
        _require_length("lower", self.lower, 3)
        _require_length("upper", self.upper, 3)
        if not all(lo < hi for lo, hi in zip(self.lower, self.upper, strict=True)):
            raise ValueError(f"workspace box lower {self.lower} must be below upper {self.upper}")

    def outside(self, point: Sequence[float], margin: float = 0.0) -> list[int]:
        """Axes (0, 1, 2) along which ``point`` is outside the box shrunk by ``margin``."""
        return [i for i, (c, lo, hi) in enumerate(zip(point, self.lower, self.upper, strict=True))
                if not lo + margin <= c <= hi - margin]


class HolderKinematics:
    """Forward and inverse kinematics, twist mapping and servo-angle conversion."""

    def __init__(self, geometry: HolderGeometry | None = None) -> None:
        self.geometry = geometry or HolderGeometry()

    def _tip_offset(self, tilt_a: float, tilt_b: float) -> Vector3:
        """Tip minus wrist centre: Rx(a)·[(0,0,-d) + Ry(b)·(0,0,-L)]."""
        g = self.geometry
        axis = probe_axis(tilt_a, tilt_b)
        first = (0.0, math.sin(tilt_a) * g.wrist_offset_m, -math.cos(tilt_a) * g.wrist_offset_m)
        return (first[0] + axis[0] * g.tip_length_m, first[1] + axis[1] * g.tip_length_m,
                first[2] + axis[2] * g.tip_length_m)

    def forward(self, joints: Sequence[float]) -> ProbePose:
        x, y, z, tilt_a, tilt_b = joints
        offset = self._tip_offset(tilt_a, tilt_b)
        return ProbePose(x + offset[0], y + offset[1], z + offset[2], tilt_a, tilt_b)

    def inverse(self, pose: ProbePose, *, check_limits: bool = True) -> tuple[float, ...]:
        """Joint positions putting the tip at ``pose`` (closed form, unique within ±90° tilt)."""
        offset = self._tip_offset(pose.tilt_a, pose.tilt_b)
        joints = (pose.tip_x - offset[0], pose.tip_y - offset[1], pose.tip_z - offset[2],
                  pose.tilt_a, pose.tilt_b)
        if check_limits:
            self.check_limits(joints)
        return joints

    def check_limits(self, joints: Sequence[float], margin: Sequence[float] | None = None) -> None:
        for name, violation in self.limit_violations(joints, margin):
            raise UnreachablePose(f"joint {name} at {violation:.4f} is outside its limits")

    def limit_violations(
        self, joints: Sequence[float], margin: Sequence[float] | None = None
    ) -> list[tuple[str, float]]:
        margins = margin or (0.0,) * len(JOINT_NAMES)
        g = self.geometry
        return [(name, q) for name, q, lo, hi, m in
                zip(JOINT_NAMES, joints, g.lower, g.upper, margins, strict=True)
                if not lo + m <= q <= hi - m]

    @staticmethod
    def pose_rates(pose: ProbePose, twist: Twist) -> tuple[tuple[float, ...], float]:
        """Map a twist to pose-coordinate rates (ẋ, ẏ, ż, ȧ, ḃ) and the spin rate it dropped.

        The angular velocity is split as ω = ȧ·X + ḃ·Rx(a)·Y + σ·axis; σ (spin about the probe
        axis, the free dimension) has no joint and is returned for reporting.
        """
        ca, sa = math.cos(pose.tilt_a), math.sin(pose.tilt_a)
        e1, e2, e3 = (1.0, 0.0, 0.0), (0.0, ca, sa), pose.axis
        det = _triple(e1, e2, e3)
        if abs(det) < 1e-9:
            raise UnreachablePose("probe axis parallel to the tilt_a axis: wrist singularity")
        w = twist.angular
        rate_a = _triple(w, e2, e3) / det
        rate_b = _triple(e1, w, e3) / det
        spin = _triple(e1, e2, w) / det
        return (*twist.linear, rate_a, rate_b), spin

    @staticmethod
    def integrate(pose: ProbePose, rates: Sequence[float], dt: float) -> ProbePose:
        return ProbePose(*(p + r * dt for p, r in zip(pose, rates, strict=True)))

    def joints_to_servo(self, joints: Sequence[float]) -> list[float]:
        r = self.geometry.pinion_radius_m
        return [joints[0] / r, joints[1] / r, joints[2] / r, joints[3], joints[4]]

    def servo_to_joints(self, angles: Sequence[float]) -> tuple[float, ...]:
        r = self.geometry.pinion_radius_m
        return angles[0] * r, angles[1] * r, angles[2] * r, angles[3], angles[4]


def _require_length(label: str, values: Sequence[float], length: int) -> None:
    if len(values) != length:
        raise ValueError(f"{label} needs {length} values, got {len(values)}")


def _triple(a: Vector3, b: Vector3, c: Vector3) -> float:
    """a · (b × c): the determinant of the 3x3 matrix with columns a, b, c."""
    return (a[0] * (b[1] * c[2] - b[2] * c[1]) - a[1] * (b[0] * c[2] - b[2] * c[0])
            + a[2] * (b[0] * c[1] - b[1] * c[0]))
