"""Virtual glass slides for the virtual camera: a procedural H&E-like slide, or an image file.

A slide is rendered one region at a time (:meth:`Slide.render`), never whole: a 15 x 15 mm
section at 0.5 µm/px is 30000 x 30000 px. The procedural slide is a pure function of the seed
and the slide position, so the same point looks the same in every region that contains it
(tiles overlap and must stitch) whatever the order of requests.

Slide coordinates are micrometres from the slide's top-left corner, x along the 75 mm side.
Pixel (row i, column j) of a render covers the point ``(left + (j + 0.5)·s, top + (i + 0.5)·s)``
where ``s`` is the requested µm per pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

RgbImage = npt.NDArray[np.uint8]
FloatImage = npt.NDArray[np.float32]
Affine = npt.NDArray[np.float64]
"""A 3 x 3 homogeneous 2-D affine transform."""

GLASS_RGB = (246, 246, 244)
LABEL_RGB = (232, 232, 228)

# Stain absorbance per unit optical density, RGB (Ruifrok & Johnston colour deconvolution).
HAEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29], np.float32)
EOSIN_OD = np.array([0.07, 0.99, 0.11], np.float32)


class SlideError(ValueError):
    """A slide cannot be built or rendered as asked; names what and why."""


class Slide(Protocol):
    """Anything the virtual camera can look at."""

    @property
    def width_um(self) -> float: ...
    @property
    def height_um(self) -> float: ...

    def render(
        self, left_um: float, top_um: float, width_px: int, height_px: int, um_per_px: float
    ) -> RgbImage:
        """The region at ``um_per_px``; outside the slide is bare glass."""
        ...


def check_region(width_px: int, height_px: int, um_per_px: float) -> None:
    if width_px <= 0 or height_px <= 0:
        raise SlideError(f"region size must be positive, got {width_px}x{height_px} px")
    if not (um_per_px > 0 and math.isfinite(um_per_px)):
        raise SlideError(f"um_per_px must be a positive number, got {um_per_px}")


def pixel_to_slide(left_um: float, top_um: float, um_per_px: float) -> Affine:
    """Output pixel (column, row) -> slide µm, sampling pixel centres."""
    return np.array(
        [[um_per_px, 0, left_um + 0.5 * um_per_px],
         [0, um_per_px, top_um + 0.5 * um_per_px],
         [0, 0, 1]],
        np.float64,
    )


def sample(source: npt.NDArray[Any], source_from_pixel: Affine, width_px: int,
           height_px: int, border: float | tuple[int, ...], cubic: bool = False
           ) -> npt.NDArray[Any]:
    """Resample ``source`` (pixel centres at integer coordinates) onto the output grid."""
    interpolation = cv2.INTER_CUBIC if cubic else cv2.INTER_LINEAR
    return np.asarray(cv2.warpAffine(
        source, source_from_pixel[:2], (width_px, height_px),
        flags=interpolation | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT, borderValue=border,
    ))


# --- deterministic noise --------------------------------------------------------------------

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_M3 = np.uint64(0xFF51AFD7ED558CCD)
_M4 = np.uint64(0xC4CEB9FE1A85EC53)


def hash01(seed: int, ix: npt.NDArray[np.int64], iy: npt.NDArray[np.int64]) -> FloatImage:
    """A uniform [0, 1) value per integer lattice point (broadcast ``ix`` against ``iy``)."""
    with np.errstate(over="ignore"):
        h = ix.astype(np.uint64) * _M1 ^ iy.astype(np.uint64) * _M2
        h ^= np.uint64(seed & 0xFFFFFFFF) * _M3
        h ^= h >> np.uint64(33)
        h *= _M3
        h ^= h >> np.uint64(29)
        h *= _M4
        h ^= h >> np.uint64(32)
    return ((h >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)).astype(np.float32)


CUBIC_A = -0.75  # OpenCV's INTER_CUBIC kernel, so both interpolation paths agree
EXACT_BELOW_LATTICE_PER_PX = 1 / 16


def lattice_noise(seed: int, lattice_from_slide: Affine, slide_from_pixel: Affine,
                  width_px: int, height_px: int) -> FloatImage:
    """Smooth value noise in [0, 1]: random values on an integer lattice (placed on the slide by
    ``lattice_from_slide``, which may scale, stretch and rotate it) interpolated bicubically.

    ``warpAffine`` quantises source positions to 1/32 of a lattice cell, which shows as steps
    when a cell spans many pixels; large axis-aligned cells are therefore interpolated exactly,
    as two small matrix products (the kernel is separable)."""
    lattice_from_pixel = lattice_from_slide @ slide_from_pixel
    corners = lattice_from_pixel @ np.array(
        [[0, width_px, 0, width_px], [0, 0, height_px, height_px], [1, 1, 1, 1]], np.float64
    )
    ix0, iy0 = (np.floor(corners[:2].min(axis=1)) - 2).astype(np.int64)
    ix1, iy1 = (np.ceil(corners[:2].max(axis=1)) + 3).astype(np.int64)
    values = hash01(seed, np.arange(ix0, ix1)[None, :], np.arange(iy0, iy1)[:, None])
    axis_aligned = lattice_from_pixel[0, 1] == 0 and lattice_from_pixel[1, 0] == 0
    if axis_aligned and max(lattice_from_pixel[0, 0], lattice_from_pixel[1, 1]) < (
            EXACT_BELOW_LATTICE_PER_PX):
        along_x = cubic_weights(lattice_from_pixel[0, 0] * np.arange(width_px)
                                + lattice_from_pixel[0, 2] - ix0, ix1 - ix0)
        along_y = cubic_weights(lattice_from_pixel[1, 1] * np.arange(height_px)
                                + lattice_from_pixel[1, 2] - iy0, iy1 - iy0)
        noise = along_y @ values @ along_x.T
    else:
        shift = np.array([[1, 0, -ix0], [0, 1, -iy0], [0, 0, 1]], np.float64)
        noise = sample(values, shift @ lattice_from_pixel, width_px, height_px, 0.5, cubic=True)
    clipped: FloatImage = np.clip(noise, 0, 1).astype(np.float32)
    return clipped


def cubic_weights(positions: npt.NDArray[np.float64], size: int) -> FloatImage:
    """(len(positions) x size) matrix interpolating a 1-D lattice at the positions."""
    base = np.floor(positions).astype(np.int64)
    t = (positions - base).astype(np.float32)
    a = CUBIC_A
    left = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    centre = ((a + 2) * t - (a + 3)) * t * t + 1
    right = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    weights = np.zeros((len(positions), size), np.float32)
    rows = np.arange(len(positions))
    for offset, weight in ((-1, left), (0, centre), (1, right), (2, 1 - left - centre - right)):
        weights[rows, base + offset] = weight
    return weights


def scale_rotate(cell_x_um: float, cell_y_um: float, angle_rad: float = 0.0) -> Affine:
    """Slide µm -> lattice units, cells ``cell_x_um`` by ``cell_y_um`` rotated by the angle."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array(
        [[c / cell_x_um, s / cell_x_um, 0], [-s / cell_y_um, c / cell_y_um, 0], [0, 0, 1]],
        np.float64,
    )


def smoothstep(edge0: float, edge1: float, x: FloatImage) -> FloatImage:
    t = np.clip((x - edge0) / (edge1 - edge0), 0, 1)
    eased: FloatImage = (t * t * (3 - 2 * t)).astype(np.float32)
    return eased


# --- the procedural H&E slide ---------------------------------------------------------------

SALT_SECTION, SALT_HOLES, SALT_FIBRES, SALT_FINE, SALT_DENSITY = 1, 2, 3, 4, 5
SALT_NUCLEI = 16  # nuclei use SALT_NUCLEI + 0..7
LABEL_UM_PER_PX = 10.0


@dataclass(frozen=True)
class ProceduralSlide:
    """A 75 x 25 mm slide: label at the left end, one H&E-stained tissue section on the rest.

    Tissue: pink eosin stroma with fibres, purple haematoxylin nuclei (denser in some areas),
    holes and an irregular outline leaving bare glass around. Detail below ~2 px (fibres,
    single nuclei) is replaced by its average at coarse scales, so an overview render of the
    whole slide stays cheap and looks like the downscaled full-resolution image.
    """

    seed: int = 0
    width_um: float = 75_000.0
    height_um: float = 25_000.0
    label_width_um: float = 20_000.0
    section_centre_um: tuple[float, float] = (47_500.0, 12_500.0)
    section_radius_um: float = 7_500.0
    nucleus_cell_um: float = 9.0

    def __post_init__(self) -> None:
        if not 0 < self.label_width_um < self.width_um or self.height_um <= 0:
            raise SlideError("slide: need 0 < label_width_um < width_um and height_um > 0")
        if self.section_radius_um <= 0 or self.nucleus_cell_um <= 0:
            raise SlideError("slide: section_radius_um and nucleus_cell_um must be > 0")

    def render(
        self, left_um: float, top_um: float, width_px: int, height_px: int, um_per_px: float
    ) -> RgbImage:
        check_region(width_px, height_px, um_per_px)
        to_slide = pixel_to_slide(left_um, top_um, um_per_px)
        tissue = self._tissue(to_slide, width_px, height_px)
        image = np.empty((height_px, width_px, 3), np.uint8)
        image[:] = GLASS_RGB
        if tissue.any():
            eosin = tissue * self._stroma(to_slide, width_px, height_px, um_per_px)
            haematoxylin = tissue * self._nuclei(left_um, top_um, width_px, height_px, um_per_px)
            optical_density = (eosin[..., None] * EOSIN_OD
                               + haematoxylin[..., None] * HAEMATOXYLIN_OD)
            stained = np.asarray(GLASS_RGB, np.float32) * np.exp(-optical_density)
            image = np.clip(stained + 0.5, 0, 255).astype(np.uint8)
        self._draw_label(image, to_slide)
        return image

    def _tissue(self, to_slide: Affine, width_px: int, height_px: int) -> FloatImage:
        """Tissue coverage in [0, 1]: a noisy disc minus holes, zero on the label and off-slide."""
        cx, cy = self.section_centre_um
        radius = self.section_radius_um
        xs = to_slide[0, 2] + to_slide[0, 0] * np.arange(width_px, dtype=np.float64)
        ys = to_slide[1, 2] + to_slide[1, 1] * np.arange(height_px, dtype=np.float64)
        distance = np.hypot(xs[None, :] - cx, ys[:, None] - cy).astype(np.float32) / radius
        if distance.min() > 1.4:
            return np.zeros((height_px, width_px), np.float32)
        outline = lattice_noise(self.seed * 64 + SALT_SECTION, scale_rotate(2500, 2500),
                                to_slide, width_px, height_px)
        holes = lattice_noise(self.seed * 64 + SALT_HOLES, scale_rotate(400, 300),
                              to_slide, width_px, height_px)
        coverage = smoothstep(1.0, 0.92, distance + 0.45 * (outline - 0.5))
        coverage *= smoothstep(0.80, 0.74, holes)
        on_slide = ((xs >= self.label_width_um) & (xs < self.width_um))[None, :] & (
            (ys >= 0) & (ys < self.height_um))[:, None]
        tissue: FloatImage = (coverage * on_slide).astype(np.float32)
        return tissue

    def _detail(self, salt: int, cell: Affine, to_slide: Affine, width_px: int,
                height_px: int, um_per_px: float, cell_um: float) -> FloatImage:
        """Noise too fine to show at this scale is replaced by its mean, 0.5."""
        if cell_um < 2 * um_per_px:
            return np.full((height_px, width_px), 0.5, np.float32)
        return lattice_noise(self.seed * 64 + salt, cell, to_slide, width_px, height_px)

    def _stroma(self, to_slide: Affine, width_px: int, height_px: int,
                um_per_px: float) -> FloatImage:
        """Eosin density: wavy collagen fibres plus fine texture."""
        fibres = self._detail(SALT_FIBRES, scale_rotate(60, 5, 0.5), to_slide, width_px,
                              height_px, um_per_px, 5)
        fine = self._detail(SALT_FINE, scale_rotate(2.5, 2.5), to_slide, width_px, height_px,
                            um_per_px, 2.5)
        return (0.25 + 0.55 * fibres**2 + 0.25 * fine).astype(np.float32)

    def _nuclei(self, left_um: float, top_um: float, width_px: int, height_px: int,
                um_per_px: float) -> FloatImage:
        """Haematoxylin density: one candidate nucleus per ``nucleus_cell_um`` grid cell, kept
        with a probability that follows a slowly varying cellularity field."""
        cell = self.nucleus_cell_um
        gx0, gy0 = math.floor(left_um / cell) - 1, math.floor(top_um / cell) - 1
        gx1 = math.ceil((left_um + width_px * um_per_px) / cell) + 1
        gy1 = math.ceil((top_um + height_px * um_per_px) / cell) + 1
        cell_centres = pixel_to_slide(gx0 * cell, gy0 * cell, cell)
        cellularity = lattice_noise(self.seed * 64 + SALT_DENSITY, scale_rotate(350, 350),
                                    cell_centres, gx1 - gx0, gy1 - gy0)
        probability = np.clip(1.6 * cellularity - 0.35, 0.05, 0.95)
        background = np.float32(0.06)
        if cell < 4 * um_per_px:
            # Nuclei smaller than a couple of pixels: draw their average stain instead.
            mean_cover = 0.25
            density = sample(probability.astype(np.float32),
                             np.linalg.inv(cell_centres) @ pixel_to_slide(left_um, top_um,
                                                                          um_per_px),
                             width_px, height_px, 0.0)
            return (background + density * mean_cover).astype(np.float32)
        ix = np.arange(gx0, gx1, dtype=np.int64)[None, :]
        iy = np.arange(gy0, gy1, dtype=np.int64)[:, None]
        r = [hash01(self.seed * 64 + SALT_NUCLEI + k, ix, iy) for k in range(7)]
        keep = r[0] < probability
        pad = 2  # OpenCV anti-aliases clipped shapes differently at the image border
        nucleus_x = (ix + 0.2 + 0.6 * r[1] - left_um / cell) * (cell / um_per_px) - 0.5 + pad
        nucleus_y = (iy + 0.2 + 0.6 * r[2] - top_um / cell) * (cell / um_per_px) - 0.5 + pad
        major = (2.2 + 1.8 * r[3]) / um_per_px
        minor = major * (0.55 + 0.4 * r[4])
        angle = 180.0 * r[5]
        shade = 150 + 105 * r[6]
        layer = np.zeros((height_px + 2 * pad, width_px + 2 * pad), np.uint8)
        subpixel = 16  # cv2 drawing with shift=4: coordinates in 1/16 px
        for y, x in zip(*np.nonzero(keep), strict=True):
            cv2.ellipse(
                layer,
                (round(float(nucleus_x[y, x]) * subpixel),
                 round(float(nucleus_y[y, x]) * subpixel)),
                (round(float(major[y, x]) * subpixel), round(float(minor[y, x]) * subpixel)),
                float(angle[y, x]), 0, 360, int(shade[y, x]), -1, cv2.LINE_AA, 4,
            )
        drawn = layer[pad:-pad, pad:-pad].astype(np.float32)
        return (background + drawn * np.float32(1.1 / 255)).astype(np.float32)

    def _draw_label(self, image: RgbImage, to_slide: Affine) -> None:
        right_px = (self.label_width_um - to_slide[0, 2]) / to_slide[0, 0]
        if right_px <= 0:
            return
        label_from_pixel = np.diag([1 / LABEL_UM_PER_PX, 1 / LABEL_UM_PER_PX, 1]) @ to_slide
        height_px, width_px = image.shape[:2]
        label = sample(self._label_image, label_from_pixel, width_px, height_px, GLASS_RGB)
        columns = min(width_px, math.ceil(right_px))
        image[:, :columns] = label[:, :columns]

    @cached_property
    def _label_image(self) -> RgbImage:
        """The paper label at 10 µm/px (2000 x 2500 px): text and a barcode-like stripe code."""
        width = round(self.label_width_um / LABEL_UM_PER_PX)
        height = round(self.height_um / LABEL_UM_PER_PX)
        label = np.empty((height, width, 3), np.uint8)
        label[:] = LABEL_RGB
        for row, text in enumerate(("MEDGE SIM", f"SEED {self.seed}", "H&E")):
            cv2.putText(label, text, (width // 12, height // 8 + row * height // 9),
                        cv2.FONT_HERSHEY_DUPLEX, width / 450, (30, 30, 30), max(1, width // 300),
                        cv2.LINE_AA)
        bars = hash01(self.seed * 64 + SALT_NUCLEI + 8, np.arange(60)[None, :],
                      np.zeros((1, 1), np.int64))[0]
        x = width // 10
        top, bottom = height // 2, height * 9 // 10
        for value in bars:
            bar = max(2, round(width * (0.004 + 0.01 * float(value))))
            if value > 0.4:
                label[top:bottom, x:x + bar] = 20
            x += bar + max(2, width // 250)
            if x > width * 9 // 10:
                break
        return label


@dataclass(frozen=True)
class ImageSlide:
    """A slide from an image file with a known pixel size (µm per pixel of the file)."""

    image: RgbImage
    source_um_per_px: float

    @classmethod
    def from_file(cls, path: Path, source_um_per_px: float) -> ImageSlide:
        if not (source_um_per_px > 0 and math.isfinite(source_um_per_px)):
            raise SlideError(f"{path}: source_um_per_px must be > 0, got {source_um_per_px}")
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SlideError(f"{path}: not a readable image file")
        return cls(np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.uint8), source_um_per_px)

    @property
    def width_um(self) -> float:
        return float(self.image.shape[1] * self.source_um_per_px)

    @property
    def height_um(self) -> float:
        return float(self.image.shape[0] * self.source_um_per_px)

    def render(
        self, left_um: float, top_um: float, width_px: int, height_px: int, um_per_px: float
    ) -> RgbImage:
        check_region(width_px, height_px, um_per_px)
        scale = um_per_px / self.source_um_per_px
        if scale >= 2:
            return self._shrunk(left_um, top_um, width_px, height_px, um_per_px, math.floor(scale))
        source_from_slide = np.array(
            [[1 / self.source_um_per_px, 0, -0.5], [0, 1 / self.source_um_per_px, -0.5],
             [0, 0, 1]], np.float64)
        to_slide = pixel_to_slide(left_um, top_um, um_per_px)
        rendered: RgbImage = sample(self.image, source_from_slide @ to_slide, width_px,
                                    height_px, GLASS_RGB)
        return rendered

    def _shrunk(self, left_um: float, top_um: float, width_px: int, height_px: int,
                um_per_px: float, factor: int) -> RgbImage:
        """Average ``factor`` x ``factor`` source pixels (INTER_AREA) over the region only, so
        fine detail does not alias and a large image is never resized whole."""
        step_um = self.source_um_per_px * factor

        def block_range(start_um: float, length_px: int, limit: int) -> tuple[int, int]:
            first = max(0, (math.floor(start_um / step_um) - 1) * factor)
            last = min(limit, (math.ceil((start_um + length_px * um_per_px) / step_um) + 1)
                       * factor)
            return first, last

        c0, c1 = block_range(left_um, width_px, self.image.shape[1])
        r0, r1 = block_range(top_um, height_px, self.image.shape[0])
        if c1 <= c0 or r1 <= r0:
            return np.full((height_px, width_px, 3), GLASS_RGB, np.uint8)
        size = (math.ceil((c1 - c0) / factor), math.ceil((r1 - r0) / factor))
        small = np.asarray(
            cv2.resize(self.image[r0:r1, c0:c1], size, interpolation=cv2.INTER_AREA), np.uint8)
        return ImageSlide(small, step_um).render(
            left_um - c0 * self.source_um_per_px, top_um - r0 * self.source_um_per_px,
            width_px, height_px, um_per_px)
