"""A USB (UVC) video frame grabber on the ultrasound machine's video output, through OpenCV.

The grabber digitises the whole screen of the ultrasound machine; only the image area (a
rectangle fixed by the machine's layout) is an ultrasound image. :class:`FrameGrabber` composes
a :class:`~drivers.camera.UvcCamera` (its worker thread, timeouts and ``close()`` join are
reused, not copied), asks the device for the stream's frame rate, and returns the cropped
image area as ``H x W`` ``uint8`` grayscale: B-mode is grayscale, and a third of the bytes
makes recording and DICOM cheaper. The interface (``open``, ``close``, ``capture``,
``frame_rate_hz``) is the frame source the ultrasound service consumes; the simulator in
:mod:`firmware_sim.ultrasound` offers the same one.

A grabber served over the network (``http://``, ``rtsp://``, ...: an MJPEG stream from
ustreamer or mjpg-streamer on a box holding the capture card, a network video encoder, or
``medge sim ultrasound``) is read by the same ``cv2.VideoCapture.read()`` through OpenCV's
FFmpeg backend; its resolution and frame rate are the server's, so they are checked, not set.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from drivers.camera import (
    CameraNotFound,
    CameraSettingError,
    CameraSettings,
    RgbFrame,
    UvcCamera,
)

GrayFrame = npt.NDArray[np.uint8]
MAX_FRAME_RATE_HZ = 240.0
STREAM_SCHEMES = ("http://", "https://", "rtsp://", "tcp://")


@dataclass(frozen=True)
class Crop:
    """The image area inside the grabbed screen, in pixels of the grabbed frame."""

    left: int
    top: int
    width: int
    height: int

    def check_inside(self, resolution: tuple[int, int]) -> None:
        width, height = resolution
        if (self.left < 0 or self.top < 0 or self.width <= 0 or self.height <= 0
                or self.left + self.width > width or self.top + self.height > height):
            raise CameraSettingError(
                f"crop: {self.width}x{self.height}+{self.left}+{self.top} is not inside the "
                f"grabbed {width}x{height} frame")


class _UvcAtFrameRate(UvcCamera):
    """The UVC camera that also asks the device for a stream frame rate."""

    def __init__(self, device: str | int, settings: CameraSettings, frame_rate_hz: float,
                 dev_root: str) -> None:
        super().__init__(device, settings, dev_root)
        self.frame_rate_hz = frame_rate_hz

    def _do_configure(self, settings: CameraSettings) -> None:
        super()._do_configure(settings)
        if not self._capture.set(cv2.CAP_PROP_FPS, self.frame_rate_hz):
            raise CameraSettingError(
                f"frame_rate_hz: {self.device_path} refused {self.frame_rate_hz}")


class _NetworkStream(UvcCamera):
    """A grabber's stream read by URL through OpenCV's FFmpeg backend (open/read timeouts)."""

    def _open_capture(self) -> Any:
        timeout_ms = round(self.settings.frame_timeout_s * 1000)
        return cv2.VideoCapture(self.device_path, cv2.CAP_FFMPEG,
                                [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, max(timeout_ms, 5000),
                                 cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms])

    def _do_open(self) -> None:
        capture = self._open_capture()
        if not capture.isOpened():
            capture.release()
            raise CameraNotFound(f"{self.device_path}: no video stream there (server down, "
                                 "wrong URL, or not a stream OpenCV's FFmpeg backend reads)")
        self._capture = capture

    def _do_configure(self, settings: CameraSettings) -> None:
        size = (int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if size != settings.resolution:
            raise CameraSettingError(
                f"resolution: the stream {self.device_path} is {size[0]}x{size[1]}, configured "
                f"{settings.resolution[0]}x{settings.resolution[1]}")


def lower_thread_priority(increment: int) -> None:
    """Raise the calling thread's nice value (Linux schedules threads, so only this one): the
    grabber's and the encoder's threads then yield the CPU to a control loop in the same
    process. No privilege is needed to lower a priority; where it is refused, nothing changes."""
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid,
                       min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))


class FrameGrabber:
    """``async with FrameGrabber(...)``; ``capture()`` returns the cropped grayscale image."""

    def __init__(self, device: str | int, *, resolution: tuple[int, int] = (1920, 1080),
                 crop: Crop | None = None, frame_rate_hz: float = 30.0,
                 frame_timeout_s: float = 1.0, dev_root: str = "/dev",
                 thread_nice: int = 0) -> None:
        if not 0 < frame_rate_hz <= MAX_FRAME_RATE_HZ:
            raise CameraSettingError(
                f"frame_rate_hz: {frame_rate_hz} is outside (0, {MAX_FRAME_RATE_HZ}]")
        settings = CameraSettings(resolution=resolution, frame_timeout_s=frame_timeout_s)
        self.crop = crop or Crop(0, 0, *resolution)
        self.crop.check_inside(resolution)
        self.frame_rate_hz = frame_rate_hz
        self.thread_nice = thread_nice
        """Added to the nice value of the thread that reads and converts the frames."""
        self.camera: UvcCamera = (
            _NetworkStream(device, settings) if isinstance(device, str)
            and device.startswith(STREAM_SCHEMES)
            else _UvcAtFrameRate(device, settings, frame_rate_hz, dev_root))

    async def __aenter__(self) -> FrameGrabber:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        await self.camera.open()
        if self.thread_nice:
            await self.camera._in_worker(lower_thread_priority, self.thread_nice)

    async def close(self) -> None:
        await self.camera.close()

    async def capture(self) -> GrayFrame:
        return self.image_area(await self.camera.capture())

    def image_area(self, frame: RgbFrame) -> GrayFrame:
        c = self.crop
        area: Any = frame[c.top:c.top + c.height, c.left:c.left + c.width]
        return np.asarray(cv2.cvtColor(np.ascontiguousarray(area), cv2.COLOR_RGB2GRAY), np.uint8)
