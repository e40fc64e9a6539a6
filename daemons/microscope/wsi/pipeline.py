"""From a tiles folder to an on-disk image pyramid: register, place, compose, downsample.

``build_pyramid`` is the entry point used by ``medge wsi build`` and the scanner daemon; the
DICOM writer consumes ``BuildResult.levels``. Input format and memory bound: docs/wsi-pipeline.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daemons.microscope.wsi.model import RgbImage
from daemons.microscope.wsi.placement import place
from daemons.microscope.wsi.pyramid import DiskLevel, build_levels, compose_base_level
from daemons.microscope.wsi.registration import RegistrationSettings, register_tiles
from daemons.microscope.wsi.scanfolder import load_scan

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class PairReport:
    a: str
    b: str
    ncc: float
    accepted: bool
    offset_px: tuple[float, float]
    """Offset used for placement: measured if accepted, else the stage model's."""
    residual_px: float | None
    """|placed - measured| for accepted pairs."""


@dataclass(frozen=True)
class RegistrationReport:
    """What the stitcher trusted, what it did not, and how well the result fits."""

    threshold: float
    """NCC threshold learned by the permutation test."""
    pairs: list[PairReport]
    flagged_tiles: list[str]
    """Tiles with no accepted pair: placed from the stage model only."""
    outlier_pairs: int
    """Pairs that passed NCC but contradicted the others, demoted to the stage model."""
    residual_rms_px: float
    residual_max_px: float

    @property
    def accepted(self) -> int:
        return sum(pair.accepted for pair in self.pairs)

    @property
    def rejected(self) -> int:
        return len(self.pairs) - self.accepted


@dataclass(frozen=True)
class BuildResult:
    levels: list[DiskLevel]
    """Base level first; each satisfies :class:`~daemons.microscope.wsi.model.PyramidLevel`."""
    report: RegistrationReport
    positions_px: dict[str, tuple[float, float]]
    """Final top-left position of each tile in base-level pixels."""
    timings_s: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: register, place, compose, pyramid."""
    camera_tile_reads: int = 0


def build_pyramid(
    tiles_dir: Path,
    work_dir: Path,
    *,
    tile_size: int = 512,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    settings: RegistrationSettings | None = None,
    outlier_px: float = 3.0,
) -> BuildResult:
    """Stitch the tiles folder into a pyramid under ``work_dir`` (created if needed).

    Raises :class:`~daemons.microscope.wsi.scanfolder.ScanFolderError` for a bad folder.
    """
    if tile_size < 16 or tile_size % 2:
        raise ValueError(f"tile_size: an even number >= 16 is required, got {tile_size}")
    scan = load_scan(tiles_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    stage = np.array([scan.stage_px(tile) for tile in scan.tiles], dtype=np.float64)
    rows = np.array([tile.row for tile in scan.tiles], dtype=np.int64)

    def read(index: int) -> RgbImage:
        return scan.read(scan.tiles[index])

    timings: dict[str, float] = {}
    started = time.perf_counter()
    outcome = register_tiles(
        [tuple(p) for p in stage.tolist()], scan.tile_width, scan.tile_height,
        lambda index: scan.read_gray(scan.tiles[index]),
        settings or RegistrationSettings(),
    )
    timings["register"] = time.perf_counter() - started

    started = time.perf_counter()
    placement = place(stage, rows, outcome.pairs, outcome.threshold, outlier_px)
    timings["place"] = time.perf_counter() - started

    started = time.perf_counter()
    base, reads = compose_base_level(
        placement.positions, read, scan.tile_width, scan.tile_height, work_dir / "level_0.raw",
        tile_size=tile_size, pixel_spacing_um=scan.pixel_size_um, cache_bytes=cache_bytes,
    )
    timings["compose"] = time.perf_counter() - started

    started = time.perf_counter()
    levels = build_levels(base, work_dir)
    timings["pyramid"] = time.perf_counter() - started

    origin = np.floor(placement.positions.min(axis=0))
    names = [tile.name for tile in scan.tiles]
    residual_of = iter(placement.residuals.tolist())
    pair_reports = []
    for pair, ok in zip(outcome.pairs, placement.accepted, strict=True):
        a, b = pair.geometry.a, pair.geometry.b
        used = placement.positions[b] - placement.positions[a]
        pair_reports.append(PairReport(
            names[a], names[b], pair.ncc, ok,
            (pair.offset if ok else (float(used[0]), float(used[1]))),
            next(residual_of) if ok else None,
        ))
    residuals = placement.residuals
    report = RegistrationReport(
        outcome.threshold, pair_reports, [names[i] for i in placement.flagged],
        len(placement.outliers),
        float(np.sqrt(np.mean(residuals**2))) if residuals.size else 0.0,
        float(residuals.max()) if residuals.size else 0.0,
    )
    positions = {
        name: (float(x), float(y))
        for name, (x, y) in zip(names, (placement.positions - origin).tolist(), strict=True)
    }
    return BuildResult(levels, report, positions, timings, reads)
