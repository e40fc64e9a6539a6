"""The simulated world around the probe manipulator: its geometry and the patient's body surface.

The Dynamixel simulator moves five servos; this model turns their shaft angles into the probe
tip's position and axis (its own forward kinematics, written independently of
``daemons.manipulator.kinematics`` so that a kinematics bug cannot hide in both) and presses
the tip against a patient surface (a sphere cap, the belly) with a linear stiffness. The force
simulator reports the contact force's component along the probe axis, as an axial load cell does.

Servo order: 1 = X, 2 = Y, 3 = Z (linear axes driven through a pinion), 4 = tilt about the base
X axis, 5 = tilt about the (tilted) Y axis. At all-zero angles the probe points straight down.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Vector = tuple[float, float, float]


@dataclass(frozen=True)
class HolderGeometry:
    pinion_radius_m: float = 0.03
    """Linear travel per radian of a translation servo (rack and pinion)."""
    wrist_offset_m: float = 0.05
    """From the first tilt axis down to the second, along the probe."""
    tip_length_m: float = 0.15
    """From the second tilt axis down to the probe tip."""


@dataclass(frozen=True)
class PatientSurface:
    """A sphere cap under the probe; contact force = stiffness x indentation along the normal."""

    top_z_m: float = -0.22
    """Height of the surface's highest point (the tip hangs at -0.20 m at home)."""
    radius_m: float = 0.25
    stiffness_n_per_m: float = 1500.0


def _tilted(tilt_a: float, tilt_b: float, length: float) -> Vector:
    """``(0, 0, -length)`` rotated about Y by ``tilt_b``, then about X by ``tilt_a``."""
    x = -math.sin(tilt_b) * length
    z0 = -math.cos(tilt_b) * length
    return x, -math.sin(tilt_a) * z0, math.cos(tilt_a) * z0


def axis_of(tilt_a: float, tilt_b: float) -> Vector:
    """The unit probe axis (out of the tip) for the two tilt angles."""
    return _tilted(tilt_a, tilt_b, 1.0)


class ProbeWorld:
    """Tip pose and contact force as functions of the simulated servo angles."""

    def __init__(
        self,
        servo_angles: Callable[[], Sequence[float]],
        geometry: HolderGeometry | None = None,
        surface: PatientSurface | None = None,
    ) -> None:
        self.servo_angles = servo_angles
        self.geometry = geometry or HolderGeometry()
        self.surface = surface or PatientSurface()

    def tip_and_axis(self) -> tuple[Vector, Vector]:
        """Probe tip position (m) and unit axis pointing out of the tip, in the base frame."""
        return self._pose_at(self.servo_angles())

    def _pose_at(self, angles: Sequence[float]) -> tuple[Vector, Vector]:
        x, y, z, tilt_a, tilt_b = angles
        g = self.geometry
        wrist_x, wrist_y, wrist_z = (
            x * g.pinion_radius_m, y * g.pinion_radius_m, z * g.pinion_radius_m)
        # the first offset is rotated about X only (it sits above the second tilt axis)
        offset_y = math.sin(tilt_a) * g.wrist_offset_m
        offset_z = -math.cos(tilt_a) * g.wrist_offset_m
        probe = _tilted(tilt_a, tilt_b, g.tip_length_m)
        tip = (wrist_x + probe[0], wrist_y + offset_y + probe[1], wrist_z + offset_z + probe[2])
        axis = axis_of(tilt_a, tilt_b)
        return tip, axis

    def contact_force(self) -> tuple[float, Vector]:
        """(axial force on the load cell in N, force vector on the probe in N)."""
        tip, axis = self.tip_and_axis()
        s = self.surface
        centre_z = s.top_z_m - s.radius_m
        rel = (tip[0], tip[1], tip[2] - centre_z)
        distance = math.sqrt(sum(c * c for c in rel))
        depth = s.radius_m - distance
        if depth <= 0 or distance == 0:
            return 0.0, (0.0, 0.0, 0.0)
        normal = tuple(c / distance for c in rel)
        force = (normal[0] * s.stiffness_n_per_m * depth,
                 normal[1] * s.stiffness_n_per_m * depth,
                 normal[2] * s.stiffness_n_per_m * depth)
        axial = -sum(f * a for f, a in zip(force, axis, strict=True))  # compression positive
        return max(axial, 0.0), force

    def servo_loads(self) -> list[float]:
        """Torque (N·m) each servo must supply to hold the probe against the contact force.

        The virtual work of the force over a small turn of each servo (a numerical Jacobian
        transpose), so it needs no second copy of the geometry.
        """
        _, force = self.contact_force()
        angles = list(self.servo_angles())
        if not any(force):
            return [0.0] * len(angles)
        loads = []
        for index in range(len(angles)):
            ahead, behind = list(angles), list(angles)
            ahead[index] += _TURN_RAD
            behind[index] -= _TURN_RAD
            (forward, _), (backward, _) = self._pose_at(ahead), self._pose_at(behind)
            work = sum(f * (a - b) for f, a, b in zip(force, forward, backward, strict=True))
            loads.append(-work / (2 * _TURN_RAD))
        return loads


_TURN_RAD = 1e-6
