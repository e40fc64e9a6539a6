"""The work of one scan: tissue detection, tile plan, focus map, pipelined acquisition, mosaic.

Coordinates: slide micrometres from the slide's top-left corner (x along the long side); the
stage position of a tile is its slide position plus the rig's ``slide_origin_um``.

Acquisition is a two-stage pipeline joined by a bounded queue: the stage task moves, waits for
idle and exposes, then hands the frame over and immediately starts the next move; the storage
task encodes, checksums and persists each tile. The stage only waits for the computer when
``buffer_tiles`` frames are already queued, which bounds memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from daemons.microscope.jobs import JobState, TileRecord
from daemons.microscope.wsi.model import RgbImage
from drivers.camera import Camera
from drivers.stage import Stage

Mask = npt.NDArray[np.bool_]
GLASS_OD_THRESHOLD = 0.12
"""Summed RGB optical density above which an overview pixel counts as stained tissue."""
DARKEST_GLASS = 230.0
"""Bare glass under the overview lamp is at least this bright; the reference never drops
below it, so a slide covered edge to edge with tissue still reads as tissue."""


class ScanError(RuntimeError):
    """A scan cannot go on; the message says why and what the technician can do."""


@dataclass(frozen=True)
class Geometry:
    """How tiles map to the slide: field size on the sample and the step between tiles."""

    um_per_px: float
    width_px: int
    height_px: int
    overlap: float

    @property
    def field_um(self) -> tuple[float, float]:
        return self.width_px * self.um_per_px, self.height_px * self.um_per_px

    @property
    def step_um(self) -> tuple[float, float]:
        fw, fh = self.field_um
        return fw * (1 - self.overlap), fh * (1 - self.overlap)


# -- overview and tissue -----------------------------------------------------------------------


def detect_tissue(overview: RgbImage, label_width_px: int = 0) -> Mask:
    """Stained pixels of the overview: optical density against the brightest (glass) level,
    specks removed by an opening; the label area at the left end is never tissue."""
    brightest = np.percentile(overview.reshape(-1, 3), 99, axis=0).astype(np.float32)
    glass = np.maximum(brightest, DARKEST_GLASS) + 1.0
    density = -np.log((overview.astype(np.float32) + 1.0) / glass).sum(axis=2)
    mask = (density > GLASS_OD_THRESHOLD).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    mask[:, :label_width_px] = 0
    return mask.astype(bool)


def plan_tiles(tissue: Mask, overview_um_per_px: float, geometry: Geometry, margin_um: float,
               area_um: tuple[float, float, float, float] | None = None
               ) -> list[tuple[float, float]]:
    """Tile top-left positions (slide µm) in serpentine order: only tiles whose field touches
    tissue grown by ``margin_um``, inside ``area_um`` (default: the tissue's bounding box)."""
    grow = round(margin_um / overview_um_per_px)
    grown = tissue.astype(np.uint8)
    if grow > 0:
        grown = np.asarray(cv2.dilate(grown, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)),
                           np.uint8)
    if area_um is None:
        rows, cols = np.nonzero(tissue)
        if rows.size == 0:
            return []
        area_um = (float(cols.min()) * overview_um_per_px - margin_um,
                   float(rows.min()) * overview_um_per_px - margin_um,
                   float(cols.max() + 1) * overview_um_per_px + margin_um,
                   float(rows.max() + 1) * overview_um_per_px + margin_um)
    x0, y0, x1, y1 = area_um
    field_w, field_h = geometry.field_um
    step_x, step_y = geometry.step_um
    columns = max(1, math.ceil((x1 - x0 - field_w) / step_x) + 1)
    rows_n = max(1, math.ceil((y1 - y0 - field_h) / step_y) + 1)
    plan: list[tuple[float, float]] = []
    for row in range(rows_n):
        order = range(columns) if row % 2 == 0 else range(columns - 1, -1, -1)
        for column in order:
            x, y = x0 + column * step_x, y0 + row * step_y
            if _touches(grown, overview_um_per_px, x, y, field_w, field_h):
                plan.append((x, y))
    return plan


def _touches(mask: npt.NDArray[np.uint8], um_per_px: float, x: float, y: float, w: float,
             h: float) -> bool:
    c0, r0 = max(0, math.floor(x / um_per_px)), max(0, math.floor(y / um_per_px))
    c1, r1 = math.ceil((x + w) / um_per_px), math.ceil((y + h) / um_per_px)
    return bool(mask[r0:r1, c0:c1].any())


# -- focus -------------------------------------------------------------------------------------


def focus_points(plan: Sequence[tuple[float, float]], count: int) -> list[int]:
    """Plan indices spread over the tissue: extremes along both axes and diagonals, then the
    tile nearest the centre; duplicates dropped."""
    if not plan:
        return []
    xs = np.array([p[0] for p in plan])
    ys = np.array([p[1] for p in plan])
    candidates = [int(np.argmin(xs + ys)), int(np.argmax(xs + ys)), int(np.argmin(xs - ys)),
                  int(np.argmax(xs - ys)),
                  int(np.argmin(np.hypot(xs - xs.mean(), ys - ys.mean())))]
    chosen: list[int] = []
    for index in candidates:
        if index not in chosen:
            chosen.append(index)
    return chosen[:max(1, count)]


# -- acquisition -------------------------------------------------------------------------------


@dataclass
class Motion:
    """Where slide coordinates are on the stage."""

    stage: Stage
    camera: Camera
    origin_um: tuple[float, float]

    async def goto(self, x: float, y: float, z: float) -> None:
        await self.stage.move_to(x + self.origin_um[0], y + self.origin_um[1], z)

    async def move_xy(self, x: float, y: float) -> None:
        """Focus-map interface (:class:`~daemons.microscope.focusmap.ScanStage`), slide µm."""
        await self.stage.move_to(x + self.origin_um[0], y + self.origin_um[1])

    async def move_z(self, z: float) -> None:
        await self.stage.move_to(z=z)

    async def capture(self) -> RgbImage:
        return await self.camera.capture()

    async def expose(self) -> asyncio.Future[RgbImage]:
        """Start a frame and return once the sensor has finished integrating, so the stage may
        move while the frame is read out; the future then gives the frame. A camera that does
        not say when its exposure ends (no ``on_exposed`` hook) is waited for in full."""
        loop = asyncio.get_running_loop()
        exposed = asyncio.Event()
        if hasattr(self.camera, "on_exposed"):
            self.camera.on_exposed = lambda: loop.call_soon_threadsafe(exposed.set)
        frame = asyncio.ensure_future(self.camera.capture())
        waiter = asyncio.ensure_future(exposed.wait())
        try:
            await asyncio.wait({frame, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if frame.done() and frame.exception() is not None:
            raise frame.exception()  # type: ignore[misc]
        return frame

    def reported(self) -> tuple[float, float, float]:
        """Where the controller says the stage is, in slide µm (z in machine µm)."""
        position = self.stage.position_um
        return position.x - self.origin_um[0], position.y - self.origin_um[1], position.z


TileSink = Callable[[int, RgbImage, tuple[float, float, float]], Awaitable[None]]


async def acquire(motion: Motion, state: JobState, focus_z: Callable[[float, float], float],
                  buffer_tiles: int, store_tile: TileSink) -> None:
    """Capture every planned tile not yet in ``state.tiles``, in plan order, pipelined; each
    is stored with the position the controller reported once the stage stood still.

    The stage moves on as soon as a frame is exposed; its readout and storage overlap the next
    move. When the stage side fails (alarm, lost camera, cancel) the frames already taken are
    still stored before the error propagates: nothing captured is thrown away.
    """
    Shot = tuple[int, asyncio.Future[RgbImage], tuple[float, float, float]]
    queue: asyncio.Queue[Shot | None] = asyncio.Queue(maxsize=buffer_tiles)

    async def storage_side() -> None:
        while (item := await queue.get()) is not None:
            index, frame, where = item
            await store_tile(index, await frame, where)

    storage = asyncio.create_task(storage_side(), name="scan-storage")

    async def hand_over(item: Shot | None) -> None:
        """Queue ``item``, or surface the storage side's failure instead of waiting forever."""
        put = asyncio.ensure_future(queue.put(item))
        await asyncio.wait({put, storage}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            await storage  # raises the storage failure

    try:
        for index, (x, y) in enumerate(state.plan):
            if index in state.tiles:
                continue
            await motion.goto(x, y, focus_z(x, y))
            frame = await motion.expose()
            await hand_over((index, frame, motion.reported()))
    finally:
        if not storage.done():
            await hand_over(None)
        await storage


def save_tile(path: Path, frame: RgbImage) -> str:
    """Write the tile losslessly; return the SHA-256 of the file (checked on resume)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ScanError(f"{path}: PNG encoding failed")
    data = encoded.tobytes()
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(data)
    temporary.replace(path)
    return hashlib.sha256(data).hexdigest()


def verify_tiles(state: JobState, tiles_dir: Path) -> list[int]:
    """Drop captured tiles whose file is missing or does not match its checksum (a crash
    between write and state save, a damaged disk); return their indices."""
    bad = []
    for index, record in list(state.tiles.items()):
        path = tile_path(tiles_dir, index)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            digest = ""
        if digest != record.sha256:
            bad.append(index)
            del state.tiles[index]
    return bad


def tile_path(tiles_dir: Path, index: int) -> Path:
    return tiles_dir / f"{index:05d}.png"


# -- hand-over to the stitching pipeline ------------------------------------------------------


def write_tiles_folder(tiles_dir: Path, plan: Sequence[tuple[float, float]],
                       records: Sequence[TileRecord], geometry: Geometry) -> None:
    """``positions.csv`` and ``scan.json`` next to the tiles, in the format the stitching
    pipeline reads (daemons/microscope/wsi/scanfolder.py): grid row/column from the plan,
    positions as the controller reported them."""
    step_x, step_y = geometry.step_um
    x0 = min(x for x, _ in plan)
    y0 = min(y for _, y in plan)
    lines = ["name,row,col,x_um,y_um"]
    for record in records:
        x, y = plan[record.index]
        lines.append(f"{tile_path(tiles_dir, record.index).name},{round((y - y0) / step_y)},"
                     f"{round((x - x0) / step_x)},{record.x_um:.3f},{record.y_um:.3f}")
    (tiles_dir / "positions.csv").write_text("\n".join(lines) + "\n")
    (tiles_dir / "scan.json").write_text(json.dumps({"pixel_size_um": geometry.um_per_px}))
