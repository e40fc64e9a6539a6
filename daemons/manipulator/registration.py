"""Camera → robot-base registration with a ChArUco board on the probe holder (eye-to-hand).

A fixed RGB-D camera looks at the robot and the patient. The daemon drives the holder through a
set of view poses (under the operator's dead-man), detects the board in each image
(``cv2.aruco.CharucoDetector``), gets the board's pose in the camera with ``cv2.solvePnP``, and
solves the eye-to-hand problem with ``cv2.calibrateHandEye`` fed base→gripper poses (so the
result is camera→base). The residual is how well one camera pose and one board mount explain
every view; a registration worse than ``max_residual_mm`` / ``max_residual_deg`` (2 mm / 0.5°)
is refused and the previous one kept. At every session start (arm) one view at the current pose
re-checks it; drift beyond ``max_drift_mm`` marks it stale.

With a registration the depth image becomes the patient's surface in the robot frame, which the
console asks for with the ``surface`` request.

Image work runs on a worker thread: the control loop shares the event loop and must not wait.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np
import numpy.typing as npt
import structlog

from daemons.manipulator.kinematics import HolderKinematics, ProbePose
from medge.config import bounds

log = structlog.get_logger(__name__)

Matrix = npt.NDArray[np.float64]
Transform = tuple[Matrix, Matrix]
"""(R 3x3, t 3): maps points from the source frame to the destination frame."""

DEFAULT_VIEWS: tuple[tuple[float, float, float, float, float], ...] = (
    (0.0, 0.0, -0.18, 0.0, 0.0),
    (0.03, 0.0, -0.18, 0.25, 0.0),
    (-0.03, 0.0, -0.18, -0.25, 0.0),
    (0.0, 0.02, -0.17, 0.0, 0.3),
    (0.0, -0.02, -0.17, 0.0, -0.3),
    (0.02, 0.02, -0.19, 0.2, 0.25),
    (-0.02, -0.02, -0.19, -0.2, -0.25),
    (0.02, -0.02, -0.16, -0.2, 0.25),
    (-0.02, 0.02, -0.16, 0.2, -0.25),
)
"""Probe poses (tip x, y, z, tilt_a, tilt_b) that show the board from varied angles; rotations
about two non-parallel axes are what make the hand-eye problem solvable."""


class RegistrationError(RuntimeError):
    """Registration could not be done; ``reason`` is the reply's reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class MoveFailed(RegistrationError):
    def __init__(self, message: str) -> None:
        super().__init__("move_failed", message)


class RgbdCamera(Protocol):
    """A fixed RGB-D camera: pinhole intrinsics and frames of (RGB uint8, depth float32 m)."""

    intrinsics: tuple[float, float, float, float]
    """fx, fy, cx, cy in pixels (images are undistorted)."""

    def capture(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
        """Blocking grab; depth 0 where the sensor has no return. Called on a worker thread."""


@dataclass(frozen=True)
class RegistrationSection:
    camera: Literal["none", "simulated"] = "none"
    """``simulated``: the virtual RGB-D camera of firmware_sim, fed by the measured servo angles
    (for demo runs against the simulators; tests feed it the simulator's true angles)."""
    board_squares: tuple[int, int] = (8, 6)
    square_m: float = field(default=0.015, metadata=bounds(min=0.001, max=0.2))
    marker_m: float = field(default=0.011, metadata=bounds(min=0.001, max=0.2))
    dictionary: str = "DICT_5X5_100"
    views: tuple[tuple[float, float, float, float, float], ...] = DEFAULT_VIEWS
    min_views: int = field(default=5, metadata=bounds(min=3))
    min_corners: int = field(default=12, metadata=bounds(min=6))
    move_timeout_s: float = field(default=20.0, metadata=bounds(min=0.1))
    max_residual_mm: float = field(default=2.0, metadata=bounds(min=0.0))
    max_residual_deg: float = field(default=0.5, metadata=bounds(min=0.0))
    max_drift_mm: float = field(default=5.0, metadata=bounds(min=0.0))
    patient_box: tuple[tuple[float, float, float], tuple[float, float, float]] = (
        (-0.15, -0.15, -0.34), (0.15, 0.15, -0.15))
    """Where surface points are kept, in the robot base frame (drops table and background)."""
    state_file: Path | None = None
    """Where an accepted registration is kept across restarts (re-checked at session start)."""

    def validate(self) -> None:
        if self.marker_m >= self.square_m:
            raise ValueError("marker_m must be smaller than square_m")
        if min(self.board_squares) < 3:
            raise ValueError("board_squares needs at least 3 x 3 squares")
        if not hasattr(cv2.aruco, self.dictionary):
            raise ValueError(f"unknown ArUco dictionary {self.dictionary!r}")
        if len(self.views) < self.min_views:
            raise ValueError(f"{len(self.views)} views configured, min_views is {self.min_views}")
        if any(len(view) != 5 for view in self.views):
            raise ValueError("each view is [tip_x, tip_y, tip_z, tilt_a, tilt_b]")

    def __post_init__(self) -> None:
        self.validate()


@dataclass(frozen=True)
class RegistrationResult:
    accepted: bool
    views: int
    residual_mm: float
    """RMS over views of the board-centre distance between prediction and observation."""
    residual_deg: float
    max_residual_mm: float
    max_residual_deg: float
    cam_to_base: Transform
    gripper_to_board: Transform
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted, "views": self.views,
            "residual_mm": round(self.residual_mm, 3), "residual_deg": round(self.residual_deg, 3),
            "max_residual_mm": round(self.max_residual_mm, 3),
            "max_residual_deg": round(self.max_residual_deg, 3),
            "cam_to_base": {"R": self.cam_to_base[0].round(6).tolist(),
                            "t": self.cam_to_base[1].round(6).tolist()},
            "at": self.at,
        }


def rotation_of(pose: ProbePose) -> Matrix:
    """The probe frame's rotation in the base frame: Rx(tilt_a)·Ry(tilt_b)."""
    ca, sa, cb, sb = (math.cos(pose.tilt_a), math.sin(pose.tilt_a), math.cos(pose.tilt_b),
                      math.sin(pose.tilt_b))
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    return np.asarray(rx @ ry, dtype=float)


def gripper_to_base(pose: ProbePose) -> Transform:
    return rotation_of(pose), np.array(pose.tip, dtype=float)


def compose(a: Transform, b: Transform) -> Transform:
    """a ∘ b: first b, then a."""
    return a[0] @ b[0], a[0] @ b[1] + a[1]


def invert(a: Transform) -> Transform:
    return a[0].T, -a[0].T @ a[1]


def rotation_angle_deg(r: Matrix) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, (float(np.trace(r)) - 1) / 2))))


def mean_rotation(rotations: Sequence[Matrix]) -> Matrix:
    """The rotation closest (Frobenius) to the arithmetic mean: SVD projection."""
    u, _, vt = np.linalg.svd(np.sum(rotations, axis=0))
    d = np.diag([1.0, 1.0, float(np.sign(np.linalg.det(u @ vt)))])
    return np.asarray(u @ d @ vt, dtype=float)


class BoardDetector:
    """ChArUco detection and the board's pose in the camera (solvePnP)."""

    def __init__(self, section: RegistrationSection,
                 intrinsics: tuple[float, float, float, float]) -> None:
        dictionary = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, section.dictionary))
        self.board = cv2.aruco.CharucoBoard(section.board_squares, section.square_m,
                                            section.marker_m, dictionary)
        self.detector = cv2.aruco.CharucoDetector(self.board)
        fx, fy, cx, cy = intrinsics
        self.camera_matrix = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=float)
        self.min_corners = section.min_corners
        cols, rows = section.board_squares
        self.centre = np.array([cols * section.square_m / 2, rows * section.square_m / 2, 0.0])

    def board_in_camera(self, rgb: npt.NDArray[np.uint8]) -> Transform | None:
        """board→camera, or None when too few corners are seen."""
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        corners, ids, _, _ = self.detector.detectBoard(gray)
        if ids is None or len(ids) < self.min_corners:
            return None
        match: Any = self.board.matchImagePoints  # the stubs want a list; an array works
        object_points, image_points = match(corners, ids)
        ok, rvec, tvec = cv2.solvePnP(object_points, image_points, self.camera_matrix, None,
                                      flags=cv2.SOLVEPNP_ITERATIVE)
        if not ok:
            return None
        rotation, _ = cv2.Rodrigues(rvec)
        return np.asarray(rotation, dtype=float), np.asarray(tvec, dtype=float).reshape(3)


Mover = Callable[[ProbePose, float], Awaitable[ProbePose]]
"""Drive to a pose (under the operator's dead-man) and return the measured pose at rest."""


class Registration:
    """Registration state, the solver, re-check and surface export for one camera."""

    def __init__(self, section: RegistrationSection, camera: RgbdCamera,
                 kinematics: HolderKinematics) -> None:
        self.section = section
        self.camera = camera
        self.kinematics = kinematics
        self.detector = BoardDetector(section, camera.intrinsics)
        cv2.setNumThreads(1)  # one core for images; the other stays free for the control loop
        self.state = "none"
        """none | running | ok | stale | refused | failed."""
        self.result: RegistrationResult | None = None
        self.last_attempt: RegistrationResult | None = None
        self.drift_mm: float | None = None
        self.error: str | None = None
        self._busy = asyncio.Lock()
        self._load()

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"state": self.state}
        if self.result is not None:
            summary.update(residual_mm=round(self.result.residual_mm, 3),
                           residual_deg=round(self.result.residual_deg, 3), at=self.result.at)
        if self.drift_mm is not None:
            summary["drift_mm"] = round(self.drift_mm, 3)
        if self.error is not None:
            summary["error"] = self.error
        return summary

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    async def register(self, move_to: Mover) -> RegistrationResult:
        if self._busy.locked():
            raise RegistrationError("busy", "a registration is already running")
        async with self._busy:
            previous = self.state
            self.state, self.error = "running", None
            try:
                result = await self._register(move_to)
            except RegistrationError as exc:
                self.state, self.error = ("ok" if self.result else "failed"), str(exc)
                if previous == "stale":
                    self.state = "stale"
                raise
            self.last_attempt = result
            if result.accepted:
                self.result, self.state, self.drift_mm = result, "ok", None
                self._save(result)
            else:
                self.state = "refused" if self.result is None else previous
                self.error = (f"residual {result.residual_mm:.2f} mm / "
                              f"{result.residual_deg:.2f}° exceeds the limits")
            log.info("registration", accepted=result.accepted, views=result.views,
                     residual_mm=round(result.residual_mm, 3),
                     residual_deg=round(result.residual_deg, 3))
            return result

    async def _register(self, move_to: Mover) -> RegistrationResult:
        section = self.section
        gripper_poses: list[Transform] = []
        board_poses: list[Transform] = []
        for view in section.views:
            measured = await move_to(ProbePose(*view), section.move_timeout_s)
            board = await asyncio.to_thread(self._observe)
            if board is not None:
                gripper_poses.append(gripper_to_base(measured))
                board_poses.append(board)
        if len(board_poses) < section.min_views:
            raise RegistrationError("too_few_views", f"board seen in {len(board_poses)} of "
                                    f"{len(section.views)} views, need {section.min_views}")
        return await asyncio.to_thread(self.solve, gripper_poses, board_poses)

    def _observe(self) -> Transform | None:
        rgb, _ = self.camera.capture()
        return self.detector.board_in_camera(rgb)

    def solve(self, gripper_poses: Sequence[Transform],
              board_poses: Sequence[Transform]) -> RegistrationResult:
        """Eye-to-hand: base→gripper and board→camera per view → camera→base, residuals."""
        base_to_gripper = [invert(g) for g in gripper_poses]
        r_cam, t_cam = cv2.calibrateHandEye(
            [r for r, _ in base_to_gripper], [t for _, t in base_to_gripper],
            [r for r, _ in board_poses], [t for _, t in board_poses],
            method=cv2.CALIB_HAND_EYE_PARK)
        cam_to_base: Transform = (np.asarray(r_cam, float), np.asarray(t_cam, float).reshape(3))
        mounts = [compose(invert(g), compose(cam_to_base, b))
                  for g, b in zip(gripper_poses, board_poses, strict=True)]
        mount: Transform = (mean_rotation([r for r, _ in mounts]),
                            np.mean([t for _, t in mounts], axis=0))
        errors = [self._discrepancy(cam_to_base, g, mount, b)
                  for g, b in zip(gripper_poses, board_poses, strict=True)]
        mm = [e[0] for e in errors]
        deg = [e[1] for e in errors]
        rms_mm = math.sqrt(sum(e * e for e in mm) / len(mm))
        rms_deg = math.sqrt(sum(e * e for e in deg) / len(deg))
        accepted = (rms_mm <= self.section.max_residual_mm
                    and rms_deg <= self.section.max_residual_deg)
        return RegistrationResult(accepted, len(errors), rms_mm, rms_deg, max(mm), max(deg),
                                  cam_to_base, mount, time.time())

    def _discrepancy(self, cam_to_base: Transform, gripper: Transform, mount: Transform,
                     observed: Transform) -> tuple[float, float]:
        """(mm at the board centre, degrees) between predicted and observed board poses."""
        predicted = compose(invert(cam_to_base), compose(gripper, mount))
        centre = self.detector.centre
        distance = np.linalg.norm((predicted[0] @ centre + predicted[1])
                                  - (observed[0] @ centre + observed[1]))
        return float(distance) * 1000, rotation_angle_deg(predicted[0].T @ observed[0])

    async def check(self, current: ProbePose) -> float | None:
        """Re-check at session start: one view at the current pose; returns the drift in mm."""
        result = self.result
        if result is None or self._busy.locked():
            return None
        board = await asyncio.to_thread(self._observe)
        if board is None:
            self.error = "board not visible for the session-start check"
            return None
        drift, _ = self._discrepancy(result.cam_to_base, gripper_to_base(current),
                                     result.gripper_to_board, board)
        self.drift_mm = drift
        if drift > self.section.max_drift_mm:
            self.state, self.error = "stale", f"drift {drift:.1f} mm at session start"
            log.warning("registration stale", drift_mm=round(drift, 2))
        else:
            self.state, self.error = "ok", None
        return drift

    async def surface(self, max_points: int) -> list[list[float]]:
        """The patient's surface in the robot base frame (metres), decimated to ``max_points``."""
        result = self.result
        if result is None or self.state != "ok":
            raise RegistrationError("not_registered", f"registration is {self.state}")
        return await asyncio.to_thread(self._surface, result.cam_to_base, max_points)

    def _surface(self, cam_to_base: Transform, max_points: int) -> list[list[float]]:
        _, depth = self.camera.capture()
        fx, fy, cx, cy = self.camera.intrinsics
        v, u = np.nonzero(depth > 0)
        z = depth[v, u].astype(float)
        camera_points = np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], axis=1)
        base_points = camera_points @ cam_to_base[0].T + cam_to_base[1]
        low, high = (np.array(corner) for corner in self.section.patient_box)
        inside = base_points[np.all((base_points >= low) & (base_points <= high), axis=1)]
        stride = max(1, math.ceil(len(inside) / max_points))
        return inside[::stride][:max_points].round(4).tolist()  # type: ignore[no-any-return]

    def _save(self, result: RegistrationResult) -> None:
        path = self.section.state_file
        if path is None:
            return
        document = result.as_dict() | {"gripper_to_board": {
            "R": result.gripper_to_board[0].tolist(), "t": result.gripper_to_board[1].tolist()}}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document))
        tmp.replace(path)

    def _load(self) -> None:
        """A saved registration counts as stale until the session-start check confirms it."""
        path = self.section.state_file
        if path is None or not path.exists():
            return
        try:
            document = json.loads(path.read_text())
            cam = (np.array(document["cam_to_base"]["R"], float),
                   np.array(document["cam_to_base"]["t"], float))
            mount = (np.array(document["gripper_to_board"]["R"], float),
                     np.array(document["gripper_to_board"]["t"], float))
            if cam[0].shape != (3, 3) or cam[1].shape != (3,) or mount[0].shape != (3, 3):
                raise ValueError("wrong matrix shapes")
            self.result = RegistrationResult(
                True, int(document["views"]), float(document["residual_mm"]),
                float(document["residual_deg"]), float(document["max_residual_mm"]),
                float(document["max_residual_deg"]), cam, mount, float(document["at"]))
            self.state = "stale"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.error = f"saved registration {path} unreadable: {exc}"
            log.error("saved registration unreadable", path=str(path), error=str(exc))


def camera_from_config(
    section: RegistrationSection, servo_angles: Callable[[], Sequence[float]]
) -> RgbdCamera | None:
    """The configured camera (None without one)."""
    if section.camera == "none":
        return None
    from firmware_sim.rgbd_camera import VirtualRgbdCamera  # simulation only

    return VirtualRgbdCamera(servo_angles)
