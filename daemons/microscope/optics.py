"""Objective lenses: pixel size on the sample and depth of field.

The depth of field sets how precise focus must be: autofocus step sizes and the focus map's
accuracy target are both derived from it, so a change of objective rescales them together.
"""

from __future__ import annotations

from dataclasses import dataclass

GREEN_WAVELENGTH_UM = 0.55


@dataclass(frozen=True)
class Objective:
    """One objective on one camera: ``um_per_px`` is the camera pixel size on the sample."""

    name: str
    magnification: float
    numerical_aperture: float
    um_per_px: float
    immersion_index: float = 1.0
    wavelength_um: float = GREEN_WAVELENGTH_UM

    def __post_init__(self) -> None:
        if not 0 < self.numerical_aperture < self.immersion_index:
            raise ValueError(
                f"objective {self.name}: numerical_aperture {self.numerical_aperture} must be"
                f" in (0, immersion_index={self.immersion_index})"
            )
        if self.um_per_px <= 0 or self.magnification <= 0:
            raise ValueError(f"objective {self.name}: magnification and um_per_px must be > 0")

    @property
    def depth_of_field_um(self) -> float:
        """Total depth of field, wave-optical plus detector term (Nikon/Berek formula):
        ``λ·n/NA² + n·e/(M·NA)`` where ``e/M`` is the pixel size on the sample."""
        na = self.numerical_aperture
        n = self.immersion_index
        return self.wavelength_um * n / na**2 + n * self.um_per_px / na

    @property
    def focus_tolerance_um(self) -> float:
        """How far from best focus an image still counts as in focus: half the depth of field."""
        return self.depth_of_field_um / 2


OBJECTIVES: dict[str, Objective] = {
    objective.name: objective
    for objective in (
        Objective("10x", magnification=10, numerical_aperture=0.25, um_per_px=1.0),
        Objective("20x", magnification=20, numerical_aperture=0.40, um_per_px=0.5),
        Objective("40x", magnification=40, numerical_aperture=0.65, um_per_px=0.25),
    )
}
"""Plan achromats on a camera with 10 µm pixels (5 µm sensor pixels binned or a 0.5x adapter)."""
