"""The tiles-folder input format: tile images, ``positions.csv`` and ``scan.json``.

Kept separate so the scanner daemon (writer) and the offline pipeline (reader) share one
definition; see docs/wsi-pipeline.md. Every problem raises :class:`ScanFolderError` naming
the file (and line) and the reason.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from daemons.microscope.wsi.model import RgbImage, TilePlacement

POSITIONS_FILE = "positions.csv"
SCAN_FILE = "scan.json"
POSITION_COLUMNS = ("name", "row", "col", "x_um", "y_um")


class ScanFolderError(ValueError):
    """A tiles folder that cannot be stitched: ``FILE[:LINE]: reason``."""


@dataclass(frozen=True)
class Scan:
    """A tiles folder, checked: tiles exist, positions are finite, names unique."""

    folder: Path
    pixel_size_um: float
    tiles: tuple[TilePlacement, ...]
    tile_width: int
    tile_height: int

    def stage_px(self, tile: TilePlacement) -> tuple[float, float]:
        """Stage position of the tile's top-left pixel in slide pixels."""
        return (tile.x_um / self.pixel_size_um, tile.y_um / self.pixel_size_um)

    def read(self, tile: TilePlacement) -> RgbImage:
        """The tile as RGB; a missing, unreadable or wrongly sized image is a ScanFolderError."""
        return np.ascontiguousarray(self._read(tile, cv2.IMREAD_COLOR)[..., ::-1])

    def read_gray(self, tile: TilePlacement) -> npt.NDArray[np.uint8]:
        """The tile's luminance; for JPEG tiles decoding only luma is much cheaper."""
        return self._read(tile, cv2.IMREAD_GRAYSCALE)

    def _read(self, tile: TilePlacement, mode: int) -> npt.NDArray[np.uint8]:
        path = self.folder / tile.name
        image = cv2.imread(str(path), mode)
        if image is None:
            raise ScanFolderError(f"{path}: not a readable image")
        if image.shape[:2] != (self.tile_height, self.tile_width):
            raise ScanFolderError(
                f"{path}: {image.shape[1]}x{image.shape[0]} px, expected "
                f"{self.tile_width}x{self.tile_height} like the other tiles"
            )
        return np.asarray(image, dtype=np.uint8)


def load_scan(folder: Path) -> Scan:
    """Read and validate a tiles folder."""
    pixel_size = _read_pixel_size(folder / SCAN_FILE)
    tiles = _read_positions(folder / POSITIONS_FILE)
    first = folder / tiles[0].name
    header = cv2.imread(str(first), cv2.IMREAD_COLOR)
    if header is None:
        raise ScanFolderError(f"{first}: not a readable image")
    for tile in tiles:
        if not (folder / tile.name).is_file():
            raise ScanFolderError(f"{folder / POSITIONS_FILE}: tile {tile.name!r} has no image")
    return Scan(folder, pixel_size, tuple(tiles), int(header.shape[1]), int(header.shape[0]))


def _read_pixel_size(path: Path) -> float:
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise ScanFolderError(f"{path}: cannot read ({error.strerror})") from error
    except json.JSONDecodeError as error:
        raise ScanFolderError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from error
    value = document.get("pixel_size_um") if isinstance(document, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScanFolderError(f"{path}: pixel_size_um: a number is required")
    if not math.isfinite(value) or value <= 0:
        raise ScanFolderError(f"{path}: pixel_size_um: must be a positive number, got {value}")
    return float(value)


def _read_positions(path: Path) -> list[TilePlacement]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ScanFolderError(f"{path}: cannot read ({error.strerror})") from error
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in POSITION_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ScanFolderError(f"{path}: header lacks column(s) {', '.join(missing)}")
    tiles: list[TilePlacement] = []
    seen: set[str] = set()
    for number, record in enumerate(reader, start=2):
        where = f"{path}:{number}"
        name = (record.get("name") or "").strip()
        if not name or "/" in name or name in (".", ".."):
            raise ScanFolderError(f"{where}: name: a plain file name is required")
        if name in seen:
            raise ScanFolderError(f"{where}: name: {name!r} appears twice")
        seen.add(name)
        try:
            row, col = int(record["row"]), int(record["col"])
            x_um, y_um = float(record["x_um"]), float(record["y_um"])
        except (TypeError, ValueError) as error:
            reason = "row/col must be integers, x_um/y_um numbers"
            raise ScanFolderError(f"{where}: {reason}") from error
        if not (math.isfinite(x_um) and math.isfinite(y_um)):
            raise ScanFolderError(f"{where}: x_um/y_um must be finite")
        tiles.append(TilePlacement(name, row, col, x_um, y_um))
    if not tiles:
        raise ScanFolderError(f"{path}: no tiles listed")
    return tiles
