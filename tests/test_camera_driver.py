"""UVC camera driver error paths and USB discovery on a fake sysfs tree (no real camera here)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from drivers.camera import (
    CameraError,
    CameraNotFound,
    CameraSettingError,
    CameraSettings,
    CameraTimeout,
    UvcCamera,
    discover_cameras,
)


class FakeCapture:
    """Stands in for cv2.VideoCapture: records property writes, serves BGR frames."""

    def __init__(self, width: int = 64, height: int = 48, *, refuse: int | None = None) -> None:
        self.props: dict[int, float] = {cv2.CAP_PROP_FRAME_WIDTH: width,
                                        cv2.CAP_PROP_FRAME_HEIGHT: height}
        self.supported = (width, height)
        self.refuse = refuse
        self.frames: list[np.ndarray | None] = []
        self.released = False
        self.gate: threading.Event | None = None

    def isOpened(self) -> bool:  # OpenCV's name
        return True

    def set(self, prop: int, value: float) -> bool:
        if prop == self.refuse:
            return False
        if prop in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT):
            return True  # like a real device: keeps its own supported size
        self.props[prop] = value
        return True

    def get(self, prop: int) -> float:
        return self.props.get(prop, 0.0)

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.gate is not None:
            self.gate.wait(5)
        frame = self.frames.pop(0) if self.frames else None
        return frame is not None, frame

    def release(self) -> None:
        self.released = True


class FakeUvc(UvcCamera):
    def __init__(self, capture: FakeCapture, device: str, settings: CameraSettings) -> None:
        super().__init__(device, settings)
        self.fake = capture

    def _open_capture(self) -> Any:
        return self.fake


@pytest.fixture
def device_node(tmp_path: Path) -> str:
    node = tmp_path / "video0"
    node.touch()
    return str(node)


async def test_missing_device_path_is_a_clear_error(tmp_path: Path) -> None:
    camera = UvcCamera(str(tmp_path / "video7"))
    with pytest.raises(CameraNotFound, match=r"video7: no such camera device"):
        await camera.open()
    assert not camera.is_open


async def test_missing_index_names_the_device_path(tmp_path: Path) -> None:
    with pytest.raises(CameraNotFound, match=f"{tmp_path}/video3"):
        async with UvcCamera(3, dev_root=str(tmp_path)):
            pass


async def test_existing_path_that_is_not_a_camera(device_node: str) -> None:
    with pytest.raises(CameraNotFound, match="cannot be opened as a V4L2 camera"):
        async with UvcCamera(device_node):
            pass


async def test_capture_before_open() -> None:
    with pytest.raises(CameraError, match="before open"):
        await UvcCamera("/dev/nonexistent").capture()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"resolution": (0, 480)}, "resolution"),
        ({"exposure_ms": 0.0}, "exposure_ms"),
        ({"gain": -1.0}, "gain"),
        ({"white_balance_k": 500}, "white_balance_k"),
        ({"frame_timeout_s": 0.0}, "frame_timeout_s"),
    ],
)
def test_settings_out_of_range_name_the_setting(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(CameraSettingError, match=rf"^{field}: "):
        CameraSettings(**changes)


async def test_frames_are_rgb_and_settings_reach_the_device(device_node: str) -> None:
    fake = FakeCapture()
    bgr = np.zeros((48, 64, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV's order
    fake.frames.append(bgr)
    settings = CameraSettings(resolution=(64, 48), exposure_ms=12.5, gain=2.0, white_balance_k=5000)
    async with FakeUvc(fake, device_node, settings) as camera:
        frame = await camera.capture()
        assert frame[..., 2].min() == 200 and frame[..., 0].max() == 0
        assert fake.props[cv2.CAP_PROP_EXPOSURE] == 125  # 100 µs units
        assert fake.props[cv2.CAP_PROP_AUTO_WB] == 0
        assert fake.props[cv2.CAP_PROP_WB_TEMPERATURE] == 5000
        with pytest.raises(CameraError, match="no frame"):
            await camera.capture()
    assert fake.released


async def test_unsupported_resolution_is_refused(device_node: str) -> None:
    settings = CameraSettings(resolution=(1920, 1080))
    with pytest.raises(CameraSettingError, match=r"does not support 1920x1080.*64x48"):
        async with FakeUvc(FakeCapture(), device_node, settings):
            pass


async def test_refused_control_names_the_setting(device_node: str) -> None:
    fake = FakeCapture(refuse=cv2.CAP_PROP_GAIN)
    with pytest.raises(CameraSettingError, match=r"^gain: "):
        async with FakeUvc(fake, device_node, CameraSettings(resolution=(64, 48))):
            pass
    assert fake.released


async def test_frame_timeout(device_node: str) -> None:
    fake = FakeCapture()
    fake.gate = threading.Event()
    fake.frames.append(np.zeros((48, 64, 3), np.uint8))
    settings = CameraSettings(resolution=(64, 48), frame_timeout_s=0.05)
    async with FakeUvc(fake, device_node, settings) as camera:
        with pytest.raises(CameraTimeout, match=r"no frame within 0\.05 s"):
            await camera.capture()
        fake.gate.set()  # the device wakes up; close() then joins the worker


async def test_a_cancel_that_meets_a_frame_ends_the_capture(
        device_node: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.11's asyncio.wait_for returns the result when the awaited call finishes in the
    loop turn a cancel arrives (gh-86296): the capture loop of a stopping daemon swallowed its
    cancel and captured on, and the manipulator's stop hung (a test, 1 run in 4 under load)."""
    frame_ready: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()

    async def in_worker(*_: Any) -> np.ndarray:
        return await frame_ready

    async with FakeUvc(FakeCapture(), device_node, CameraSettings(resolution=(64, 48))) as camera:
        monkeypatch.setattr(camera, "_in_worker", in_worker)
        capture = asyncio.create_task(camera.capture())
        await asyncio.sleep(0)  # it waits for its frame
        frame_ready.set_result(np.zeros((48, 64, 3), np.uint8))
        capture.cancel()  # the daemon stops in the same turn
        with pytest.raises(asyncio.CancelledError):
            await capture


async def test_wrong_frame_shape_is_an_error(device_node: str) -> None:
    fake = FakeCapture()
    fake.frames.append(np.zeros((10, 10, 3), np.uint8))
    async with FakeUvc(fake, device_node, CameraSettings(resolution=(64, 48))) as camera:
        with pytest.raises(CameraError, match=r"expected uint8 \(48, 64, 3\)"):
            await camera.capture()


# --- discovery on a fake sysfs --------------------------------------------------------------


def make_usb_device(sys: Path, name: str, ids: tuple[str, str], *, uvc: bool = True,
                    product: str = "Cam", serial: str | None = "SN1") -> Path:
    device = sys / "devices" / "pci0000:00" / "usb1" / name
    interface = device / f"{name}:1.0"
    interface.mkdir(parents=True)
    (device / "idVendor").write_text(ids[0] + "\n")
    (device / "idProduct").write_text(ids[1] + "\n")
    (device / "manufacturer").write_text("Acme\n")
    (device / "product").write_text(product + "\n")
    if serial is not None:
        (device / "serial").write_text(serial + "\n")
    (interface / "bInterfaceClass").write_text("0e\n" if uvc else "ff\n")
    (interface / "bInterfaceSubClass").write_text("01\n")
    bus = sys / "bus" / "usb" / "devices"
    bus.mkdir(parents=True, exist_ok=True)
    (bus / name).symlink_to(device)
    (bus / interface.name).symlink_to(interface)
    return interface


def make_video_node(sys: Path, node: str, interface: Path, index: int) -> None:
    entry = sys / "class" / "video4linux" / node
    entry.mkdir(parents=True)
    (entry / "index").write_text(f"{index}\n")
    (entry / "name").write_text("Cam\n")
    (entry / "device").symlink_to(interface)


def test_discovery_on_fake_sysfs(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    first = make_usb_device(sys, "1-10", ("046d", "0825"), product="C270")
    make_video_node(sys, "video10", first, 0)
    make_video_node(sys, "video11", first, 1)  # metadata node: not a capture device
    second = make_usb_device(sys, "1-2", ("32e4", "9230"), serial=None)
    make_video_node(sys, "video2", second, 0)
    make_usb_device(sys, "1-3", ("0bda", "5830"))  # attached, no driver bound
    make_usb_device(sys, "1-4", ("10c4", "ea60"), uvc=False)  # a serial bridge: not a camera

    found = discover_cameras(sysfs_root=sys, dev_root=Path("/dev"))

    assert [c.usb_path for c in found] == ["1-2", "1-3", "1-10"]
    by_path = {c.usb_path: c for c in found}
    assert by_path["1-10"].usb_id == "046d:0825"
    assert by_path["1-10"].product == "C270"
    assert by_path["1-10"].video_devices == ("/dev/video10",)
    assert by_path["1-2"].serial is None and by_path["1-2"].video_devices == ("/dev/video2",)
    assert by_path["1-3"].video_devices == ()
    only = discover_cameras(vendor_id=0x046D, product_id=0x0825, sysfs_root=sys)
    assert [c.usb_path for c in only] == ["1-10"]
    assert discover_cameras(vendor_id=0x046D, product_id=0x0001, sysfs_root=sys) == []


def test_discovery_skips_unreadable_ids_and_missing_trees(tmp_path: Path) -> None:
    sys = tmp_path / "sys"
    broken = make_usb_device(sys, "1-5", ("zz", "0825"))
    make_video_node(sys, "video0", broken, 0)
    assert discover_cameras(sysfs_root=sys) == []
    assert discover_cameras(sysfs_root=tmp_path / "absent") == []
