"""Ultrasound capture: the phantom simulator, the grabber's crop, pose interpolation, the
capture service (stamping, dropped frames, recording, live view), the live view over a real
mosquitto from the manipulator daemon on the simulated robot, and the grabber simulator as its
own process read through OpenCV by URL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, cast

import aiomqtt
import cv2
import numpy as np
import pytest

from daemons.manipulator import us_dicom
from daemons.manipulator.kinematics import ProbePose
from daemons.manipulator.sweeps import Surface, SweepSpec
from daemons.manipulator.teleop_protocol import ProtocolError
from daemons.manipulator.ultrasound import (
    PoseSample,
    PoseTrack,
    UltrasoundError,
    UltrasoundSection,
    UltrasoundService,
    UsRequests,
    age_ms,
    attach,
    decode_us_request,
    parse_live,
)
from drivers.camera import CameraNotFound, CameraSettingError
from drivers.frame_grabber import Crop, FrameGrabber, lower_thread_priority
from firmware_sim.link import Endpoint, SimulatorServer
from firmware_sim.ultrasound import (
    ImageGeometry,
    Phantom,
    SimulatedUltrasound,
    UltrasoundSimError,
    render_bmode,
    world_probe,
)
from firmware_sim.ultrasound_grabber import STREAM_PATH, FrameStream, PoseFollower
from medge.localbroker import Mosquitto
from medge.teleop import RobotTopics
from tests.teleop_rig import NODE, ROBOT, SITE, rig, wait_for
from tests.test_sweeps import SHARED_BOX_WATCHDOG_S
from tests.us_grabber import grabber_process

DOWN = (0.0, 0.0, -1.0)
SKIN = -0.22
SMALL = ImageGeometry(200, 150)


# --- simulator ---------------------------------------------------------------------------

def test_frames_change_as_the_probe_moves_and_repeat_at_the_same_pose() -> None:
    here = render_bmode(Phantom(), SMALL, (0.0, 0.0, SKIN - 0.003), DOWN, 4.0)
    again = render_bmode(Phantom(), SMALL, (0.0, 0.0, SKIN - 0.003), DOWN, 4.0)
    moved = render_bmode(Phantom(), SMALL, (0.01, 0.0, SKIN - 0.003), DOWN, 4.0)
    assert np.array_equal(here, again)
    assert np.abs(here.astype(int) - moved).mean() > 5


def test_frames_are_dark_without_contact_and_dim_with_depth() -> None:
    touching = render_bmode(Phantom(), SMALL, (0.0, 0.0, SKIN - 0.003), DOWN, 4.0)
    lifted = render_bmode(Phantom(), SMALL, (0.0, 0.0, SKIN - 0.003), DOWN, 0.0)
    assert touching.mean() > 25 and lifted.mean() < 8
    rows = touching.shape[0]
    assert touching[rows // 5:rows // 2].mean() > touching[-rows // 5:].mean()


def test_vessel_is_anechoic() -> None:
    """The first vessel sits 3 cm deep at x = -2 cm: its centre is darker than the tissue."""
    frame = render_bmode(Phantom(), ImageGeometry(200, 200, depth_m=0.06, aperture_m=0.05),
                         (-0.02, 0.0, SKIN - 0.001), DOWN, 4.0)
    centre_row = round(0.029 / 0.06 * 200)
    lumen = frame[centre_row - 5:centre_row + 5, 95:105].mean()
    assert lumen < 0.3 * frame[centre_row - 5:centre_row + 5, 5:25].mean()


@pytest.mark.parametrize("make", [
    lambda: ImageGeometry(8, 600),
    lambda: ImageGeometry(depth_m=0.0),
    lambda: SimulatedUltrasound(lambda: ((0, 0, 0), DOWN, 0.0), frame_rate_hz=0),
])
def test_bad_simulator_settings_are_refused(make: object) -> None:
    with pytest.raises(UltrasoundSimError):
        make()  # type: ignore[operator]


async def test_simulator_capture_needs_open_and_closes_its_thread() -> None:
    sim = SimulatedUltrasound(lambda: ((0.0, 0.0, SKIN - 0.003), DOWN, 4.0),
                              frame_rate_hz=100, geometry=SMALL)
    with pytest.raises(UltrasoundSimError, match="before open"):
        await sim.capture()
    async with sim:
        frame = await sim.capture()
    assert frame.shape == (150, 200) and frame.dtype == np.uint8 and sim.frames == 1


# --- grabber -----------------------------------------------------------------------------

def test_grabber_crops_the_image_area_to_grayscale() -> None:
    grabber = FrameGrabber("/dev/null-camera", resolution=(64, 48), crop=Crop(8, 4, 32, 20))
    screen = np.zeros((48, 64, 3), np.uint8)
    screen[4:24, 8:40] = (200, 200, 200)
    area = grabber.image_area(screen)
    assert area.shape == (20, 32) and area.dtype == np.uint8
    assert int(area.min()) == 200


@pytest.mark.parametrize("crop", [Crop(0, 0, 65, 48), Crop(-1, 0, 10, 10), Crop(0, 40, 10, 10)])
def test_grabber_crop_outside_the_frame_is_refused(crop: Crop) -> None:
    with pytest.raises(CameraSettingError, match="crop"):
        FrameGrabber(0, resolution=(64, 48), crop=crop)


def test_grabber_frame_rate_out_of_range_is_refused() -> None:
    with pytest.raises(CameraSettingError, match="frame_rate_hz"):
        FrameGrabber(0, frame_rate_hz=0)


async def test_missing_grabber_device_is_named(tmp_path: Path) -> None:
    grabber = FrameGrabber(str(tmp_path / "video9"), resolution=(64, 48))
    with pytest.raises(CameraNotFound, match="video9"):
        await grabber.open()
    assert not grabber.camera.is_open


async def test_grabber_asks_for_the_frame_rate_and_returns_the_image_area(
        tmp_path: Path) -> None:
    from tests.test_camera_driver import FakeCapture

    node = tmp_path / "video0"
    node.touch()
    fake = FakeCapture(64, 48)
    screen = np.zeros((48, 64, 3), np.uint8)
    screen[4:24, 8:40] = (90, 90, 90)  # BGR grey in the image area
    fake.frames.append(screen)
    grabber = FrameGrabber(str(node), resolution=(64, 48), crop=Crop(8, 4, 32, 20),
                           frame_rate_hz=25.0)
    grabber.camera._open_capture = lambda: fake  # type: ignore[method-assign]
    async with grabber:
        area = await grabber.capture()
    assert fake.props[cv2.CAP_PROP_FPS] == 25.0 and fake.released
    assert area.shape == (20, 32) and int(area.min()) == int(area.max()) == 90


async def test_grabber_refusing_the_frame_rate_is_named(tmp_path: Path) -> None:
    from tests.test_camera_driver import FakeCapture

    node = tmp_path / "video0"
    node.touch()
    fake = FakeCapture(64, 48, refuse=cv2.CAP_PROP_FPS)
    grabber = FrameGrabber(str(node), resolution=(64, 48), frame_rate_hz=60.0)
    grabber.camera._open_capture = lambda: fake  # type: ignore[method-assign]
    with pytest.raises(CameraSettingError, match="frame_rate_hz.*60"):
        await grabber.open()
    assert not grabber.camera.is_open


def test_lower_thread_priority_renices_only_the_calling_thread() -> None:
    me = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, me)
    seen: list[int] = []

    def worker() -> None:
        lower_thread_priority(5)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [min(19, before + 5)]
    assert os.getpriority(os.PRIO_PROCESS, me) == before


# --- pose track --------------------------------------------------------------------------

def pose_x(x: float) -> ProbePose:
    return ProbePose(x, 0.0, SKIN, 0.0, 0.1)


def test_pose_track_interpolates_to_the_frame_time() -> None:
    track = PoseTrack(max_hold_s=0.02)
    track.add(PoseSample(1.00, pose_x(0.000), 2.0))
    track.add(PoseSample(1.01, pose_x(0.001), 4.0))
    track.add(PoseSample(1.005, pose_x(9.0), 9.0))  # out of order: ignored
    stamped = track.at(1.0025)
    assert stamped is not None
    assert stamped.pose.tip_x == pytest.approx(0.00025) and stamped.force_n == pytest.approx(2.5)
    held = track.at(1.02)
    assert held is not None and held.pose.tip_x == pytest.approx(0.001)
    assert track.at(0.99) is None and track.at(1.05) is None  # before, or too long after


# --- service -----------------------------------------------------------------------------

class FakeSource:
    frame_rate_hz = 30.0

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def capture(self) -> np.ndarray:
        raise AssertionError("the tests feed frames through accept()")


def service(tmp_path: Path, track: PoseTrack, **section: object) -> tuple[
        UltrasoundService, list[bytes]]:
    published: list[bytes] = []

    async def publish(topic: str, payload: bytes) -> None:
        assert topic == "live"
        published.append(payload)
    settings = UltrasoundSection(**section)  # type: ignore[arg-type]
    return UltrasoundService(settings, FakeSource(), track, output_dir=tmp_path / "out",
                             publish=publish, live_topic="live", clock=lambda: 10.0), published


def moving_track() -> PoseTrack:
    track = PoseTrack()
    for step in range(101):  # 1 s at 100 Hz, x from 0 to 10 mm
        track.add(PoseSample(9.0 + step * 0.01, pose_x(step * 0.0001), 3.0))
    return track


async def test_frames_are_stamped_recorded_and_written(tmp_path: Path) -> None:
    svc, _ = service(tmp_path, moving_track(), live_rate_hz=0.0)
    image = np.full((60, 80), 90, np.uint8)
    try:
        recording = svc.start_recording("manual")
        with pytest.raises(UltrasoundError, match="is running"):
            svc.start_recording()
        await svc.accept(image, 8.5)  # before the control loop's history: not recorded
        for index in range(10):
            await svc.accept(image, 9.1 + index / 30)
        frame = svc.latest
        assert frame is not None and frame.pose is not None
        assert frame.pose.pose.tip_x == pytest.approx((9.1 + 9 / 30 - 9.0) * 0.01, abs=1e-9)
        assert svc.recording is not None and svc.recording.skipped_unposed == 1
        path = await svc.stop_recording()
    finally:
        await svc.close()
    assert recording in path.read_bytes().decode("latin-1")
    with pytest.raises(UltrasoundError, match="no recording"):
        await svc.stop_recording()


async def test_record_stop_replies_with_the_frame_counts(tmp_path: Path) -> None:
    svc, _ = service(tmp_path, moving_track(), live_rate_hz=0.0)
    requests = UsRequests(cast(Any, None), svc)  # record_stop needs only the service
    image = np.full((30, 40), 90, np.uint8)
    try:
        svc.start_recording()
        await svc.accept(image, 8.5)  # before the pose history: skipped
        for index in range(3):
            await svc.accept(image, 9.1 + index / 30)
        reply = await requests.execute("record_stop", {}, "alice")
    finally:
        await svc.close()
    assert reply.ok and (reply.detail["frames"], reply.detail["skipped_unposed"]) == (3, 1)
    assert reply.detail["file"] == svc.written[0].name


async def test_a_recording_stops_at_the_dicom_frame_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_recording_s x frame rate may exceed what one instance holds (600 s x 30 fps >
    10,000 frames): the recording is written at the instance's limit, not refused at stop."""
    monkeypatch.setattr(us_dicom, "MAX_FRAMES", 4)
    svc, _ = service(tmp_path, moving_track(), live_rate_hz=0.0)
    image = np.full((30, 40), 90, np.uint8)
    try:
        svc.start_recording()
        for index in range(6):
            await svc.accept(image, 9.1 + index / 30)
    finally:
        await svc.close()
    assert svc.recording is None and len(svc.written) == 1
    assert us_dicom.load(svc.written[0]).NumberOfFrames == 4


async def test_gaps_in_capture_times_count_dropped_frames(tmp_path: Path) -> None:
    svc, _ = service(tmp_path, moving_track(), live_rate_hz=0.0)
    image = np.zeros((30, 40), np.uint8)
    try:
        for at in (9.0, 9.0 + 1 / 30, 9.0 + 4 / 30, 9.0 + 5 / 30):
            await svc.accept(image, at)
    finally:
        await svc.close()
    assert (svc.frames, svc.dropped) == (4, 2)


async def test_empty_recording_is_refused(tmp_path: Path) -> None:
    svc, _ = service(tmp_path, PoseTrack())
    try:
        svc.start_recording()
        await svc.accept(np.zeros((30, 40), np.uint8), 9.5)  # no pose: not recorded
        with pytest.raises(UltrasoundError, match="no posed frame"):
            await svc.stop_recording()
    finally:
        await svc.close()


async def test_live_view_is_rate_limited_and_carries_age_pose_and_jpeg(tmp_path: Path) -> None:
    svc, published = service(tmp_path, moving_track(), live_rate_hz=10.0)
    image = np.full((30, 40), 128, np.uint8)
    try:
        for index in range(30):  # one second of frames at 30 fps
            await svc.accept(image, 9.0 + index / 30)
    finally:
        await svc.close()
    assert 10 <= len(published) <= 11  # 10 a second, plus the one that starts the second
    header, jpeg = parse_live(published[-1])
    assert header["seq"] == len(published) and (header["width"], header["height"]) == (40, 30)
    assert header["force_n"] == pytest.approx(3.0) and header["pose"]["tilt"][1] == 0.1
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert decoded.shape == (30, 40) and abs(int(decoded.mean()) - 128) < 3
    # the clock says 10.0 s and the frame was captured at 9.9667 s: 33 ms old when published
    assert header["age_ms"] == pytest.approx(1000 / 30, abs=5)
    assert age_ms(header, header["published_at"] + 0.1) == pytest.approx(header["age_ms"] + 100)


@pytest.mark.parametrize(("payload", "code"), [
    (b"[]", "malformed"),
    (b'{"v": 1, "operator": "bob", "cmd": "list"}', "operator_mismatch"),
    (b'{"v": 1, "operator": "alice", "cmd": "fly"}', "unknown_command"),
    (b'{"v": 1, "operator": "alice", "cmd": "list", "args": []}', "malformed"),
    (b'{"v": 1, "operator": "alice", "cmd": "list", "x": 1}', "malformed"),
    (b"\xff" * 5000, "too_large"),
])
def test_bad_us_requests_are_named(payload: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_us_request(payload, "alice")
    assert caught.value.code == code


# --- end to end --------------------------------------------------------------------------

async def test_live_view_reaches_a_subscriber_with_its_age(
        broker: Mosquitto, tmp_path: Path) -> None:
    section = UltrasoundSection(resolution=(320, 240), live_rate_hz=15.0)
    async with rig(broker.port, tmp_path) as r:
        source = SimulatedUltrasound(world_probe(r.world), frame_rate_hz=30,
                                     geometry=ImageGeometry(320, 240))
        svc = await attach(r.daemon, section, source)
        while (await svc.next_frame()).pose is None:  # frames before the first control cycle
            pass
        topic = f"{r.topics.state}/us"
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.subscribe(topic)
            headers = []
            async with asyncio.timeout(10):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    header, jpeg = parse_live(message.payload)
                    headers.append((header, jpeg, time.time()))
                    if len(headers) == 5:
                        break
        for header, jpeg, received in headers:
            assert 0 <= header["age_ms"] < 5000
            assert age_ms(header, received) >= header["age_ms"]
            assert header["pose"]["tip"][2] == pytest.approx(r.tip()[2], abs=1e-3)
            assert header["force_n"] == pytest.approx(0.0, abs=0.5)  # hanging free
            image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
            assert image.shape == (240, 320) and image.mean() < 10  # no contact: dark
        assert [h["seq"] for h, _, _ in headers] == sorted(h["seq"] for h, _, _ in headers)
        assert svc.frames >= 5
        assert json.loads(json.dumps(svc.listing()))["sweeps"]["linear-x"]["kind"] == "linear"


async def test_daemon_with_an_ultrasound_section_runs_the_simulated_probe(
        broker: Mosquitto, tmp_path: Path) -> None:
    """The daemon's own hook: ``[manipulator.ultrasound] source = "simulated"`` renders the
    phantom from the daemon's measured pose and force."""
    section = UltrasoundSection(resolution=(160, 120), live_rate_hz=0.0)
    async with rig(broker.port, tmp_path, ultrasound=section) as r:
        svc = r.daemon.ultrasound
        assert svc is not None
        frame = await svc.next_frame()
        while frame.pose is None:
            frame = await svc.next_frame()
        assert (frame.rows, frame.columns) == (120, 160)
        assert frame.pose.pose.tip_z == pytest.approx(r.tip()[2], abs=1e-3)


def test_ultrasound_section_loads_from_toml(tmp_path: Path) -> None:
    from daemons.manipulator.daemon import ManipulatorConfig
    from medge.config import ConfigError, load

    path = tmp_path / "manipulator.toml"
    path.write_text('[node]\nsite = "s"\nnode = "n"\n'
                    '[manipulator.ultrasound]\nsource = "/dev/video2"\ncrop = [10, 20, 800, 600]\n'
                    'frame_rate_hz = 25.0\n'
                    '[manipulator.ultrasound.sweeps.liver]\nkind = "fan"\nfan_rad = 0.2\n')
    section = load(path, ManipulatorConfig).manipulator.ultrasound
    assert section is not None and section.crop == (10, 20, 800, 600)
    assert section.sweeps["liver"].kind == "fan" and section.frame_rate_hz == 25.0
    path.write_text('[node]\nsite = "s"\nnode = "n"\n'
                    '[manipulator.ultrasound]\nframe_rate_hz = 500.0\n')
    with pytest.raises(ConfigError, match="frame_rate_hz"):
        load(path, ManipulatorConfig)


# --- the grabber simulator as its own process -------------------------------------------------

async def test_daemon_records_from_the_simulator_process_through_opencv(
        broker: Mosquitto, tmp_path: Path) -> None:
    """``medge sim ultrasound`` (its own process) follows the robot's state topic and serves an
    MJPEG stream; the daemon opens it by URL with cv2.VideoCapture (FFmpeg backend), records a
    sweep, and the frames show contact when their stamps say the probe touched."""
    state_topic = RobotTopics(SITE, NODE, ROBOT).state
    short = SweepSpec(start=(-0.008, 0.0), end=(0.008, 0.0), speed=0.02, press_m=0.003)
    async with grabber_process("--size", "320x240", "--pose-topic",
                               f"mqtt://127.0.0.1:{broker.port}/{state_topic}") as grabber:
        section = UltrasoundSection(source=grabber.url, resolution=(320, 240),
                                    live_rate_hz=0.0, sweeps={"short": short})
        async with rig(broker.port, tmp_path, watchdog_s=SHARED_BOX_WATCHDOG_S,
                       ultrasound=section) as r:
            svc = r.daemon.ultrasound
            assert svc is not None and isinstance(svc.source, FrameGrabber)
            assert svc.source.camera.device_path == grabber.url
            run = svc.start_sweep("short", r.daemon.control, Surface())
            assert await run.finished(60) == "completed"
            await wait_for(lambda: bool(svc.written), 20)
        stats = await grabber.stop()
    ds = us_dicom.load(svc.written[0])
    records = us_dicom.read_pose_sequence(ds)
    assert len(records) >= 30 and stats["sent"] >= len(records)
    assert stats["pose_messages"] > 0 and stats["readers"] == 1
    pixels = ds.pixel_array
    touching = [float(p.mean()) for p, rec in zip(pixels, records, strict=True)
                if (rec.force_n or 0.0) > 3.0]
    free = [float(p.mean()) for p, rec in zip(pixels, records, strict=True)
            if (rec.force_n or 0.0) < 0.1]
    assert touching and statistics.median(touching) > 15
    assert free and statistics.median(free) < 8  # the approach, before contact


async def test_a_stream_that_ends_is_reopened(tmp_path: Path) -> None:
    """A grabber unplugged (here: the stream's connection dropped) comes back by reopening."""
    stream = FrameStream(lambda: ((0.0, 0.0, SKIN - 0.003), DOWN, 4.0), frame_rate_hz=30,
                         geometry=SMALL)
    async with stream, SimulatorServer(stream.serve, Endpoint("tcp")) as server:
        url = server.address.replace("socket://", "http://") + STREAM_PATH
        with pytest.raises(CameraSettingError, match="resolution: the stream .* is 200x150"):
            await FrameGrabber(url, resolution=(320, 240)).open()
        # one reader at a time, like a capture device: wait until the server has let go of
        # that reader (an open at once may be refused; the daemon waits 1 s before reopening)
        await wait_for(lambda: server._active is None or server._active.done())
        grabber = FrameGrabber(url, resolution=(200, 150), thread_nice=5)
        svc = UltrasoundService(UltrasoundSection(live_rate_hz=0.0), grabber, PoseTrack(),
                                output_dir=tmp_path)
        await grabber.open()
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        reader_nice = await grabber.camera._in_worker(
            lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        assert reader_nice == min(19, base + 5)  # the reading thread yields to the loop
        capture = asyncio.create_task(svc.run())
        try:
            await wait_for(lambda: svc.frames >= 5, 20)
            server.faults.disconnect()
            await wait_for(lambda: svc.source_errors >= 1, 20)
            seen = svc.frames
            await wait_for(lambda: svc.frames >= seen + 5, 20)
        finally:
            capture.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await capture
            await svc.close()
            await grabber.close()
    assert stream.stats.readers >= 3  # the wrong-size open, the first stream, the reopened one
    latest = svc.latest
    assert latest is not None and (latest.rows, latest.columns) == (150, 200)


def test_pose_follower_reads_the_state_message_and_refuses_a_bad_url() -> None:
    follower = PoseFollower("mqtt://127.0.0.1:1883/medge/v1/s/n/probe-arm/state")
    assert follower() == ((0.0, 0.0, 0.0), DOWN, 0.0)  # before any message: no contact
    follower.update(b'{"pose": {"tip": [0.01, 0.0, -0.223], "tilt": [0.0, 0.0]}, "force_n": 4.2}')
    follower.update(b'{"pose": {"tip": [1, 2]}}')  # not a pose: ignored
    tip, axis, force = follower()
    assert tip == (0.01, 0.0, -0.223) and axis == pytest.approx(DOWN) and force == 4.2
    assert follower.messages == 1
    with pytest.raises(UltrasoundSimError, match="mqtt://HOST:PORT/TOPIC"):
        PoseFollower("http://127.0.0.1/state")
