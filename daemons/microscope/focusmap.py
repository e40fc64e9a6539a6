"""Focus map: autofocus at a sparse set of tissue points, fit a smooth surface, predict Z.

A slide's focal surface is tilted and slightly bowed, so a low-order polynomial in (x, y) fits
it; a bad autofocus (dust, a fold) is an outlier that must not bend the surface, so points are
dropped one at a time while their residual is far beyond the others' (robust MAD scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from daemons.microscope.autofocus import (
    AutofocusSettings,
    FocusAxis,
    FocusFailed,
    autofocus,
    tissue_fraction,
)

MAD_TO_SIGMA = 1.4826


class ScanStage(FocusAxis, Protocol):
    """A focus axis that can also move in X and Y."""

    async def move_xy(self, x_um: float, y_um: float) -> None: ...


@dataclass(frozen=True)
class FocusPoint:
    x_um: float
    y_um: float
    z_um: float | None
    """Best focus, or None when autofocus failed or there was no tissue."""
    reason: str = "ok"


@dataclass
class FocusSurface:
    """z = polynomial of the given degree in normalised (x, y), fitted to ``points``."""

    degree: int
    coefficients: npt.NDArray[np.float64]
    centre: tuple[float, float]
    scale: float
    points: npt.NDArray[np.float64]
    """N x 3 (x, y, z) of every point offered to the fit."""
    inliers: npt.NDArray[np.bool_]

    def predict(self, x_um: float | npt.ArrayLike, y_um: float | npt.ArrayLike) -> \
            npt.NDArray[np.float64]:
        design = _design(np.asarray(x_um, np.float64), np.asarray(y_um, np.float64),
                         self.degree, self.centre, self.scale)
        return np.asarray(design @ self.coefficients, np.float64)

    @property
    def residuals_um(self) -> npt.NDArray[np.float64]:
        """Measured minus predicted Z at every point (outliers included)."""
        return self.points[:, 2] - self.predict(self.points[:, 0], self.points[:, 1])

    @property
    def rms_residual_um(self) -> float:
        """RMS residual over the inliers."""
        return float(np.sqrt(np.mean(self.residuals_um[self.inliers] ** 2)))


def _design(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], degree: int,
            centre: tuple[float, float], scale: float) -> npt.NDArray[np.float64]:
    u, v = (x - centre[0]) / scale, (y - centre[1]) / scale
    terms = [u ** (total - j) * v**j for total in range(degree + 1) for j in range(total + 1)]
    return np.stack(np.broadcast_arrays(*terms), axis=-1)


def terms_for(degree: int) -> int:
    return (degree + 1) * (degree + 2) // 2


def fit_surface(points: Sequence[tuple[float, float, float]], degree: int = 2,
                min_outlier_um: float = 1.0, outlier_sigmas: float = 4.0) -> FocusSurface:
    """Least-squares polynomial surface with iterative outlier rejection.

    The degree drops (2 -> plane -> constant) when there are too few points to fit it with one
    point to spare. A point is rejected when its residual exceeds both ``min_outlier_um`` and
    ``outlier_sigmas`` robust standard deviations of the inliers' residuals.
    """
    data = np.asarray(points, np.float64).reshape(-1, 3)
    if len(data) == 0:
        raise ValueError("focus surface: no focused points to fit")
    while degree > 0 and len(data) < terms_for(degree) + 1:
        degree -= 1
    centre = (float(data[:, 0].mean()), float(data[:, 1].mean()))
    scale = max(float(np.ptp(data[:, 0])), float(np.ptp(data[:, 1])), 1.0) / 2
    design = _design(data[:, 0], data[:, 1], degree, centre, scale)
    inliers = np.ones(len(data), bool)
    while True:
        coefficients = np.linalg.lstsq(design[inliers], data[inliers, 2], rcond=None)[0]
        residuals = np.abs(data[:, 2] - design @ coefficients)
        spread = MAD_TO_SIGMA * float(np.median(residuals[inliers]))
        limit = max(min_outlier_um, outlier_sigmas * spread)
        worst = int(np.argmax(np.where(inliers, residuals, -1.0)))
        if residuals[worst] <= limit or inliers.sum() <= terms_for(degree) + 1:
            break
        inliers[worst] = False
    return FocusSurface(degree, coefficients, centre, scale, data, inliers)


@dataclass
class FocusMapResult:
    surface: FocusSurface
    points: list[FocusPoint] = field(default_factory=list)
    frames: int = 0


async def build_focus_map(stage: ScanStage, candidates: Sequence[tuple[float, float]],
                          start_z_um: float, settings: AutofocusSettings | None = None,
                          min_tissue_fraction: float = 0.2, degree: int = 2) -> FocusMapResult:
    """Autofocus at each candidate (x, y) showing enough tissue, then fit the surface.

    Each autofocus starts from the surface fitted so far (or the nearest success), which keeps
    the searches short. Points without tissue or where focus fails are recorded, not fitted.
    """
    settings = settings or AutofocusSettings()
    points: list[FocusPoint] = []
    focused: list[tuple[float, float, float]] = []
    frames = 0
    for x, y in candidates:
        await stage.move_xy(x, y)
        guess = float(fit_surface(focused, degree=1).predict(x, y)) if focused else start_z_um
        await stage.move_z(guess)
        frames += 1
        if tissue_fraction(await stage.capture()) < min_tissue_fraction:
            points.append(FocusPoint(x, y, None, "no tissue"))
            continue
        try:
            result = await autofocus(stage, guess, settings)
        except FocusFailed as failure:
            frames += len(failure.curve)
            points.append(FocusPoint(x, y, None, failure.reason))
            continue
        frames += result.frames
        points.append(FocusPoint(x, y, result.z_um))
        focused.append((x, y, result.z_um))
    if not focused:
        raise FocusFailed("blank", f"no tissue point focused among {len(candidates)} candidates",
                          [])
    return FocusMapResult(fit_surface(focused, degree=degree), points, frames)
