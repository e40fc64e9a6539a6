"""A virtual slide camera: what the scanner's camera would see at the stage's real position.

It implements the driver's :class:`~drivers.camera.Camera` interface so the autofocus and scan
code run unchanged against it. (It imports only that abstract interface: a camera has no wire
codec that could hide the same bug in both ends, which is why simulators otherwise never import
``drivers``.)

Optics model, per frame: the field of view is centred on the stage position returned by
``position_source`` (the mechanical position, so backlash and positioning error show up in the
images); pixel size comes from the objective; defocus ``|z - focal_surface(x, y)|`` blurs the
image with a Gaussian whose sigma grows with the geometric blur disc ``dz·tan(asin(NA))``;
then vignetting, exposure/gain/white balance and sensor noise (shot + read). Capturing takes
the exposure time.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from drivers.camera import Camera, CameraSettings, RgbFrame
from firmware_sim.slide import Slide

PositionSource = Callable[[], tuple[float, float, float]]
"""Returns the stage's true (x, y, z) in micrometres."""

REFERENCE_EXPOSURE_MS = 10.0
NEUTRAL_WHITE_BALANCE_K = 5500
MIN_VISIBLE_SIGMA_PX = 0.25


@dataclass(frozen=True)
class FocalSurface:
    """Where the slide is in focus: ``z = z0 + tilt·(p - c) + curvature·|p - c|²`` (µm).

    A slide is never flat to the stage: a tilt of a few µm per mm and a bowl of a few µm over a
    section are typical, more than a 20x objective's depth of field.
    """

    z0_um: float = 0.0
    centre_um: tuple[float, float] = (47_500.0, 12_500.0)
    tilt_x: float = 0.002
    tilt_y: float = -0.0015
    curvature_per_um: float = 1.5e-7

    def z_at(self, x_um: float, y_um: float) -> float:
        dx, dy = x_um - self.centre_um[0], y_um - self.centre_um[1]
        return (self.z0_um + self.tilt_x * dx + self.tilt_y * dy
                + self.curvature_per_um * (dx * dx + dy * dy))


@dataclass(frozen=True)
class SimOptics:
    """The simulated rig's optics and sensor; defaults match a 20x/0.40 objective."""

    um_per_px: float = 0.5
    numerical_aperture: float = 0.40
    focal_surface: FocalSurface = field(default_factory=FocalSurface)
    vignetting: float = 0.25
    """Fractional brightness loss in the frame corners."""
    read_noise: float = 2.0
    """Read noise, grey levels (sigma)."""
    full_well: float = 4000.0
    """Electrons at grey level 255: sets shot noise. 0 turns shot noise off."""

    def blur_sigma_px(self, defocus_um: float) -> float:
        """Gaussian sigma of the defocus blur: half the geometric blur-disc radius."""
        half_angle = math.asin(min(self.numerical_aperture, 0.99))
        return abs(defocus_um) * math.tan(half_angle) / 2 / self.um_per_px


class VirtualSlideCamera(Camera):
    """A camera looking at ``slide`` through ``optics`` on a stage at ``position_source()``."""

    def __init__(self, slide: Slide, position_source: PositionSource,
                 optics: SimOptics | None = None, settings: CameraSettings | None = None,
                 seed: int = 0, name: str = "virtual") -> None:
        super().__init__(name, settings)
        self.slide = slide
        self.position_source = position_source
        self.optics = optics or SimOptics()
        self.frames_captured = 0
        self._rng = np.random.default_rng(seed)
        self._cached_key: tuple[float, float, int, int, float] | None = None
        self._cached_view: RgbFrame | None = None
        self._lock = threading.Lock()
        self._gain_cache: tuple[CameraSettings, np.ndarray] | None = None
        self._noise_bank: np.ndarray | None = None

    def field_origin_um(self, x_um: float, y_um: float) -> tuple[float, float]:
        """Slide coordinates of the frame's top-left corner when the stage is at (x, y)."""
        width, height = self.settings.resolution
        scale = self.optics.um_per_px
        return x_um - width * scale / 2, y_um - height * scale / 2

    def render(self, x_um: float, y_um: float, z_um: float) -> RgbFrame:
        """The frame for a stage position, without waiting for the exposure."""
        sharp = self._sharp_view(x_um, y_um)
        defocus = z_um - self.optics.focal_surface.z_at(x_um, y_um)
        sigma = self.optics.blur_sigma_px(defocus)
        seen = gaussian_blur(sharp, sigma) if sigma >= MIN_VISIBLE_SIGMA_PX else sharp
        view = cv2.multiply(seen, self._gain_map(), dtype=cv2.CV_32F)
        self._add_noise(view)
        np.clip(view + 0.5, 0, 255, out=view)
        frame: RgbFrame = view.astype(np.uint8)
        return frame

    def _sharp_view(self, x_um: float, y_um: float) -> RgbFrame:
        """The in-focus field; kept for the last position since focusing re-renders it often."""
        width, height = self.settings.resolution
        left, top = self.field_origin_um(x_um, y_um)
        key = (left, top, width, height, self.optics.um_per_px)
        if key != self._cached_key or self._cached_view is None:
            self._cached_view = self.slide.render(left, top, width, height, self.optics.um_per_px)
            self._cached_key = key
        return self._cached_view

    def _gain_map(self) -> np.ndarray:
        """Per-pixel, per-channel gain: exposure x gain x white balance x vignetting. Cached:
        it only changes with the settings."""
        settings = self.settings
        if self._gain_cache is None or self._gain_cache[0] != settings:
            width, height = settings.resolution
            xs = np.linspace(-1, 1, width, dtype=np.float32)
            ys = np.linspace(-1, 1, height, dtype=np.float32)
            vignette = 1 - self.optics.vignetting * (xs[None, :] ** 2 + ys[:, None] ** 2) / 2
            kelvin = settings.white_balance_k or NEUTRAL_WHITE_BALANCE_K
            ratio = kelvin / NEUTRAL_WHITE_BALANCE_K  # warmer setting, bluer image
            white_balance = np.array([ratio**-0.5, 1.0, ratio**0.5], np.float32)
            level = settings.exposure_ms / REFERENCE_EXPOSURE_MS * settings.gain
            gains = (vignette[..., None] * white_balance * np.float32(level)).astype(np.float32)
            self._gain_cache = (settings, gains)
        return self._gain_cache[1]

    def _add_noise(self, view: np.ndarray) -> None:
        """Shot and read noise. Gaussian samples come from a bank drawn once per frame size and
        read at a random offset each frame: drawing 3.7 M normals per frame was the slowest
        step of rendering."""
        optics = self.optics
        if not optics.read_noise and not optics.full_well:
            return
        height, width = view.shape[:2]
        if self._noise_bank is None or self._noise_bank.shape[:2] != (2 * height, 2 * width):
            self._noise_bank = self._rng.standard_normal((2 * height, 2 * width, 3), np.float32)
        row, column = self._rng.integers(0, height), self._rng.integers(0, width)
        noise = self._noise_bank[row:row + height, column:column + width]
        electrons_per_level = 255 / optics.full_well if optics.full_well else 0.0
        variance = np.maximum(view, 0) * np.float32(electrons_per_level)
        sigma = cv2.sqrt(variance + np.float32(optics.read_noise**2))
        view += cv2.multiply(sigma, noise)

    def _do_open(self) -> None:
        self.frames_captured = 0

    def _do_configure(self, settings: CameraSettings) -> None:
        with self._lock:
            self._cached_key = None

    def _do_capture(self) -> RgbFrame:
        started = time.monotonic()
        x_um, y_um, z_um = self.position_source()
        with self._lock:
            frame = self.render(x_um, y_um, z_um)
        remaining = self.settings.exposure_ms / 1000 - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)  # the sensor integrates for the whole exposure
        self.frames_captured += 1
        return frame

    def _do_close(self) -> None:
        self._cached_view = None


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur that stays fast for large sigma: blur a downscaled copy and scale back."""
    if sigma <= 4:
        return np.asarray(cv2.GaussianBlur(image, (0, 0), sigma))
    factor = int(sigma // 2)
    height, width = image.shape[:2]
    small = cv2.resize(image, (max(1, width // factor), max(1, height // factor)),
                       interpolation=cv2.INTER_AREA)
    residual = math.sqrt(max(sigma**2 - (factor / 2) ** 2, 0.25)) / factor
    blurred = cv2.GaussianBlur(small, (0, 0), residual)
    return np.asarray(cv2.resize(blurred, (width, height), interpolation=cv2.INTER_LINEAR))


@dataclass
class MotionLimits:
    """Per-axis trapezoidal motion: max rate (µm/s), acceleration (µm/s²), settle after a move."""

    max_rate_um_s: float
    accel_um_s2: float
    settle_s: float = 0.0

    def move_time_s(self, distance_um: float) -> float:
        distance = abs(distance_um)
        if distance == 0:
            return 0.0
        ramp = self.max_rate_um_s**2 / self.accel_um_s2  # distance to reach max rate and stop
        if distance <= ramp:
            return 2 * math.sqrt(distance / self.accel_um_s2) + self.settle_s
        return ramp / self.max_rate_um_s + (distance - ramp) / self.max_rate_um_s + self.settle_s


# The simulated rig's GRBL settings ($110-$112 mm/min, $120-$122 mm/s²) with a 10 ms settle
# (command round trip and the idle poll).
DEFAULT_XY_LIMITS = MotionLimits(max_rate_um_s=10_000, accel_um_s2=50_000, settle_s=0.01)
DEFAULT_Z_LIMITS = MotionLimits(max_rate_um_s=2_000, accel_um_s2=20_000, settle_s=0.01)


class BacklashStage:
    """A stand-in XYZ stage for running the camera without the GRBL simulator.

    Moves are instantaneous but their duration under ``MotionLimits`` is added to
    ``stage_time_s``. Each axis has mechanical play: approached from below the mechanism sits at
    the commanded position, approached from above it stops ``backlash_um`` short (high).
    """

    def __init__(self, x_um: float = 0.0, y_um: float = 0.0, z_um: float = 0.0,
                 backlash_um: tuple[float, float, float] = (0.0, 0.0, 0.0),
                 xy_limits: MotionLimits = DEFAULT_XY_LIMITS,
                 z_limits: MotionLimits = DEFAULT_Z_LIMITS) -> None:
        self.commanded = [x_um, y_um, z_um]
        self.actual = [x_um, y_um, z_um]
        self.backlash_um = backlash_um
        self.limits = (xy_limits, xy_limits, z_limits)
        self.stage_time_s = 0.0
        self.moves = 0

    def true_position_um(self) -> tuple[float, float, float]:
        return self.actual[0], self.actual[1], self.actual[2]

    def move_to(self, x_um: float | None = None, y_um: float | None = None,
                z_um: float | None = None) -> None:
        durations = []
        for axis, target in enumerate((x_um, y_um, z_um)):
            if target is None or target == self.commanded[axis]:
                continue
            durations.append(self.limits[axis].move_time_s(target - self.commanded[axis]))
            self.commanded[axis] = target
            play = self.backlash_um[axis]
            self.actual[axis] = min(max(self.actual[axis], target), target + play)
        if durations:
            self.stage_time_s += max(durations)
            self.moves += 1


class SimulatedRig:
    """Stage plus camera with the focus-axis interface of the autofocus and focus map
    (``move_xy``, ``move_z``, ``capture``); ``stage_time_s`` adds the exposures to the motion."""

    def __init__(self, stage: BacklashStage, camera: VirtualSlideCamera) -> None:
        self.stage = stage
        self.camera = camera
        self.exposure_time_s = 0.0

    @property
    def stage_time_s(self) -> float:
        return self.stage.stage_time_s + self.exposure_time_s

    async def move_xy(self, x_um: float, y_um: float) -> None:
        self.stage.move_to(x_um=x_um, y_um=y_um)

    async def move_z(self, z_um: float) -> None:
        self.stage.move_to(z_um=z_um)

    async def capture(self) -> RgbFrame:
        frame = await self.camera.capture()
        self.exposure_time_s += self.camera.settings.exposure_ms / 1000
        return frame
