"""Motion physics of the simulated GRBL stage: trapezoidal profiles and mechanical backlash.

Kept apart from the wire protocol (:mod:`firmware_sim.grbl`) so the virtual camera and the
stage benchmark can reason about the same physics without a serial line. Units are mm and s.

Simplification (documented in docs/grbl.md): every planner block starts and ends at rest
(exact stop), i.e. no junction-speed blending between consecutive blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class Profile:
    """Speed profile along a straight path: from ``v0`` up to ``v_peak``, cruise, down to rest."""

    length: float
    v0: float
    v_peak: float
    accel: float

    @property
    def t_accel(self) -> float:
        return (self.v_peak - self.v0) / self.accel

    @property
    def d_accel(self) -> float:
        return (self.v_peak**2 - self.v0**2) / (2 * self.accel)

    @property
    def d_decel(self) -> float:
        return self.v_peak**2 / (2 * self.accel)

    @property
    def t_cruise(self) -> float:
        cruise = self.length - self.d_accel - self.d_decel
        return cruise / self.v_peak if cruise > 0 and self.v_peak > 0 else 0.0

    @property
    def duration(self) -> float:
        return self.t_accel + self.t_cruise + self.v_peak / self.accel

    def distance_at(self, t: float) -> float:
        """Distance travelled ``t`` seconds after the start (clamped to the profile)."""
        if t <= 0:
            return 0.0
        if t < self.t_accel:
            return self.v0 * t + 0.5 * self.accel * t * t
        t -= self.t_accel
        if t < self.t_cruise:
            return self.d_accel + self.v_peak * t
        t -= self.t_cruise
        t_decel = self.v_peak / self.accel
        if t >= t_decel:
            return self.length
        travelled = self.v_peak * t - 0.5 * self.accel * t * t
        return min(self.length, self.length - self.d_decel + travelled)

    def velocity_at(self, t: float) -> float:
        if t <= 0:
            return self.v0
        if t < self.t_accel:
            return self.v0 + self.accel * t
        t -= self.t_accel
        if t < self.t_cruise:
            return self.v_peak
        t -= self.t_cruise
        return max(0.0, self.v_peak - self.accel * t)


def plan_profile(length: float, v_max: float, accel: float, v0: float = 0.0) -> Profile:
    """The fastest profile covering ``length`` that starts at ``v0`` and ends at rest.

    ``length`` must be at least the braking distance ``v0**2 / (2 * accel)``.
    """
    if length <= 0 or accel <= 0 or v_max <= 0:
        return Profile(max(length, 0.0), v0, v0, max(accel, 1e-9))
    v_reachable = math.sqrt((2 * accel * length + v0 * v0) / 2)
    return Profile(length, v0, max(v0, min(v_max, v_reachable)), accel)


def axis_limited(unit: Vec3, per_axis: Vec3) -> float:
    """Path limit (rate or acceleration) such that no axis exceeds its own limit (GRBL planner)."""
    return min(
        (limit / abs(u) for u, limit in zip(unit, per_axis, strict=True) if abs(u) > 1e-12),
        default=math.inf,
    )


def move_time(start: Vec3, end: Vec3, max_rate_mm_min: Vec3, accel_mm_s2: Vec3) -> float:
    """Seconds for one rapid move from rest to rest: the physical minimum of that move."""
    delta = [e - s for s, e in zip(start, end, strict=True)]
    length = math.sqrt(sum(d * d for d in delta))
    if length == 0:
        return 0.0
    unit = (delta[0] / length, delta[1] / length, delta[2] / length)
    rates = (max_rate_mm_min[0] / 60, max_rate_mm_min[1] / 60, max_rate_mm_min[2] / 60)
    return plan_profile(length, axis_limited(unit, rates), axis_limited(unit, accel_mm_s2)).duration


def backlash_follow(carriage: float, motor: float, backlash: float) -> float:
    """Where the carriage sits after the motor (leadscrew nut) moved monotonically to ``motor``.

    The carriage rests anywhere in the dead band ``[motor, motor + backlash]``: driving the
    motor in + pushes the carriage exactly (carriage == motor); driving it in - leaves the
    carriage ``backlash`` above the motor once the slack is taken up.
    """
    return min(max(carriage, motor), motor + backlash)
