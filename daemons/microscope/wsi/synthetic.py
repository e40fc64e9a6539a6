"""Synthetic slides with known ground truth, for the stitching tests and ``bench/stitch``.

The slide is a deterministic function of global pixel coordinates (hashed value noise at several
scales, coloured like H&E), so any region can be rendered on demand and a 60,000 px slide never
has to exist in memory. Tiles are cut at the *true* stage positions, which differ from the
*reported* ones by random jitter plus a backlash-like offset that flips with the serpentine scan
direction; vignetting and sensor noise are added per tile. The caller gets the truth back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from daemons.microscope.wsi.model import RgbImage

FloatImage = npt.NDArray[np.float32]

_HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29], dtype=np.float32) * 1.6
_EOSIN_OD = np.array([0.07, 0.99, 0.11], dtype=np.float32) * 1.1


@dataclass(frozen=True)
class Rect:
    """Axis-aligned rectangle in slide pixels, [x0, x1) x [y0, y1)."""

    x0: float
    y0: float
    x1: float
    y1: float


@dataclass(frozen=True)
class SyntheticSlide:
    """An H&E-looking texture defined everywhere; ``glass`` rectangles are empty (white) glass."""

    seed: int = 1
    glass: tuple[Rect, ...] = ()
    bare_glass: float = 0.3
    """Share of the slide, roughly, left bare by the tissue outline; 0 covers it all."""
    period: int | None = None
    """Repeat a ``period``-px square of texture: rendering becomes a cheap lookup, for slides
    of thousands of tiles (keep it far above the registration search range)."""

    def render(self, x0: float, y0: float, width: int, height: int) -> RgbImage:
        """Pixels [x0, x0+width) x [y0, y0+height) of the slide; sub-pixel x0/y0 are honoured."""
        ix, iy = math.floor(x0) - 1, math.floor(y0) - 1
        if self.period is None:
            region = self._render_integer(ix, iy, width + 4, height + 4)
        else:
            rows = np.arange(iy, iy + height + 4) % self.period
            cols = np.arange(ix, ix + width + 4) % self.period
            region = _texture(self)[rows[:, None], cols[None, :]]
        shift = np.array([[1.0, 0.0, x0 - ix], [0.0, 1.0, y0 - iy]], dtype=np.float64)
        out = cv2.warpAffine(
            region, shift, (width, height), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
        )
        return np.asarray(out, dtype=np.uint8)

    def _render_integer(self, x0: int, y0: int, width: int, height: int) -> RgbImage:
        def octave(cell: int, salt: int) -> FloatImage:
            return _value_noise(self.seed * 7919 + salt, cell, x0, y0, width, height)

        # With no bare glass the outline only modulates the stain, never reaching zero.
        floor = 0.5 if self.bare_glass <= 0 else 0.0
        tissue = np.clip((octave(700, 1) - self.bare_glass) * 4.0 + floor, 0.0, 1.0)
        fibres = 0.5 * octave(40, 2) + 0.3 * octave(12, 3) + 0.2 * octave(4, 4)
        nuclei = np.clip((octave(9, 5) - 0.55) * 5.0, 0.0, 1.0) * (0.6 + 0.4 * octave(3, 6))
        eosin = tissue * (0.25 + 0.6 * fibres)
        hematoxylin = tissue * nuclei
        density = eosin[..., None] * _EOSIN_OD + hematoxylin[..., None] * _HEMATOXYLIN_OD
        rgb = 250.0 * np.exp(-density)
        for rect in self.glass:
            gx0 = int(np.clip(math.ceil(rect.x0) - x0, 0, width))
            gx1 = int(np.clip(math.ceil(rect.x1) - x0, 0, width))
            gy0 = int(np.clip(math.ceil(rect.y0) - y0, 0, height))
            gy1 = int(np.clip(math.ceil(rect.y1) - y0, 0, height))
            rgb[gy0:gy1, gx0:gx1] = 250.0
        return np.asarray(np.clip(rgb + 0.5, 0, 255), dtype=np.uint8)


@cache
def _texture(slide: SyntheticSlide) -> RgbImage:
    assert slide.period is not None
    return slide._render_integer(0, 0, slide.period, slide.period)


def _value_noise(
    seed: int, cell: int, x0: int, y0: int, width: int, height: int
) -> FloatImage:
    """Smooth noise in [0, 1]: hashed lattice values every ``cell`` px, cubic-interpolated.

    Rendering starts on a lattice point so the result at a global pixel does not depend on
    which region it was rendered in.
    """
    i0, j0 = x0 // cell - 2, y0 // cell - 2
    ni = (x0 + width) // cell - i0 + 3
    nj = (y0 + height) // cell - j0 + 3
    i = np.arange(i0, i0 + ni, dtype=np.int64).astype(np.uint64)
    j = np.arange(j0, j0 + nj, dtype=np.int64).astype(np.uint64)
    h = (i[None, :] * np.uint64(0x9E3779B97F4A7C15)) ^ (j[:, None] * np.uint64(0xC2B2AE3D27D4EB4F))
    h ^= np.uint64((seed * 0x165667B1) & 0xFFFFFFFFFFFFFFFF)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    lattice = ((h >> np.uint64(40)).astype(np.float32) / float(1 << 24)).astype(np.float32)
    ox, oy = x0 - i0 * cell, y0 - j0 * cell
    if cell < 16:
        # cv2.resize maps destination pixel u to source (u + 0.5) / cell - 0.5: global and exact.
        up = cv2.resize(lattice, (ni * cell, nj * cell), interpolation=cv2.INTER_CUBIC)
        values = up[oy : oy + height, ox : ox + width]
    else:
        # Coarse cells: a full resize would be huge, so interpolate with two small matrices.
        rows = _cubic_weights(oy, height, cell, nj)
        values = rows @ lattice @ _cubic_weights(ox, width, cell, ni).T
    return np.asarray(np.clip(values, 0.0, 1.0), dtype=np.float32)


def _cubic_weights(offset: int, count: int, cell: int, nodes: int) -> FloatImage:
    """Catmull-Rom weights taking ``nodes`` lattice values to ``count`` pixels from ``offset``."""
    coord = (np.arange(offset, offset + count, dtype=np.float64) + 0.5) / cell - 0.5
    distance = np.abs(np.arange(nodes, dtype=np.float64)[None, :] - coord[:, None])
    near = 1.5 * distance**3 - 2.5 * distance**2 + 1.0
    far = -0.5 * distance**3 + 2.5 * distance**2 - 4.0 * distance + 2.0
    weights = np.where(distance < 1.0, near, np.where(distance < 2.0, far, 0.0))
    return np.asarray(weights, dtype=np.float32)


@dataclass(frozen=True)
class ScanSpec:
    """How the synthetic scanner acquires the slide."""

    rows: int
    cols: int
    tile_width: int = 320
    tile_height: int = 240
    overlap: float = 0.12
    """Nominal overlap fraction between neighbouring tiles."""
    pixel_size_um: float = 0.5
    jitter_px: float = 3.0
    """Standard deviation of the random stage error, pixels (clipped at 3 sigma)."""
    backlash_px: tuple[float, float] = (6.0, 2.5)
    """Systematic (x, y) offset whose sign flips with the serpentine row direction."""
    noise: float = 2.0
    """Sensor noise standard deviation, grey levels."""
    vignetting: float = 0.12
    """Relative brightness loss in the tile corners."""
    skip: frozenset[tuple[int, int]] = frozenset()
    """(row, col) positions not acquired: holes, tissue-only scans."""
    origin_px: tuple[float, float] = (200.0, 200.0)
    image_format: str = ".png"
    jpeg_quality: int = 95
    seed: int = 1

    @property
    def step_px(self) -> tuple[float, float]:
        return (self.tile_width * (1 - self.overlap), self.tile_height * (1 - self.overlap))


@dataclass(frozen=True)
class GroundTruth:
    """Where the tiles really are (top-left pixel, slide pixels) and where the stage said."""

    true_px: dict[str, tuple[float, float]]
    stage_px: dict[str, tuple[float, float]]
    spec: ScanSpec
    slide: SyntheticSlide = field(default_factory=SyntheticSlide)


@dataclass(frozen=True)
class PlannedTile:
    name: str
    row: int
    col: int
    stage_px: tuple[float, float]
    true_px: tuple[float, float]


def plan_scan(spec: ScanSpec) -> list[PlannedTile]:
    """Serpentine acquisition order with the stage errors drawn once, reproducibly."""
    rng = np.random.default_rng(spec.seed)
    step_x, step_y = spec.step_px
    planned: list[PlannedTile] = []
    for row in range(spec.rows):
        cols = range(spec.cols) if row % 2 == 0 else range(spec.cols - 1, -1, -1)
        direction = 1.0 if row % 2 == 0 else -1.0
        for col in cols:
            jitter = np.clip(rng.normal(0.0, spec.jitter_px, 2), -3 * spec.jitter_px,
                             3 * spec.jitter_px) if spec.jitter_px > 0 else np.zeros(2)
            if (row, col) in spec.skip:
                continue
            stage = (spec.origin_px[0] + col * step_x, spec.origin_px[1] + row * step_y)
            true = (
                stage[0] + direction * spec.backlash_px[0] / 2 + float(jitter[0]),
                stage[1] + direction * spec.backlash_px[1] / 2 + float(jitter[1]),
            )
            planned.append(PlannedTile(f"tile_r{row:03d}_c{col:03d}", row, col, stage, true))
    return planned


def acquire(slide: SyntheticSlide, spec: ScanSpec, tile: PlannedTile) -> RgbImage:
    """What the camera records at the tile's true position: vignetting and noise included."""
    image = slide.render(tile.true_px[0], tile.true_px[1], spec.tile_width, spec.tile_height)
    falloff = _vignetting(spec.tile_width, spec.tile_height, spec.vignetting)
    rng = np.random.default_rng([spec.seed, tile.row, tile.col])
    noisy = image.astype(np.float32) * falloff[..., None]
    if spec.noise > 0:
        noisy += rng.normal(0.0, spec.noise, noisy.shape).astype(np.float32)
    return np.asarray(np.clip(noisy + 0.5, 0, 255), dtype=np.uint8)


def _vignetting(width: int, height: int, strength: float) -> FloatImage:
    u = (np.arange(width, dtype=np.float32) - (width - 1) / 2) / (width / 2)
    v = (np.arange(height, dtype=np.float32) - (height - 1) / 2) / (height / 2)
    r2 = (u[None, :] ** 2 + v[:, None] ** 2) / 2
    return np.asarray(1.0 - strength * r2, dtype=np.float32)


def write_scan(
    out_dir: Path, spec: ScanSpec, slide: SyntheticSlide | None = None, workers: int = 1
) -> GroundTruth:
    """Write a tiles folder (images, ``positions.csv``, ``scan.json``) and return the truth.

    ``workers`` > 1 renders tiles in that many processes (big bench slides).
    """
    slide = slide or SyntheticSlide(seed=spec.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    planned = plan_scan(spec)
    jobs = [(out_dir, spec, slide, tile) for tile in planned]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            names = list(pool.map(_write_tile, jobs, chunksize=8))
    else:
        names = [_write_tile(job) for job in jobs]
    lines = ["name,row,col,x_um,y_um"]
    for tile, file_name in zip(planned, names, strict=True):
        x_um = tile.stage_px[0] * spec.pixel_size_um
        y_um = tile.stage_px[1] * spec.pixel_size_um
        lines.append(f"{file_name},{tile.row},{tile.col},{x_um:.4f},{y_um:.4f}")
    (out_dir / "positions.csv").write_text("\n".join(lines) + "\n")
    (out_dir / "scan.json").write_text(json.dumps({"pixel_size_um": spec.pixel_size_um}) + "\n")
    true_px = {name: tile.true_px for tile, name in zip(planned, names, strict=True)}
    stage_px = {name: tile.stage_px for tile, name in zip(planned, names, strict=True)}
    return GroundTruth(true_px, stage_px, spec, slide)


def _write_tile(job: tuple[Path, ScanSpec, SyntheticSlide, PlannedTile]) -> str:
    out_dir, spec, slide, tile = job
    file_name = tile.name + spec.image_format
    params = [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality] if spec.image_format == ".jpg" else []
    if not cv2.imwrite(str(out_dir / file_name), acquire(slide, spec, tile)[..., ::-1], params):
        raise OSError(f"{out_dir / file_name}: could not write the tile image")
    return file_name


def position_errors(
    found_px: dict[str, tuple[float, float]],
    true_px: dict[str, tuple[float, float]],
    names: Sequence[str] | None = None,
) -> npt.NDArray[np.float64]:
    """Euclidean error per tile after removing the common offset (the slide origin is arbitrary)."""
    keys = list(names) if names is not None else sorted(true_px)
    found = np.array([found_px[k] for k in keys], dtype=np.float64)
    true = np.array([true_px[k] for k in keys], dtype=np.float64)
    delta = found - true
    delta -= delta.mean(axis=0)
    return np.asarray(np.hypot(delta[:, 0], delta[:, 1]), dtype=np.float64)
