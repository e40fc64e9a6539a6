"""Pairwise registration of neighbouring tiles, seeded and bounded by the stage positions.

For each pair whose stage positions overlap along an edge, only the predicted overlap strips are
cut out and phase-correlated; the correlation peak is searched within ``max_shift_px`` of the
stage prediction, the best few peaks are judged by normalized cross-correlation (as MIST does),
and the winner is refined to sub-pixel precision. The cross-power spectrum is Gaussian-weighted,
so the peak is a Gaussian and a three-point log-parabola fit locates it without bias.

Whether a pair is trusted is decided afterwards against an NCC threshold learned from the data
(ASHLAR's permutation test): the same registration is run on non-adjacent tile pairs, whose
NCC can only be chance, and the 99th percentile of those becomes the threshold.
Tiles are streamed: only the overlap strips of tiles still waiting for a neighbour are kept,
plus a small reservoir of random tiles for the permutation test.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
import numpy.typing as npt

from daemons.microscope.wsi.model import RgbImage

Gray = npt.NDArray[np.float32]
Box = tuple[int, int, int, int]
"""x0, y0, x1, y1 within a tile."""


@dataclass(frozen=True)
class RegistrationSettings:
    max_shift_px: float | None = None
    """How far the true offset may be from the stage prediction; None: 10 % of the tile size."""
    peaks: int = 3
    """Correlation peaks judged by NCC per pair."""
    permutation_samples: int = 200
    """At most; a scan with fewer pairs (but at least 50) draws as many samples as pairs."""
    permutation_percentile: float = 99.0
    min_ncc: float = 0.1
    """Floor under the learned threshold, for scans too uniform to learn from."""
    reservoir_tiles: int = 16
    peak_sigma_px: float = 1.0
    high_pass_sigma_px: float = 10.0
    """Scale of the illumination removed before correlating (openflexure-stitching's default)."""
    workers: int = 2
    seed: int = 0


@dataclass(frozen=True)
class PairGeometry:
    """Two tiles that overlap according to the stage, and where to look."""

    a: int
    b: int
    stage_offset: tuple[float, float]
    """Stage position of b minus that of a, pixels."""
    box_a: Box
    box_b: Box
    axis: int
    """0: side by side (x), 1: one above the other (y)."""


@dataclass(frozen=True)
class PairResult:
    geometry: PairGeometry
    offset: tuple[float, float]
    """Measured position of b minus that of a, pixels."""
    ncc: float


def find_pairs(
    positions: list[tuple[float, float]], width: int, height: int, min_overlap_px: int = 8
) -> list[PairGeometry]:
    """Edge neighbours from stage positions (corner-only contacts are not pairs)."""
    buckets: dict[tuple[int, int], list[int]] = {}
    for index, (x, y) in enumerate(positions):
        buckets.setdefault((math.floor(x / width), math.floor(y / height)), []).append(index)
    pairs: list[PairGeometry] = []
    for a, (xa, ya) in enumerate(positions):
        bx, by = math.floor(xa / width), math.floor(ya / height)
        for dx_bucket in (-1, 0, 1):
            for dy_bucket in (-1, 0, 1):
                for b in buckets.get((bx + dx_bucket, by + dy_bucket), ()):
                    if b <= a:
                        continue
                    pair = _pair_geometry(a, b, positions, width, height, min_overlap_px)
                    if pair is not None:
                        pairs.append(pair)
    return pairs


def _pair_geometry(
    a: int,
    b: int,
    positions: list[tuple[float, float]],
    width: int,
    height: int,
    min_overlap_px: int,
) -> PairGeometry | None:
    dx = positions[b][0] - positions[a][0]
    dy = positions[b][1] - positions[a][1]
    ix, iy = round(dx), round(dy)
    x0, x1 = max(0, ix), min(width, width + ix)
    y0, y1 = max(0, iy), min(height, height + iy)
    overlap_w, overlap_h = x1 - x0, y1 - y0
    if overlap_w < min_overlap_px or overlap_h < min_overlap_px:
        return None
    side_by_side = overlap_h >= height / 2 and overlap_w < width / 2
    stacked = overlap_w >= width / 2 and overlap_h < height / 2
    if not (side_by_side or stacked):
        return None
    return PairGeometry(
        a,
        b,
        (dx, dy),
        (x0, y0, x1, y1),
        (x0 - ix, y0 - iy, x1 - ix, y1 - iy),
        0 if side_by_side else 1,
    )


def to_gray(image: RgbImage) -> Gray:
    return np.asarray(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), dtype=np.float32)


def crop(gray: Gray, box: Box, sigma: float) -> Gray:
    """The strip, high-passed: vignetting and uneven illumination would otherwise make any two
    blank strips correlate (their brightness profiles match), and win over real texture."""
    x0, y0, x1, y1 = box
    strip = np.ascontiguousarray(gray[y0:y1, x0:x1])
    return np.asarray(strip - cv2.GaussianBlur(strip, (0, 0), sigma), dtype=np.float32)


@cache
def _spectral_tools(shape: tuple[int, int], sigma: float) -> tuple[Gray, Gray]:
    """Hann window and the Gaussian spectral weight turning the peak into a Gaussian."""
    h, w = shape
    window = np.asarray(cv2.createHanningWindow((w, h), cv2.CV_32F), dtype=np.float32)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    weight = np.exp(-2 * math.pi**2 * sigma**2 * (fx**2 + fy**2)).astype(np.float32)
    return window, np.repeat(weight[..., None], 2, axis=2)


def _dft_friendly(n: int) -> int:
    """Largest length <= n that cv2.dft handles quickly (trimming beats padding here)."""
    while n > 1 and cv2.getOptimalDFTSize(n) != n:
        n -= 1
    return n


def ncc_at(a: Gray, b: Gray, sx: int, sy: int) -> float:
    """NCC of the overlap when ``b(u) = a(u + s)``; 0 when the overlap is degenerate."""
    h, w = a.shape
    ax0, ay0 = max(0, sx), max(0, sy)
    bx0, by0 = max(0, -sx), max(0, -sy)
    ow, oh = w - abs(sx), h - abs(sy)
    if ow < 4 or oh < 4:
        return 0.0
    pa = a[ay0 : ay0 + oh, ax0 : ax0 + ow]
    pb = b[by0 : by0 + oh, bx0 : bx0 + ow]
    da = pa - pa.mean()
    db = pb - pb.mean()
    denominator = math.sqrt(float(np.vdot(da, da)) * float(np.vdot(db, db)))
    return float(np.vdot(da, db)) / denominator if denominator > 0 else 0.0


def register_strips(
    a: Gray, b: Gray, max_shift: float, peaks: int, sigma: float
) -> tuple[float, float, float]:
    """Shift s with ``b(u) = a(u + s)`` (sub-pixel) and its NCC, |s| <= max_shift per axis."""
    h, w = _dft_friendly(a.shape[0]), _dft_friendly(a.shape[1])
    a, b = a[:h, :w], b[:h, :w]
    window, weight = _spectral_tools((h, w), sigma)
    fa = cv2.dft((a - a.mean()) * window, flags=cv2.DFT_COMPLEX_OUTPUT)
    fb = cv2.dft((b - b.mean()) * window, flags=cv2.DFT_COMPLEX_OUTPUT)
    cross = cv2.mulSpectrums(fa, fb, 0, conjB=True)
    magnitude = np.sqrt(cross[..., 0] ** 2 + cross[..., 1] ** 2) + 1e-12
    cross = cross / magnitude[..., None] * weight
    surface = np.fft.fftshift(cv2.idft(cross, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE))
    cy, cx = h // 2, w // 2
    ry = max(0, min(int(max_shift), cy - 2))
    rx = max(0, min(int(max_shift), cx - 2))
    search = surface[cy - ry : cy + ry + 1, cx - rx : cx + rx + 1].copy()
    best = (0.0, 0.0, -2.0)
    for _ in range(max(1, peaks)):
        py, px = np.unravel_index(int(np.argmax(search)), search.shape)
        if not np.isfinite(search[py, px]) or search[py, px] == -np.inf:
            break
        sy, sx = int(py) - ry, int(px) - rx
        score = ncc_at(a, b, sx, sy)
        if score > best[2]:
            fy = _subpixel(surface, cy + int(py) - ry, cx + int(px) - rx, axis=0)
            fx = _subpixel(surface, cy + int(py) - ry, cx + int(px) - rx, axis=1)
            best = (sx + fx, sy + fy, score)
        search[max(0, py - 2) : py + 3, max(0, px - 2) : px + 3] = -np.inf
    return best


def _subpixel(surface: Gray, y: int, x: int, axis: int) -> float:
    """Offset of the peak from (y, x) along one axis, by a log-parabola (exact for Gaussians)."""
    size = surface.shape[axis]
    at = (y, x)[axis]
    if at <= 0 or at >= size - 1:
        return 0.0
    step = (1, 0) if axis == 0 else (0, 1)
    left = float(surface[y - step[0], x - step[1]])
    centre = float(surface[y, x])
    right = float(surface[y + step[0], x + step[1]])
    if min(left, centre, right) > 0:
        left, centre, right = math.log(left), math.log(centre), math.log(right)
    curvature = left - 2 * centre + right
    if curvature >= 0:
        return 0.0
    return max(-0.5, min(0.5, 0.5 * (left - right) / curvature))


@dataclass(frozen=True)
class RegistrationOutcome:
    pairs: list[PairResult]
    threshold: float
    null_ncc: list[float]


def register_tiles(
    positions: list[tuple[float, float]],
    width: int,
    height: int,
    read_gray: Callable[[int], npt.NDArray[np.uint8]],
    settings: RegistrationSettings,
) -> RegistrationOutcome:
    """Register every neighbouring pair, streaming tiles in stage order (top to bottom)."""
    pairs = find_pairs(positions, width, height)
    max_shift = settings.max_shift_px or 0.1 * min(width, height)
    needs: dict[int, list[tuple[int, int]]] = {}
    for number, pair in enumerate(pairs):
        needs.setdefault(pair.a, []).append((number, 0))
        needs.setdefault(pair.b, []).append((number, 1))
    order = sorted(range(len(positions)), key=lambda i: (positions[i][1], positions[i][0]))
    rng = random.Random(settings.seed)
    reservoir: dict[int, npt.NDArray[np.uint8]] = {}
    strips: dict[int, list[Gray | None]] = {}
    results: list[Future[tuple[float, float, float]]] = []
    result_pairs: list[PairGeometry] = []

    def load(index: int) -> Gray:
        return read_gray(index).astype(np.float32)

    with ThreadPoolExecutor(max(1, settings.workers), thread_name_prefix="wsi-register") as pool:
        for seen, (index, gray) in enumerate(_prefetched(pool, load, order, settings.workers * 2)):
            if len(reservoir) < settings.reservoir_tiles:
                reservoir[index] = gray.astype(np.uint8)
            elif (slot := rng.randrange(seen + 1)) < settings.reservoir_tiles:
                del reservoir[sorted(reservoir)[slot]]
                reservoir[index] = gray.astype(np.uint8)
            for number, role in needs.get(index, ()):
                pair = pairs[number]
                held = strips.setdefault(number, [None, None])
                held[role] = crop(
                    gray, pair.box_a if role == 0 else pair.box_b, settings.high_pass_sigma_px
                )
                if held[0] is not None and held[1] is not None:
                    results.append(
                        pool.submit(
                            register_strips,
                            held[0],
                            held[1],
                            max_shift,
                            settings.peaks,
                            settings.peak_sigma_px,
                        )
                    )
                    result_pairs.append(pair)
                    del strips[number]
        measured = [future.result() for future in results]
        null = _permutation_ncc(pairs, reservoir, max_shift, settings, rng, pool)
    # The strips were cut at the rounded stage offset, so the measured shift adds to that.
    outcome_pairs = [
        PairResult(pair, (round(pair.stage_offset[0]) + sx, round(pair.stage_offset[1]) + sy), ncc)
        for pair, (sx, sy, ncc) in zip(result_pairs, measured, strict=True)
    ]
    threshold = settings.min_ncc
    if null:
        threshold = max(threshold, float(np.percentile(null, settings.permutation_percentile)))
    return RegistrationOutcome(outcome_pairs, threshold, null)


def _prefetched(
    pool: ThreadPoolExecutor, load: Callable[[int], Gray], order: list[int], depth: int
) -> Iterator[tuple[int, Gray]]:
    """Load tiles ahead in the pool, at most ``depth`` in flight, yielding them in order."""
    pending: list[tuple[int, Future[Gray]]] = []
    for index in order:
        pending.append((index, pool.submit(load, index)))
        if len(pending) > depth:
            first, future = pending.pop(0)
            yield first, future.result()
    for index, future in pending:
        yield index, future.result()


def _permutation_ncc(
    pairs: list[PairGeometry],
    reservoir: dict[int, npt.NDArray[np.uint8]],
    max_shift: float,
    settings: RegistrationSettings,
    rng: random.Random,
    pool: ThreadPoolExecutor,
) -> list[float]:
    """NCC of registrations between tiles that do not touch: what chance alone achieves."""
    if not pairs or not reservoir:
        return []
    touching = {(p.a, p.b) for p in pairs} | {(p.b, p.a) for p in pairs}
    members = sorted(reservoir)
    strangers = [(c, d) for c in members for d in members if c != d and (c, d) not in touching]
    jobs: list[Future[tuple[float, float, float]]] = []
    # No more chance samples than real pairs: small scans would otherwise spend most of their
    # time on the null distribution.
    for _ in range(min(settings.permutation_samples, max(50, len(pairs)))):
        pair = rng.choice(pairs)
        if strangers:
            c, d = rng.choice(strangers)
            strip_b = crop(reservoir[d].astype(np.float32), pair.box_b, settings.high_pass_sigma_px)
        else:
            # Too few tiles for non-adjacent pairs: mirror the partner strip along the shared
            # edge, which keeps its illumination profile but destroys the content match.
            c = rng.choice(members)
            strip_b = crop(reservoir[c].astype(np.float32), pair.box_b, settings.high_pass_sigma_px)
            strip_b = np.ascontiguousarray(strip_b[::-1] if pair.axis == 0 else strip_b[:, ::-1])
        strip_a = crop(reservoir[c].astype(np.float32), pair.box_a, settings.high_pass_sigma_px)
        jobs.append(
            pool.submit(
                register_strips, strip_a, strip_b, max_shift, settings.peaks, settings.peak_sigma_px
            )
        )
    return [job.result()[2] for job in jobs]
