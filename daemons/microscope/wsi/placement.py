"""Global placement: weighted least squares over the pair offsets with the stage as a prior.

Three kinds of equations, one unknown 2-D position per tile:

* accepted pairs: ``p_b - p_a = measured offset`` (weight 1);
* rejected pairs fall back to the *stage model*: ``p_b - p_a = stage offset + bias`` where the
  bias is the median error of the accepted pairs of the same kind (axis and row parity, which
  captures serpentine backlash), weight ``MODEL_WEIGHT``;
* every tile: ``p = stage position`` (weight ``PRIOR_WEIGHT``), which anchors each connected
  piece, so no tile is ever dropped: a tile without an accepted pair keeps its stage-model
  position and is flagged.

The normal equations are a weighted graph Laplacian plus a diagonal, solved by Jacobi-
preconditioned conjugate gradients in O(pairs) memory. Accepted pairs that disagree with the
solution by more than ``outlier_px`` are demoted one at a time (worst first) and the system
re-solved, so a wrong but well-correlated match cannot bend its neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from daemons.microscope.wsi.registration import PairResult

Floats = npt.NDArray[np.float64]

MODEL_WEIGHT = 0.01
"""Accepted pairs are good to ~0.1 px, the stage model to ~1 px: (0.1 / 1) ** 2."""
PRIOR_WEIGHT = 1e-4
"""Absolute stage positions are good to ~10 px: (0.1 / 10) ** 2."""


@dataclass(frozen=True)
class PlacementResult:
    positions: Floats
    """N x 2, slide pixels (same frame as the stage positions)."""
    accepted: list[bool]
    """Per pair: used as measured (True) or replaced by the stage model (False)."""
    outliers: list[int]
    """Pairs that passed the NCC test but were demoted by the residual check."""
    residuals: Floats
    """Per accepted pair, |solved offset - measured offset|, pixels."""
    flagged: list[int]
    """Tiles with no accepted pair: placed by the stage model only."""


def place(
    stage: Floats,
    rows: npt.NDArray[np.int64],
    pairs: list[PairResult],
    threshold: float,
    outlier_px: float = 3.0,
) -> PlacementResult:
    """Positions for all tiles; see the module docstring."""
    accepted = [pair.ncc >= threshold for pair in pairs]
    outliers: list[int] = []
    while True:
        positions = _solve(stage, rows, pairs, accepted)
        residuals = _residuals(positions, pairs, accepted)
        worst = int(np.argmax(residuals)) if residuals.size else -1
        if worst < 0 or residuals[worst] <= outlier_px:
            break
        accepted[worst] = False
        outliers.append(worst)
    touched = {p.geometry.a for p, ok in zip(pairs, accepted, strict=True) if ok}
    touched |= {p.geometry.b for p, ok in zip(pairs, accepted, strict=True) if ok}
    flagged = [i for i in range(len(stage)) if i not in touched]
    kept = np.array([r for r, ok in zip(residuals, accepted, strict=True) if ok])
    return PlacementResult(positions, accepted, outliers, kept, flagged)


def _residuals(positions: Floats, pairs: list[PairResult], accepted: list[bool]) -> Floats:
    """|solved - measured| for accepted pairs, 0 for the others."""
    out = np.zeros(len(pairs))
    for number, (pair, ok) in enumerate(zip(pairs, accepted, strict=True)):
        if ok:
            solved = positions[pair.geometry.b] - positions[pair.geometry.a]
            out[number] = math.hypot(*(solved - np.asarray(pair.offset)))
    return out


def _stage_model_bias(
    pairs: list[PairResult], accepted: list[bool], rows: npt.NDArray[np.int64]
) -> dict[tuple[int, int], Floats]:
    """Median (measured - stage) offset per pair kind: the systematic part of stage error."""
    errors: dict[tuple[int, int], list[Floats]] = {}
    for pair, ok in zip(pairs, accepted, strict=True):
        if ok:
            errors.setdefault(_kind(pair, rows), []).append(
                np.asarray(pair.offset) - np.asarray(pair.geometry.stage_offset)
            )
    return {kind: np.median(np.array(values), axis=0) for kind, values in errors.items()}


def _kind(pair: PairResult, rows: npt.NDArray[np.int64]) -> tuple[int, int]:
    """Axis and scan-row parity: serpentine backlash flips with the row."""
    return pair.geometry.axis, int(rows[pair.geometry.a]) % 2


def _solve(
    stage: Floats, rows: npt.NDArray[np.int64], pairs: list[PairResult], accepted: list[bool]
) -> Floats:
    n = len(stage)
    if not pairs:
        return stage.copy()
    bias = _stage_model_bias(pairs, accepted, rows)
    a = np.array([p.geometry.a for p in pairs], dtype=np.intp)
    b = np.array([p.geometry.b for p in pairs], dtype=np.intp)
    weight = np.array([1.0 if ok else MODEL_WEIGHT for ok in accepted])
    target = np.array([
        p.offset if ok else np.asarray(p.geometry.stage_offset)
        + bias.get(_kind(p, rows), np.zeros(2))
        for p, ok in zip(pairs, accepted, strict=True)
    ], dtype=np.float64)
    diagonal = np.asarray(
        PRIOR_WEIGHT + np.bincount(a, weight, n) + np.bincount(b, weight, n), dtype=np.float64
    )

    def apply(x: Floats) -> Floats:
        flow = weight * (x[b] - x[a])
        return PRIOR_WEIGHT * x + np.bincount(b, flow, n) - np.bincount(a, flow, n)

    solution = np.empty_like(stage)
    for axis in (0, 1):
        flow = weight * target[:, axis]
        rhs = PRIOR_WEIGHT * stage[:, axis] + np.bincount(b, flow, n) - np.bincount(a, flow, n)
        solution[:, axis] = _conjugate_gradient(apply, rhs, diagonal, stage[:, axis])
    return solution


def _conjugate_gradient(
    apply: Callable[[Floats], Floats],
    rhs: Floats,
    diagonal: Floats,
    start: Floats,
    tolerance: float = 1e-9,
) -> Floats:
    """Jacobi-preconditioned CG for the symmetric positive definite placement system."""
    x = start.copy()
    residual = rhs - apply(x)
    z = residual / diagonal
    direction = z.copy()
    rz = float(residual @ z)
    limit = tolerance * max(1.0, float(np.linalg.norm(rhs)))
    for _ in range(10 * len(rhs) + 100):
        if float(np.linalg.norm(residual)) <= limit:
            break
        product = apply(direction)
        step = rz / float(direction @ product)
        x += step * direction
        residual -= step * product
        z = residual / diagonal
        rz_next = float(residual @ z)
        direction = z + (rz_next / rz) * direction
        rz = rz_next
    return x
