"""Cameras: one abstract :class:`Camera` base, a UVC driver through OpenCV, and USB discovery.

In the python-microscope manner the public methods (``open``, ``configure``, ``capture``,
``close``) live on the base, validate and time out, and call ``_do_*`` hooks that a device class
implements. Device calls block (OpenCV, sensor exposure), so every hook runs on one worker thread
owned by the camera: the event loop never stalls, calls to one camera are serialised, and the
thread is joined by ``close()`` (so nothing outlives ``async with camera``).

Frames are ``H x W x 3`` ``uint8`` arrays in RGB order, the same contract as the WSI pipeline.
Discovery reads sysfs (``/sys/bus/usb/devices`` and ``/sys/class/video4linux``) rather than
opening devices, so listing cameras never disturbs one that is streaming.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import numpy.typing as npt

from medge.log import get_logger

RgbFrame = npt.NDArray[np.uint8]
"""H x W x 3, RGB order, uint8."""

T = TypeVar("T")

MAX_SIDE_PX = 16384
MAX_EXPOSURE_MS = 10_000.0
MAX_GAIN = 64.0
WHITE_BALANCE_RANGE_K = (2000, 10000)
CLOSE_GRACE_S = 2.0

log = get_logger(device="camera")


class CameraError(OSError):
    """The camera failed: not open, unplugged, or it returned something that is not a frame."""


class CameraNotFound(CameraError):
    """No camera at the given device path or index."""


class CameraTimeout(CameraError, TimeoutError):
    """No frame arrived within the frame timeout."""


class CameraSettingError(ValueError):
    """A setting is out of range or the device refused it; names the setting and the value."""


@dataclass(frozen=True)
class CameraSettings:
    """What a camera is asked to do; validated on construction so bad values never reach it.

    ``gain`` is a linear multiplier on the simulator; a UVC device receives it unchanged in its
    own units. ``white_balance_k`` is a colour temperature in kelvin, ``None`` for automatic.
    """

    resolution: tuple[int, int] = (1280, 960)
    exposure_ms: float = 10.0
    gain: float = 1.0
    white_balance_k: int | None = None
    frame_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        width, height = self.resolution
        if not (0 < width <= MAX_SIDE_PX and 0 < height <= MAX_SIDE_PX):
            raise CameraSettingError(
                f"resolution: {width}x{height} is outside 1..{MAX_SIDE_PX} px per side"
            )
        if not 0 < self.exposure_ms <= MAX_EXPOSURE_MS:
            raise CameraSettingError(
                f"exposure_ms: {self.exposure_ms} is outside (0, {MAX_EXPOSURE_MS}]"
            )
        if not 0 <= self.gain <= MAX_GAIN:
            raise CameraSettingError(f"gain: {self.gain} is outside [0, {MAX_GAIN}]")
        low, high = WHITE_BALANCE_RANGE_K
        if self.white_balance_k is not None and not low <= self.white_balance_k <= high:
            raise CameraSettingError(
                f"white_balance_k: {self.white_balance_k} is outside [{low}, {high}] K"
            )
        if not self.frame_timeout_s > 0:
            raise CameraSettingError(f"frame_timeout_s: {self.frame_timeout_s} must be > 0")


class Camera(ABC):
    """A camera. Use ``async with camera:``; ``capture()`` returns one RGB frame."""

    def __init__(self, name: str, settings: CameraSettings | None = None) -> None:
        self.name = name
        self._settings = settings or CameraSettings()
        self._worker: ThreadPoolExecutor | None = None

    @property
    def settings(self) -> CameraSettings:
        return self._settings

    @property
    def is_open(self) -> bool:
        return self._worker is not None

    async def __aenter__(self) -> Camera:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the device and apply the current settings."""
        if self._worker is not None:
            return
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"camera {self.name}")
        try:
            await self._in_worker(self._do_open)
            await self._in_worker(self._do_configure, self._settings)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Release the device and join the worker thread."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._settings.frame_timeout_s + CLOSE_GRACE_S):
                await loop.run_in_executor(worker, self._do_close)
        except TimeoutError:
            # A driver call that hangs cannot be interrupted from Python: do not hang with it.
            log.error("camera close timed out; abandoning its worker thread", camera=self.name)
            worker.shutdown(wait=False, cancel_futures=True)
            return
        worker.shutdown(wait=True)

    async def configure(self, settings: CameraSettings) -> None:
        """Change settings; applied at once when open, else on the next ``open()``."""
        if self._worker is not None:
            await self._in_worker(self._do_configure, settings)
        self._settings = settings

    async def capture(self) -> RgbFrame:
        """One frame; :class:`CameraTimeout` if none arrives within ``frame_timeout_s``."""
        if self._worker is None:
            raise CameraError(f"camera {self.name}: capture() before open()")
        timeout = self._settings.frame_timeout_s
        try:  # not asyncio.wait_for: in 3.11 it drops a cancel that meets a frame (gh-86296)
            async with asyncio.timeout(timeout):
                frame = await self._in_worker(self._do_capture)
        except TimeoutError as exc:
            raise CameraTimeout(f"camera {self.name}: no frame within {timeout} s") from exc
        width, height = self._settings.resolution
        if frame.dtype != np.uint8 or frame.shape != (height, width, 3):
            raise CameraError(
                f"camera {self.name}: frame is {frame.dtype} {frame.shape},"
                f" expected uint8 ({height}, {width}, 3)"
            )
        return frame

    async def _in_worker(self, function: Callable[..., T], *args: Any) -> T:
        if self._worker is None:
            raise CameraError(f"camera {self.name} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    @abstractmethod
    def _do_open(self) -> None:
        """Open the device (worker thread); raise :class:`CameraNotFound` if it is absent."""

    @abstractmethod
    def _do_configure(self, settings: CameraSettings) -> None:
        """Apply settings (worker thread); raise :class:`CameraSettingError` if refused."""

    @abstractmethod
    def _do_capture(self) -> RgbFrame:
        """Expose and read one RGB frame (worker thread)."""

    @abstractmethod
    def _do_close(self) -> None:
        """Release the device (worker thread)."""


# V4L2 through OpenCV: CAP_PROP_AUTO_EXPOSURE takes V4L2_EXPOSURE_MANUAL (1) or
# V4L2_EXPOSURE_APERTURE_PRIORITY (3); CAP_PROP_EXPOSURE is exposure_time_absolute in 100 µs.
V4L2_EXPOSURE_MANUAL = 1
V4L2_EXPOSURE_UNITS_PER_MS = 10


class UvcCamera(Camera):
    """A USB Video Class camera through OpenCV's V4L2 backend.

    ``device`` is a path (``/dev/video0``, or a udev symlink such as ``/dev/v4l/by-id/...``) or
    an index N meaning ``/dev/videoN``.
    """

    def __init__(
        self, device: str | int, settings: CameraSettings | None = None, dev_root: str = "/dev"
    ) -> None:
        self.device_path = device if isinstance(device, str) else f"{dev_root}/video{device}"
        super().__init__(self.device_path, settings)
        self._capture: Any = None

    def _open_capture(self) -> Any:
        """The OpenCV capture object; a separate method so tests can supply a stand-in."""
        return cv2.VideoCapture(self.device_path, cv2.CAP_V4L2)

    def _do_open(self) -> None:
        if not os.path.exists(self.device_path):
            raise CameraNotFound(f"{self.device_path}: no such camera device")
        capture = self._open_capture()
        if not capture.isOpened():
            capture.release()
            raise CameraNotFound(
                f"{self.device_path}: exists but cannot be opened as a V4L2 camera"
                " (busy, no permission, or not a capture device)"
            )
        self._capture = capture

    def _do_configure(self, settings: CameraSettings) -> None:
        capture = self._capture
        width, height = settings.resolution
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        actual = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                  int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if actual != (width, height):
            raise CameraSettingError(
                f"resolution: {self.device_path} does not support {width}x{height}"
                f" (it offers {actual[0]}x{actual[1]})"
            )
        capture.set(cv2.CAP_PROP_AUTO_EXPOSURE, V4L2_EXPOSURE_MANUAL)
        self._set(capture, "exposure_ms", cv2.CAP_PROP_EXPOSURE,
                  settings.exposure_ms * V4L2_EXPOSURE_UNITS_PER_MS)
        self._set(capture, "gain", cv2.CAP_PROP_GAIN, settings.gain)
        if settings.white_balance_k is None:
            capture.set(cv2.CAP_PROP_AUTO_WB, 1)
        else:
            capture.set(cv2.CAP_PROP_AUTO_WB, 0)
            self._set(capture, "white_balance_k", cv2.CAP_PROP_WB_TEMPERATURE,
                      settings.white_balance_k)

    def _set(self, capture: Any, setting: str, prop: int, value: float) -> None:
        if not capture.set(prop, value):
            raise CameraSettingError(f"{setting}: {self.device_path} refused {value}")

    def _do_capture(self) -> RgbFrame:
        ok, frame = self._capture.read()
        if not ok or frame is None:
            raise CameraError(f"{self.device_path}: no frame (unplugged or stream stopped)")
        rgb: RgbFrame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        return rgb

    def _do_close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


# --- discovery -------------------------------------------------------------------------------

USB_CLASS_VIDEO = 0x0E
USB_SUBCLASS_VIDEO_CONTROL = 0x01


@dataclass(frozen=True)
class UsbCameraInfo:
    """One USB camera found in sysfs.

    ``video_devices`` lists its capture nodes (``/dev/videoN``); it is empty when the camera is
    attached but no driver created a node (e.g. ``uvcvideo`` not loaded), which is worth telling
    the user about rather than hiding.
    """

    vendor_id: int
    product_id: int
    manufacturer: str | None
    product: str | None
    serial: str | None
    usb_path: str
    video_devices: tuple[str, ...]

    @property
    def usb_id(self) -> str:
        return f"{self.vendor_id:04x}:{self.product_id:04x}"


def discover_cameras(
    vendor_id: int | None = None,
    product_id: int | None = None,
    sysfs_root: Path = Path("/sys"),
    dev_root: Path = Path("/dev"),
) -> list[UsbCameraInfo]:
    """USB cameras (UVC class or with a video4linux node), optionally filtered by id."""
    nodes: dict[Path, list[str]] = {}
    for usb_device in _uvc_usb_devices(sysfs_root):
        nodes.setdefault(usb_device, [])
    for usb_device, node in _video_capture_nodes(sysfs_root):
        nodes.setdefault(usb_device, []).append(str(dev_root / node))
    found = []
    for usb_device, video_devices in nodes.items():
        info = _read_usb_device(usb_device, tuple(sorted(video_devices, key=_natural_key)))
        if info is None:
            continue
        if vendor_id is not None and info.vendor_id != vendor_id:
            continue
        if product_id is not None and info.product_id != product_id:
            continue
        found.append(info)
    return sorted(found, key=lambda info: _natural_key(info.usb_path))


def _uvc_usb_devices(sysfs_root: Path) -> set[Path]:
    """USB devices with a Video Control interface, whether or not a driver is bound."""
    devices = set()
    bus = sysfs_root / "bus" / "usb" / "devices"
    for entry in bus.iterdir() if bus.is_dir() else ():
        if ":" not in entry.name:
            continue
        if (_read_hex(entry / "bInterfaceClass") == USB_CLASS_VIDEO
                and _read_hex(entry / "bInterfaceSubClass") == USB_SUBCLASS_VIDEO_CONTROL):
            devices.add(entry.resolve().parent)
    return devices


def _video_capture_nodes(sysfs_root: Path) -> list[tuple[Path, str]]:
    """(USB device dir, node name) for each video4linux capture node on a USB device.

    A UVC camera makes two nodes; the metadata one has ``index`` 1, the capture one 0.
    """
    found = []
    v4l = sysfs_root / "class" / "video4linux"
    for node in v4l.iterdir() if v4l.is_dir() else ():
        if _read_text(node / "index") not in (None, "0"):
            continue
        usb_device = _usb_ancestor((node / "device").resolve(), sysfs_root.resolve())
        if usb_device is not None:
            found.append((usb_device, node.name))
    return found


def _usb_ancestor(path: Path, stop: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if candidate == stop or candidate == candidate.parent:
            return None
        if (candidate / "idVendor").is_file():
            return candidate
    return None


def _read_usb_device(device: Path, video_devices: tuple[str, ...]) -> UsbCameraInfo | None:
    vendor, product = _read_hex(device / "idVendor"), _read_hex(device / "idProduct")
    if vendor is None or product is None:
        log.warning("skipping USB device with unreadable ids", sysfs=str(device))
        return None
    return UsbCameraInfo(
        vendor_id=vendor,
        product_id=product,
        manufacturer=_read_text(device / "manufacturer"),
        product=_read_text(device / "product"),
        serial=_read_text(device / "serial"),
        usb_path=device.name,
        video_devices=video_devices,
    )


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _read_hex(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return None if text is None else int(text, 16)
    except ValueError:
        return None


def _natural_key(name: str) -> tuple[tuple[int, ...], str]:
    """Sort ``video2`` before ``video10`` and ``1-2`` before ``1-10``."""
    digits = "".join(c if c.isdigit() else " " for c in name).split()
    return tuple(int(d) for d in digits), name
