"""The data passed between the stitching/pyramid stage and the DICOM writer.

Kept in one small module so the two halves of the pipeline agree on one contract:
the pyramid builder produces :class:`PyramidLevel` objects, the writer consumes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

RgbImage = npt.NDArray[np.uint8]
"""H x W x 3, RGB order, uint8."""


class PyramidLevel(Protocol):
    """One resolution level, tiled for TILED_FULL: tiles in row-major order, left to right,
    top to bottom; every tile is ``tile_size`` x ``tile_size`` x 3 (edge tiles padded white).

    ``tiles()`` may be called more than once (the writer may make several passes, e.g. a lossy
    and a lossless series); implementations read from disk so memory stays bounded.
    """

    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def tile_size(self) -> int: ...
    @property
    def pixel_spacing_um(self) -> float:
        """Micrometres per pixel at this level (square pixels)."""
        ...

    def tiles(self) -> Iterator[RgbImage]: ...


@dataclass(frozen=True)
class TilePlacement:
    """Where one acquired camera tile lies on the slide."""

    name: str
    """File name (or id) of the tile image."""
    row: int
    col: int
    x_um: float
    y_um: float
    """Stage position of the tile's top-left pixel, micrometres."""


@dataclass(frozen=True)
class SlideMetadata:
    """What the DICOM writer needs besides pixels; filled from the scan job."""

    patient_id: str
    accession_number: str
    barcode: str
    stain: str = "HE"
    patient_name: str = ""
    study_description: str = "Whole slide imaging"
    specimen_id: str = ""
    container_id: str = ""
    objective_magnification: float = 20.0
    numerical_aperture: float = 0.4
    label_text: str = ""
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    """Fixed UIDs make re-writing and re-sending idempotent; None: generated once per slide."""
    extra: dict[str, str] = field(default_factory=dict)
