"""A virtual fixed RGB-D camera beside the probe manipulator.

It renders, from known intrinsics and a known mounting pose, what a real depth camera would
see: the ChArUco board screwed to the probe holder (colour image, moved by the simulated servo
angles) and the patient's body surface and the table (depth image, the same sphere cap the
force simulator presses against). Written independently of ``daemons/`` — its own holder
rotation and its own camera geometry — so the registration is checked against ground truth,
not against itself.

The board is drawn with an exact homography of OpenCV's own board image (supersampled 2x, then
area-averaged), so corner positions are exact to the rendering's anti-aliasing. Fault knobs:
``shake_m`` / ``shake_deg`` move the camera randomly for every frame (a loose mount: views that
disagree), ``pixel_noise`` adds sensor noise.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from firmware_sim.probe_world import PatientSurface, ProbeWorld

Array = npt.NDArray[np.float64]

SUPERSAMPLE = 2
BACKGROUND = 150
TABLE_Z_M = -0.35
TABLE_HALF_WIDTH_M = 0.4


@dataclass(frozen=True)
class BoardSpec:
    squares: tuple[int, int] = (8, 6)
    square_m: float = 0.015
    marker_m: float = 0.011
    dictionary: int = cv2.aruco.DICT_5X5_100
    px_per_square: int = 100
    centre_in_holder: tuple[float, float, float] = (0.0, 0.05, 0.12)
    """Board centre in the probe frame (origin at the tip, axes of Rx(a)·Ry(b))."""


@dataclass(frozen=True)
class CameraSpec:
    width: int = 1280
    height: int = 960
    focal_px: float = 1100.0
    eye: tuple[float, float, float] = (0.0, 0.40, 0.02)
    """Camera centre in the robot base frame (m)."""
    look_at: tuple[float, float, float] = (0.0, 0.0, -0.12)

    @property
    def intrinsics(self) -> tuple[float, float, float, float]:
        return self.focal_px, self.focal_px, (self.width - 1) / 2, (self.height - 1) / 2


def _rot_x(angle: float) -> Array:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(angle: float) -> Array:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def look_at_rotation(eye: Sequence[float], target: Sequence[float]) -> Array:
    """Camera axes (x right, y down, z forward) as columns, in the base frame (z up)."""
    forward = np.subtract(target, eye).astype(float)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, (0.0, 0.0, 1.0))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.column_stack([right, down, forward])


class VirtualRgbdCamera:
    """``capture()`` → (RGB uint8 HxWx3, depth float32 HxW in m, 0 = no return)."""

    def __init__(
        self,
        servo_angles: Callable[[], Sequence[float]],
        camera: CameraSpec | None = None,
        board: BoardSpec | None = None,
        surface: PatientSurface | None = None,
        *,
        shake_m: float = 0.0,
        shake_deg: float = 0.0,
        pixel_noise: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.world = ProbeWorld(servo_angles)
        self.servo_angles = servo_angles
        self.camera = camera or CameraSpec()
        self.board = board or BoardSpec()
        self.surface = surface or PatientSurface()
        self.shake_m = shake_m
        self.shake_deg = shake_deg
        self.pixel_noise = pixel_noise
        self.frames = 0
        self._rng = random.Random(seed)
        self.intrinsics = self.camera.intrinsics
        spec = self.board
        dictionary = cv2.aruco.getPredefinedDictionary(spec.dictionary)
        board_object = cv2.aruco.CharucoBoard(spec.squares, spec.square_m, spec.marker_m,
                                              dictionary)
        cols, rows = spec.squares
        self._texture = board_object.generateImage(
            (cols * spec.px_per_square, rows * spec.px_per_square), marginSize=0)
        # board axes in the probe frame: x along -X, y along -Z (down), normal -Y (away from a
        # camera on the +Y side); the board origin is its top-left corner
        self._board_rotation = np.column_stack([(-1.0, 0, 0), (0, 0, -1.0), (0, -1.0, 0)])
        half = np.array([cols * spec.square_m / 2, rows * spec.square_m / 2, 0.0])
        self._board_origin = np.array(spec.centre_in_holder) - self._board_rotation @ half
        self.cam_rotation = look_at_rotation(self.camera.eye, self.camera.look_at)
        """Camera axes in the base frame: the ground truth the registration must find."""
        self.cam_position = np.array(self.camera.eye, dtype=float)

    # --- ground truth ---------------------------------------------------------------------

    def board_pose_in_base(self) -> tuple[Array, Array]:
        angles = self.servo_angles()
        tip, _ = self.world.tip_and_axis()
        holder = _rot_x(angles[3]) @ _rot_y(angles[4])
        return holder @ self._board_rotation, holder @ self._board_origin + np.array(tip)

    def _camera_pose(self) -> tuple[Array, Array]:
        rotation, position = self.cam_rotation, self.cam_position
        if self.shake_m or self.shake_deg:
            axis = np.array([self._rng.gauss(0, 1) for _ in range(3)])
            angle = math.radians(self._rng.gauss(0, self.shake_deg))
            rodrigues = axis / np.linalg.norm(axis) * angle
            rotation = cv2.Rodrigues(rodrigues)[0] @ rotation
            position = position + np.array([self._rng.gauss(0, self.shake_m) for _ in range(3)])
        return rotation, position

    # --- rendering ------------------------------------------------------------------------

    def capture(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
        self.frames += 1
        cam_rotation, cam_position = self._camera_pose()
        rgb = self._render_board(cam_rotation, cam_position)
        depth = self._render_depth(cam_rotation, cam_position)
        return rgb, depth

    def _render_board(self, cam_rotation: Array, cam_position: Array) -> npt.NDArray[np.uint8]:
        spec, cam = self.board, self.camera
        board_rotation, board_origin = self.board_pose_in_base()
        rotation = cam_rotation.T @ board_rotation  # board → camera
        translation = cam_rotation.T @ (board_origin - cam_position)
        fx, fy, cx, cy = cam.intrinsics
        k = SUPERSAMPLE
        matrix = np.array([[fx * k, 0, cx * k + (k - 1) / 2], [0, fy * k, cy * k + (k - 1) / 2],
                           [0, 0, 1]])
        metres_per_px = spec.square_m / spec.px_per_square
        texture_to_board = np.array([[metres_per_px, 0, metres_per_px / 2],
                                     [0, metres_per_px, metres_per_px / 2], [0, 0, 1]])
        homography = matrix @ np.column_stack([rotation[:, 0], rotation[:, 1], translation])
        size = (cam.width * k, cam.height * k)
        normal_towards_camera = float(rotation[:, 2] @ translation) > 0  # board faces the lens
        image: npt.NDArray[np.uint8]
        if translation[2] <= 0 or not normal_towards_camera:
            image = np.full((size[1], size[0]), BACKGROUND, np.uint8)
        else:
            image = np.asarray(cv2.warpPerspective(
                self._texture, homography @ texture_to_board, size, flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT, borderValue=BACKGROUND), dtype=np.uint8)
        small = np.asarray(cv2.resize(image, (cam.width, cam.height),
                                      interpolation=cv2.INTER_AREA), dtype=np.uint8)
        if self.pixel_noise:
            noise = np.random.default_rng(self._rng.getrandbits(32)).normal(
                0, self.pixel_noise, small.shape)
            small = np.clip(small + noise, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(small[:, :, None], 3, axis=2))

    def _render_depth(self, cam_rotation: Array, cam_position: Array) -> npt.NDArray[np.float32]:
        """Ray-cast the patient (sphere cap) and the table; depth = camera z of the hit.

        Worked in the camera frame over cached per-pixel rays (z = 1, so the ray parameter is
        the depth): a handful of vector operations per frame.
        """
        rays, ray_norm2 = self._rays
        surface = self.surface
        centre = cam_rotation.T @ (np.array([0.0, 0.0, surface.top_z_m - surface.radius_m])
                                   - cam_position)
        along = rays @ centre.astype(np.float32)  # d · c
        disc = along * along - ray_norm2 * (float(centre @ centre) - surface.radius_m ** 2)
        with np.errstate(invalid="ignore"):
            t_sphere = (along - np.sqrt(disc)) / ray_norm2
        up = rays @ cam_rotation[2].astype(np.float32)  # base-frame z component of each ray
        hit_z = cam_position[2] + t_sphere * up
        sphere_ok = (disc >= 0) & (t_sphere > 0) & (hit_z >= TABLE_Z_M)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_table = (TABLE_Z_M - cam_position[2]) / up
        sideways = rays @ cam_rotation[:2].T.astype(np.float32)
        table_xy = cam_position[:2] + t_table[..., None] * sideways
        table_ok = (t_table > 0) & np.all(np.abs(table_xy) <= TABLE_HALF_WIDTH_M, axis=-1)
        depth = np.where(sphere_ok, t_sphere, np.where(table_ok, t_table, 0.0))
        return depth.astype(np.float32)

    @functools.cached_property
    def _rays(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Per-pixel camera-frame ray directions (z = 1) and their squared lengths."""
        cam = self.camera
        fx, fy, cx, cy = cam.intrinsics
        u, v = np.meshgrid(np.arange(cam.width, dtype=np.float32),
                           np.arange(cam.height, dtype=np.float32))
        rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=-1)
        return rays, np.sum(rays * rays, axis=-1)
