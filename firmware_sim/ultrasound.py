"""A simulated ultrasound machine behind a frame grabber: B-mode frames from the probe pose.

The image plane is the one a linear probe insonifies: it contains the probe axis (depth, rows)
and the probe's lateral direction (columns), both taken from the simulated tip pose. Each pixel
is a point of a synthetic phantom below the patient surface of :mod:`firmware_sim.probe_world`:
speckle that is a pure function of the 3-D position (so frames change as the probe moves, and
the same point looks the same from any pose), a bright fascia layer parallel to the skin,
anechoic vessels (dark discs with bright back walls), a hyperechoic organ, and attenuation with
depth. Without contact (force below ``contact_n``) the frame is dark: no coupling, no echo.

The class has the frame-source interface the ultrasound service consumes (``open``, ``close``,
``capture`` returning ``H x W`` ``uint8`` grayscale, ``frame_rate_hz``), paced at the grabber's
frame rate like a real UVC stream. It does not import ``drivers`` (independent implementation).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from firmware_sim.probe_world import PatientSurface, ProbeWorld, Vector
from firmware_sim.slide import hash01

GrayImage = npt.NDArray[np.uint8]
ProbeState = tuple[Vector, Vector, float]
"""Tip position (m), unit probe axis, axial contact force (N)."""

SPECKLE_CELL_M = 0.0004
RENDER_SCALE = 4
"""The phantom is sampled on a grid this many times coarser than the output, then upscaled:
speckle cells are larger than a pixel anyway, and it keeps 30 fps cheap on a small box."""


class UltrasoundSimError(ValueError):
    """A simulator setting is out of range (names it)."""


@dataclass(frozen=True)
class Vessel:
    """An anechoic tube along the base Y axis (a vessel seen in cross-section by an X sweep)."""

    x_m: float
    depth_m: float
    """Below the surface's top point."""
    radius_m: float


@dataclass(frozen=True)
class Phantom:
    surface: PatientSurface = field(default_factory=PatientSurface)
    fascia_depth_m: float = 0.012
    vessels: tuple[Vessel, ...] = (Vessel(-0.02, 0.030, 0.006), Vessel(0.025, 0.045, 0.009))
    organ_centre: Vector = (0.0, 0.02, -0.30)
    organ_radii: Vector = (0.05, 0.04, 0.02)
    attenuation_per_m: float = 25.0
    seed: int = 7


@dataclass(frozen=True)
class ImageGeometry:
    width_px: int = 800
    height_px: int = 600
    depth_m: float = 0.08
    """Imaging depth: the last row."""
    aperture_m: float = 0.05
    """Width of the linear probe's field of view: the columns."""

    def __post_init__(self) -> None:
        if not (16 <= self.width_px <= 4096 and 16 <= self.height_px <= 4096):
            raise UltrasoundSimError(f"image size {self.width_px}x{self.height_px} is outside "
                                     "16..4096 px per side")
        if not (0 < self.depth_m <= 0.5 and 0 < self.aperture_m <= 0.2):
            raise UltrasoundSimError("depth_m must be in (0, 0.5] and aperture_m in (0, 0.2]")


def lateral_axis(axis: Vector) -> Vector:
    """The probe's in-plane lateral direction: base X made perpendicular to the probe axis."""
    ax, ay, az = axis
    lx, ly, lz = 1.0 - ax * ax, -ax * ay, -ax * az
    norm = math.sqrt(lx * lx + ly * ly + lz * lz) or 1.0
    return lx / norm, ly / norm, lz / norm


def render_bmode(phantom: Phantom, geometry: ImageGeometry, tip: Vector, axis: Vector,
                 force_n: float, contact_n: float = 0.3) -> GrayImage:
    """One B-mode frame for the probe at ``tip`` looking along ``axis``."""
    rows = max(4, geometry.height_px // RENDER_SCALE)
    cols = max(4, geometry.width_px // RENDER_SCALE)
    depth = (np.arange(rows, dtype=np.float64) + 0.5) * (geometry.depth_m / rows)
    lateral = (np.arange(cols, dtype=np.float64) + 0.5 - cols / 2) * (geometry.aperture_m / cols)
    side = lateral_axis(axis)
    points = [tip[k] + depth[:, None] * axis[k] + lateral[None, :] * side[k] for k in range(3)]
    x, y, z = points
    s = phantom.surface
    centre_z = s.top_z_m - s.radius_m
    below_skin = s.radius_m - np.sqrt(x * x + y * y + (z - centre_z) ** 2)
    cell = [np.floor(p / SPECKLE_CELL_M).astype(np.int64) for p in points]
    speckle = hash01(phantom.seed, cell[0] * 73856093 ^ cell[2] * 83492791, cell[1])
    echo = 0.35 + 0.65 * speckle ** 2  # Rayleigh-like: mostly dark with bright grains
    echo = echo * (1.0 + 1.8 * np.exp(-((below_skin - phantom.fascia_depth_m) / 0.0012) ** 2))
    top = s.top_z_m
    for vessel in phantom.vessels:
        distance = np.hypot(x - vessel.x_m, z - (top - vessel.depth_m))
        echo = np.where(distance < vessel.radius_m, 0.04 * speckle, echo)
        wall = np.exp(-((distance - vessel.radius_m) / 0.0008) ** 2)
        echo = echo + 1.2 * wall
    cx, cy, cz = phantom.organ_centre
    rx, ry, rz = phantom.organ_radii
    inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 < 1.0
    echo = np.where(inside, echo * 1.7, echo)
    echo = echo * np.exp(-phantom.attenuation_per_m * depth)[:, None]
    echo = np.where(below_skin > 0, echo, 0.02 * speckle)  # gel/air above the skin
    coupling = min(1.0, max(0.0, force_n - contact_n) / 2.0)
    image = np.clip(echo * coupling * 170.0 + 6.0 * speckle, 0, 255).astype(np.uint8)
    resized = cv2.resize(image, (geometry.width_px, geometry.height_px),
                         interpolation=cv2.INTER_LINEAR)
    return np.asarray(resized, np.uint8)


def world_probe(world: ProbeWorld) -> Callable[[], ProbeState]:
    """The probe state of the simulated robot (its true pose and axial force)."""
    def state() -> ProbeState:
        tip, axis = world.tip_and_axis()
        return tip, axis, world.contact_force()[0]
    return state


class SimulatedUltrasound:
    """A frame source rendering the phantom at ``frame_rate_hz`` (the grabber's stream rate).

    ``capture()`` waits for the next frame slot (frames are never delivered faster than the
    rate, and a slow reader skips slots as a real grabber drops them) and renders on a worker
    thread owned by this object and joined by ``close()``.
    """

    def __init__(self, probe: Callable[[], ProbeState], *, frame_rate_hz: float = 30.0,
                 geometry: ImageGeometry | None = None, phantom: Phantom | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < frame_rate_hz <= 240:
            raise UltrasoundSimError(f"frame_rate_hz {frame_rate_hz} is outside (0, 240]")
        self.probe = probe
        self.frame_rate_hz = frame_rate_hz
        self.geometry = geometry or ImageGeometry()
        self.phantom = phantom or Phantom()
        self.clock = clock
        self.frames = 0
        self._worker: ThreadPoolExecutor | None = None
        self._next_at = 0.0

    async def __aenter__(self) -> SimulatedUltrasound:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="ultrasound-sim")
            self._next_at = self.clock()

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown(wait=True)  # at most one render (milliseconds) is in flight

    async def capture(self) -> GrayImage:
        if self._worker is None:
            raise UltrasoundSimError("capture() before open()")
        period = 1.0 / self.frame_rate_hz
        now = self.clock()
        if now > self._next_at + period:  # the reader fell behind: skip the missed slots
            self._next_at += period * math.floor((now - self._next_at) / period)
        await asyncio.sleep(max(0.0, self._next_at - now))
        self._next_at += period
        tip, axis, force = self.probe()
        frame = await asyncio.get_running_loop().run_in_executor(
            self._worker, render_bmode, self.phantom, self.geometry, tip, axis, force)
        self.frames += 1
        return frame
