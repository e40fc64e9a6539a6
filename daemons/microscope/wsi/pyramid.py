"""Streamed composition of the placed tiles into a tiled, on-disk image pyramid.

The base level is produced one output tile at a time: each output tile gathers the camera
tiles that cover it, shifted by their sub-pixel remainder and blended with a feathering weight
(the product of the distances to the tile's edges), and is written straight to disk. Output
tiles are visited in vertical strips (top to bottom within a strip), so the camera tiles in
use at any time are about two rows of one strip: they fit a fixed-size LRU cache, and memory
does not grow with the slide. Each lower level is made from 2 x 2 tiles of the level above.

Level files are raw RGB tiles in TILED_FULL order (row-major), one file per level, read back
with positional reads so ``tiles()`` can be iterated any number of times without mapping the
file into memory.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from daemons.microscope.wsi.model import RgbImage

MANIFEST = "pyramid.json"
WHITE = 255


@dataclass(frozen=True)
class DiskLevel:
    """One pyramid level stored as raw tiles in one file (a :class:`PyramidLevel`)."""

    path: Path
    width: int
    height: int
    tile_size: int
    pixel_spacing_um: float

    @property
    def columns(self) -> int:
        return math.ceil(self.width / self.tile_size)

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.tile_size)

    @property
    def tile_bytes(self) -> int:
        return self.tile_size * self.tile_size * 3

    def tile(self, col: int, row: int) -> RgbImage:
        """One tile; outside the grid it is white glass."""
        if not (0 <= col < self.columns and 0 <= row < self.rows):
            return np.full((self.tile_size, self.tile_size, 3), WHITE, dtype=np.uint8)
        with self.path.open("rb") as stream:
            return self._read(stream.fileno(), row * self.columns + col)

    def tiles(self) -> Iterator[RgbImage]:
        with self.path.open("rb") as stream:
            for index in range(self.columns * self.rows):
                yield self._read(stream.fileno(), index)

    def _read(self, fd: int, index: int) -> RgbImage:
        data = os.pread(fd, self.tile_bytes, index * self.tile_bytes)
        if len(data) != self.tile_bytes:
            raise OSError(f"{self.path}: truncated at tile {index}")
        shape = (self.tile_size, self.tile_size, 3)
        return np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()


class TileCache:
    """LRU of sub-pixel-shifted camera tiles, bounded in bytes."""

    def __init__(self, load: Callable[[int], RgbImage], capacity_bytes: int) -> None:
        self._load = load
        self._capacity = capacity_bytes
        self._held: OrderedDict[int, RgbImage] = OrderedDict()
        self._bytes = 0
        self.loads = 0

    def get_many(self, indices: list[int], pool: ThreadPoolExecutor) -> dict[int, RgbImage]:
        """The tiles asked for (missing ones loaded in parallel); evicts least recently used."""
        missing = [index for index in indices if index not in self._held]
        for index, image in zip(missing, pool.map(self._load, missing), strict=True):
            self._held[index] = image
            self._bytes += image.nbytes
            self.loads += 1
        found = {}
        for index in indices:
            self._held.move_to_end(index)
            found[index] = self._held[index]
        while self._bytes > self._capacity and len(self._held) > 1:
            _, dropped = self._held.popitem(last=False)
            self._bytes -= dropped.nbytes
        return found


def _shift_subpixel(image: RgbImage, fx: float, fy: float) -> RgbImage:
    """``out(u) = image(u - f)`` for 0 <= f < 1: puts the tile on the integer output grid."""
    if fx < 1e-3 and fy < 1e-3:
        return image
    matrix = np.array([[1.0, 0.0, fx], [0.0, 1.0, fy]])
    size = (image.shape[1], image.shape[0])
    shifted = cv2.warpAffine(image, matrix, size, flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
    return np.asarray(shifted, dtype=np.uint8)


def _ramp(length: int) -> npt.NDArray[np.float32]:
    """Feathering profile: distance to the nearer edge, so overlaps cross-fade linearly."""
    u = np.arange(length, dtype=np.float32)
    return np.asarray(np.minimum(u + 1.0, length - u), dtype=np.float32)


def compose_base_level(
    positions: npt.NDArray[np.float64],
    read: Callable[[int], RgbImage],
    tile_width: int,
    tile_height: int,
    path: Path,
    *,
    tile_size: int,
    pixel_spacing_um: float,
    cache_bytes: int,
    workers: int = 2,
) -> tuple[DiskLevel, int]:
    """Blend the camera tiles at ``positions`` (top-left, pixels) into ``path``.

    Returns the level and how many camera-tile reads it took (more than the tile count only
    when the cache is too small for a strip).
    """
    origin = np.floor(positions.min(axis=0)) if len(positions) else np.zeros(2)
    placed = positions - origin
    whole = np.floor(placed).astype(np.int64)
    fraction = placed - whole
    width = int(whole[:, 0].max()) + tile_width
    height = int(whole[:, 1].max()) + tile_height
    level = DiskLevel(path, width, height, tile_size, pixel_spacing_um)
    covering: dict[tuple[int, int], list[int]] = {}
    for index, (x, y) in enumerate(whole):
        for row in range(int(y) // tile_size, (int(y) + tile_height - 1) // tile_size + 1):
            for col in range(int(x) // tile_size, (int(x) + tile_width - 1) // tile_size + 1):
                covering.setdefault((col, row), []).append(index)

    def load(index: int) -> RgbImage:
        return _shift_subpixel(read(index), float(fraction[index, 0]), float(fraction[index, 1]))

    cache = TileCache(load, cache_bytes)
    ramp_x, ramp_y = _ramp(tile_width), _ramp(tile_height)
    camera_tile_bytes = tile_width * tile_height * 3
    held_tiles = max(1, cache_bytes // camera_tile_bytes)
    strip = max(1, (held_tiles // 2 - 2) * tile_width // tile_size)
    with path.open("wb") as stream, ThreadPoolExecutor(workers, "wsi-compose") as pool:
        stream.truncate(level.columns * level.rows * level.tile_bytes)
        fd = stream.fileno()
        for first_col in range(0, level.columns, strip):
            cols = range(first_col, min(first_col + strip, level.columns))
            for row in range(level.rows):
                needed = sorted({i for col in cols for i in covering.get((col, row), [])})
                images = cache.get_many(needed, pool)

                def blend(col: int, row: int = row, images: dict[int, RgbImage] = images
                          ) -> RgbImage:
                    sources = {i: images[i] for i in covering.get((col, row), [])}
                    return _blend(col, row, tile_size, sources, whole, ramp_x, ramp_y)

                for col, out in zip(cols, pool.map(blend, cols), strict=True):
                    os.pwrite(fd, out.tobytes(), (row * level.columns + col) * level.tile_bytes)
    return level, cache.loads


def _blend(
    col: int, row: int, tile_size: int, sources: dict[int, RgbImage],
    whole: npt.NDArray[np.int64], ramp_x: npt.NDArray[np.float32],
    ramp_y: npt.NDArray[np.float32],
) -> RgbImage:
    """One output tile: feather-weighted mean of the covering camera tiles, white elsewhere."""
    x0, y0 = col * tile_size, row * tile_size
    out = np.full((tile_size, tile_size, 3), WHITE, dtype=np.uint8)
    parts = []
    for index, image in sources.items():
        tx, ty = int(whole[index, 0]), int(whole[index, 1])
        h, w = image.shape[:2]
        ox0, oy0 = max(x0, tx), max(y0, ty)
        ox1, oy1 = min(x0 + tile_size, tx + w), min(y0 + tile_size, ty + h)
        if ox1 > ox0 and oy1 > oy0:
            parts.append((image, tx, ty, ox0, oy0, ox1, oy1))
    if len(parts) == 1:  # one camera tile: weights cancel, copy the pixels
        image, tx, ty, ox0, oy0, ox1, oy1 = parts[0]
        out[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] = image[oy0 - ty : oy1 - ty,
                                                              ox0 - tx : ox1 - tx]
        return out
    total = np.zeros((tile_size, tile_size, 3), dtype=np.float32)
    weights = np.zeros((tile_size, tile_size, 1), dtype=np.float32)
    for image, tx, ty, ox0, oy0, ox1, oy1 in parts:
        weight = np.outer(ramp_y[oy0 - ty : oy1 - ty], ramp_x[ox0 - tx : ox1 - tx])[..., None]
        patch = image[oy0 - ty : oy1 - ty, ox0 - tx : ox1 - tx]
        total[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] += patch * weight
        weights[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] += weight
    covered = np.broadcast_to(weights > 0, total.shape)
    np.divide(total, weights, out=total, where=covered)
    total += 0.5
    np.copyto(out, total.astype(np.uint8), where=covered)
    return out


def downsample_level(upper: DiskLevel, path: Path) -> DiskLevel:
    """Half resolution: each tile is the area average of 2 x 2 tiles of ``upper``."""
    size = upper.tile_size
    level = DiskLevel(path, math.ceil(upper.width / 2), math.ceil(upper.height / 2), size,
                      upper.pixel_spacing_um * 2)
    block = np.empty((2 * size, 2 * size, 3), dtype=np.uint8)
    with path.open("wb") as stream:
        for row in range(level.rows):
            for col in range(level.columns):
                for dy in (0, 1):
                    for dx in (0, 1):
                        block[dy * size : (dy + 1) * size, dx * size : (dx + 1) * size] = (
                            upper.tile(2 * col + dx, 2 * row + dy)
                        )
                small = cv2.resize(block, (size, size), interpolation=cv2.INTER_AREA)
                stream.write(np.ascontiguousarray(small, dtype=np.uint8).tobytes())
    return level


def build_levels(base: DiskLevel, work_dir: Path) -> list[DiskLevel]:
    """Base plus halvings until the whole slide fits one tile; writes the manifest."""
    levels = [base]
    while max(levels[-1].width, levels[-1].height) > base.tile_size:
        levels.append(downsample_level(levels[-1], work_dir / f"level_{len(levels)}.raw"))
    manifest = [dict(asdict(level), path=level.path.name) for level in levels]
    (work_dir / MANIFEST).write_text(json.dumps({"levels": manifest}, indent=1) + "\n")
    return levels


def open_pyramid(work_dir: Path) -> list[DiskLevel]:
    """The levels of a pyramid built earlier into ``work_dir``."""
    document = json.loads((work_dir / MANIFEST).read_text())
    return [
        DiskLevel(work_dir / entry["path"], int(entry["width"]), int(entry["height"]),
                  int(entry["tile_size"]), float(entry["pixel_spacing_um"]))
        for entry in document["levels"]
    ]
