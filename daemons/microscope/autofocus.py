"""Autofocus: sharpness metrics and a coarse-to-fine search along the focus axis.

The search always moves upward while measuring and makes its final approach from below, so
the focus drive's backlash is taken up the same way every time (as OpenFlexure's fast
autofocus does). It stops sweeping once a clear peak has been passed, and raises
:class:`FocusFailed` on blank glass or a flat sharpness curve rather than returning a guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np
import numpy.typing as npt

from daemons.microscope.optics import Objective

RgbFrame = npt.NDArray[np.uint8]
Metric = Callable[[npt.NDArray[np.float32]], float]

METRIC_WIDTH_PX = 320
MIN_SHRINK = 2
FINE_SWEEPS = 3
TISSUE_SATURATION = 0.08


class FocusAxis(Protocol):
    """What autofocus drives: the focus (Z) motor and the camera."""

    async def move_z(self, z_um: float) -> None: ...
    async def capture(self) -> RgbFrame: ...


class FocusFailed(RuntimeError):
    """No focus found: ``reason`` is ``blank`` (no tissue in view) or ``no-peak``."""

    def __init__(self, reason: str, message: str, curve: list[tuple[float, float]]) -> None:
        super().__init__(message)
        self.reason = reason
        self.curve = curve


def grey_thumbnail(frame: RgbFrame, width_px: int = METRIC_WIDTH_PX) -> npt.NDArray[np.float32]:
    """Grey float frame shrunk at least 2x and to at most ``width_px`` wide: averaging pixels
    suppresses sensor noise, which the Laplacian would otherwise take for detail."""
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
    height, width = grey.shape
    factor = max(MIN_SHRINK, width / width_px)
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    return np.asarray(cv2.resize(grey, size, interpolation=cv2.INTER_AREA), np.float32)


def laplacian_variance(grey: npt.NDArray[np.float32]) -> float:
    """Variance of the Laplacian, divided by the squared mean so exposure does not change it."""
    laplacian = cv2.Laplacian(grey, cv2.CV_32F, ksize=3)
    return float(laplacian.var()) / max(float(grey.mean()) ** 2, 1e-6)


def tenengrad(grey: npt.NDArray[np.float32]) -> float:
    """Gradient energy (Sobel), divided by the squared mean."""
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    return float(np.mean(gx * gx + gy * gy)) / max(float(grey.mean()) ** 2, 1e-6)


METRICS: dict[str, Metric] = {"laplacian": laplacian_variance, "tenengrad": tenengrad}


def tissue_fraction(frame: RgbFrame) -> float:
    """Share of the field that is stained (coloured), not bare glass; blur does not change it."""
    height, width = frame.shape[:2]
    small = np.asarray(cv2.resize(frame, (max(1, width // 4), max(1, height // 4)),
                                  interpolation=cv2.INTER_AREA), np.float32)  # averages noise
    brightest = small.max(axis=2)
    saturation = (brightest - small.min(axis=2)) / np.maximum(brightest, 1.0)
    return float(np.mean(saturation > TISSUE_SATURATION))


@dataclass(frozen=True)
class AutofocusSettings:
    """Search geometry in µm. ``for_objective`` scales it with the depth of field."""

    range_um: float = 40.0
    coarse_step_um: float = 6.0
    fine_step_um: float = 2.0
    approach_um: float = 15.0
    """How far below a target every downward move goes before coming up to it: more than the
    focus drive's backlash (a mechanical figure, so ``for_objective`` leaves it alone)."""
    metric: str = "laplacian"
    min_peak_ratio: float = 1.3
    """Best sharpness over the worst seen: below it the curve is flat (no focus)."""
    drop_ratio: float = 0.5
    """A sweep stops at the first sample below ``drop_ratio`` times a clear peak behind it."""
    min_tissue_fraction: float = 0.02
    max_windows: int = 4

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric: {self.metric!r} is not one of {sorted(METRICS)}")
        if not 0 < self.fine_step_um <= self.coarse_step_um < self.range_um:
            raise ValueError("need 0 < fine_step_um <= coarse_step_um < range_um")

    @classmethod
    def for_objective(cls, objective: Objective, **overrides: float | str | int) -> \
            AutofocusSettings:
        dof = objective.depth_of_field_um
        geometry: dict[str, float | str | int] = {
            "range_um": 8.5 * dof, "coarse_step_um": 1.3 * dof, "fine_step_um": 0.45 * dof,
        }
        return cls(**{**geometry, **overrides})  # type: ignore[arg-type]


@dataclass
class FocusResult:
    z_um: float
    sharpness: float
    frames: int
    curve: list[tuple[float, float]] = field(default_factory=list)
    """Every (z, sharpness) measured, in order."""


class _Search:
    """One autofocus run: tracks the last commanded Z so downward moves approach from below."""

    def __init__(self, axis: FocusAxis, settings: AutofocusSettings) -> None:
        self.axis = axis
        self.settings = settings
        self.metric = METRICS[settings.metric]
        self.z: float | None = None
        self.curve: list[tuple[float, float]] = []

    async def go(self, z_um: float) -> None:
        if self.z is None or z_um < self.z:
            await self.axis.move_z(z_um - self.settings.approach_um)
        await self.axis.move_z(z_um)
        self.z = z_um

    async def measure(self, z_um: float) -> float:
        await self.go(z_um)
        frame = await self.axis.capture()
        if not self.curve and tissue_fraction(frame) < self.settings.min_tissue_fraction:
            raise FocusFailed("blank", f"no tissue in view at z={z_um:.1f} µm (blank glass)",
                              [])
        sharpness = self.metric(grey_thumbnail(frame))
        self.curve.append((z_um, sharpness))
        return sharpness

    async def sweep(self, start_um: float, stop_um: float, step_um: float) -> \
            list[tuple[float, float]]:
        """Measure upward from ``start_um``; stop early once the peak is clearly passed."""
        samples: list[tuple[float, float]] = []
        count = math.floor((stop_um - start_um) / step_um + 1e-9) + 1
        for index in range(count):
            z = start_um + index * step_um
            samples.append((z, await self.measure(z)))
            values = [s for _, s in samples]
            best = max(values)
            if (values[-1] < self.settings.drop_ratio * best
                    and best >= self.settings.min_peak_ratio * min(values[: values.index(best)],
                                                                   default=best + 1)):
                break  # a clear peak: lower on both sides
        return samples

    def is_flat(self) -> bool:
        values = [s for _, s in self.curve]
        return max(values) < self.settings.min_peak_ratio * min(values)

    def failure(self) -> FocusFailed:
        values = [s for _, s in self.curve]
        zs = [z for z, _ in self.curve]
        where = f"over z {min(zs):.1f}..{max(zs):.1f} µm"
        if self.is_flat():
            return FocusFailed("no-peak", f"sharpness curve is flat (max/min"
                               f" {max(values) / min(values):.2f} <"
                               f" {self.settings.min_peak_ratio}) {where}", self.curve)
        return FocusFailed("no-peak", f"sharpness still rising at the edge of the search {where}",
                           self.curve)


async def autofocus(axis: FocusAxis, centre_z_um: float,
                    settings: AutofocusSettings | None = None) -> FocusResult:
    """Focus near ``centre_z_um`` and leave the axis at best focus (approached from below).

    The coarse sweep covers ``range_um`` around the centre. If the peak lies beyond it (the
    curve still rising at an edge) the next window is searched in that direction; if the
    curve is flat (far out of focus) the windows alternate above and below.
    """
    settings = settings or AutofocusSettings()
    search = _Search(axis, settings)
    span = settings.range_um
    low, high = centre_z_um - span / 2, centre_z_um + span / 2
    explored = (low, high)
    coarse: list[tuple[float, float]] = []
    for attempt in range(settings.max_windows):
        coarse = sorted(coarse + await search.sweep(low, high, settings.coarse_step_um))
        peak = int(np.argmax([s for _, s in coarse]))
        if search.is_flat():
            go_up = attempt % 2 == 0
        elif 0 < peak < len(coarse) - 1:
            break
        else:
            go_up = peak == len(coarse) - 1
        if go_up:
            low = explored[1] + settings.coarse_step_um
            high = low + span - settings.coarse_step_um
        else:
            high = explored[0] - settings.coarse_step_um
            low = high - span + settings.coarse_step_um
        explored = (min(explored[0], low), max(explored[1], high))
    else:
        raise search.failure()
    estimate = peak_of(coarse[max(0, peak - 1):peak + 2])
    step = settings.fine_step_um
    fine: list[tuple[float, float]] = []
    for _ in range(FINE_SWEEPS):
        fine = await search.sweep(estimate - step, estimate + step, step)
        best = int(np.argmax([s for _, s in fine]))
        if 0 < best < len(fine) - 1:
            break
        estimate = fine[best][0]  # the coarse estimate was off: recentre on the best sample
    best_z = min(max(peak_of(fine), fine[0][0]), fine[-1][0])
    await search.go(best_z)
    return FocusResult(z_um=best_z, sharpness=max(s for _, s in fine), frames=len(search.curve),
                       curve=search.curve)


def peak_of(samples: list[tuple[float, float]]) -> float:
    """Vertex of a parabola fitted to log sharpness (a Gaussian peak), or the best sample when
    the points do not bracket a maximum."""
    zs = np.array([z for z, _ in samples])
    values = np.log(np.maximum([s for _, s in samples], 1e-12))
    best = float(zs[int(np.argmax(values))])
    if len(samples) < 3:
        return best
    curvature, slope, _ = np.polyfit(zs, values, 2)
    if curvature >= 0:
        return best
    vertex = float(-slope / (2 * curvature))
    return vertex if zs.min() <= vertex <= zs.max() else best
