"""The ultrasound side of the manipulator daemon: pose-stamped capture, recording, live view.

The capture loop reads the image area from the frame source (the UVC grabber, or the
simulator), stamps each frame with its capture time on the daemon's monotonic clock (minus the
grabber's configured latency) and with the probe pose and contact force *at that time*: the
control loop appends every cycle's measured pose and force to a :class:`PoseTrack`, which
interpolates linearly between the two cycles around the frame's timestamp. Poses are in the
robot base frame — the frame the camera registration puts the patient surface in.

Each frame is JPEG-encoded once, on the service's own worker thread; the same bytes feed the
recording (encapsulated unchanged in the DICOM cine loop, :mod:`us_dicom`) and the live view.

Live view: at most ``live_rate_hz`` frames a second on ``{robot}/state/us`` (a sub-topic of the
robot's ``state`` kind, QoS 0, never retained: a stale frame is worthless). Payload: one line of
JSON (``seq``, ``captured_at`` and ``published_at`` in epoch seconds, ``age_ms`` at publish,
pose, force, size, recording) then ``\\n`` then the JPEG. The console shows
``age_ms + (now - published_at)``.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import functools
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiomqtt
import cv2
import numpy as np
import numpy.typing as npt
import structlog

from daemons.manipulator import teleop_protocol as proto
from daemons.manipulator import us_dicom
from daemons.manipulator.control import ControlLoop
from daemons.manipulator.kinematics import HolderKinematics, ProbePose
from daemons.manipulator.registration import RegistrationError
from daemons.manipulator.supervisor import CycleOutput
from daemons.manipulator.sweeps import Surface, SweepError, SweepRun, SweepSpec
from drivers.dynamixel import ServoState
from drivers.frame_grabber import Crop, FrameGrabber, lower_thread_priority
from medge.config import bounds

if TYPE_CHECKING:
    from daemons.manipulator.daemon import ManipulatorDaemon
    from medge.pacs.delivery import Progress

log = structlog.get_logger(__name__)

GrayFrame = npt.NDArray[np.uint8]
Publish = Callable[[str, bytes], Awaitable[None]]
POSE_HISTORY = 1000
"""Control cycles kept for interpolation (10 s at 100 Hz)."""
LIVE_VERSION = 1
CAPTURE_THREAD_NICE = 10
"""The grabber's and the encoder's threads run this much nicer than the daemon, so that on a
busy box the control loop's thread gets the CPU first (a late frame is dropped and counted; a
late control cycle can trip the servos' watchdog)."""


DELIVERED = "delivered"
"""Beside the recordings: those the PACS confirmed, each stamped (mtime) when it was."""
TIDY_EVERY_S = 3600.0
RECENT_RECORDINGS = 100


def mark_delivered(output_dir: Path, progress: Progress) -> None:
    """A recording the PACS confirmed moves to ``delivered/``, stamped now: its keep time
    starts. (One recording is one instance, and its file is named after it, as in the spool.)"""
    if progress.confirmed != progress.total:
        return
    source = output_dir / progress.instance
    target = output_dir / DELIVERED / progress.instance
    target.parent.mkdir(exist_ok=True)
    with contextlib.suppress(FileNotFoundError):  # delivered again after a restart
        os.replace(source, target)
        os.utime(target)


def remove_delivered(output_dir: Path, delivered_before: float) -> list[Path]:
    """Remove the recordings the PACS confirmed before ``delivered_before`` (wall time)."""
    removed = []
    for path in sorted((output_dir / DELIVERED).glob("*.dcm")):
        if path.stat().st_mtime < delivered_before:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


async def tidy_recordings(output_dir: Path, keep_days: float) -> None:
    """Hourly: the delivered recordings that came of age go."""
    while True:
        try:
            removed = await asyncio.to_thread(remove_delivered, output_dir,
                                              time.time() - keep_days * 86400)
        except OSError as exc:
            log.error("removing delivered recordings failed", error=str(exc))
        else:
            for path in removed:
                log.info("recording removed after delivery", file=path.name)
        await asyncio.sleep(TIDY_EVERY_S)


class FrameSource(Protocol):
    """The UVC grabber (drivers.frame_grabber) or the simulator (firmware_sim.ultrasound)."""

    frame_rate_hz: float

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def capture(self) -> GrayFrame: ...


class UltrasoundError(RuntimeError):
    """A recording or sweep request cannot be honoured (``reason`` is the reply code)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class UltrasoundSection:
    source: str = "simulated"
    """``simulated`` (the phantom rendered in the daemon from its measured pose), the grabber's
    video device, or a grabber's stream URL (``http://…``: e.g. ``medge sim ultrasound``)."""
    resolution: tuple[int, int] = (1920, 1080)
    """What the grabber digitises (the ultrasound machine's video output)."""
    crop: tuple[int, int, int, int] | None = None
    """Image area inside the grabbed frame: left, top, width, height (px)."""
    frame_rate_hz: float = field(default=30.0, metadata=bounds(min=1.0, max=120.0))
    capture_latency_s: float = field(default=0.0, metadata=bounds(min=0.0, max=1.0))
    """Grabber + scanner delay, subtracted from the read time to get the capture time."""
    depth_m: float = field(default=0.08, metadata=bounds(min=0.01, max=0.5))
    """Imaging depth shown over the image's rows (gives the pixel spacing)."""
    jpeg_quality: int = field(default=85, metadata=bounds(min=10, max=100))
    live_rate_hz: float = field(default=10.0, metadata=bounds(min=0.0, max=60.0))
    """Live view frames per second over MQTT; 0 turns the live view off."""
    max_recording_s: float = field(default=600.0, metadata=bounds(min=1.0, max=3600.0))
    pacs_file: Path | None = None
    """PACS destinations and spool (medge.pacs.config.PacsConfig); none: files only."""
    pacs_destination: str = ""
    keep_delivered_days: float = field(default=7.0, metadata=bounds(min=0, max=3650))
    """Days a recording stays on the box once the PACS confirmed it (then it is removed, or
    the disk fills and recording stops). Without ``pacs_file`` recordings are never removed."""
    patient_id: str = "anonymous"
    accession_number: str = "none"
    surface_z_m: float = -0.22
    """Surface height used by sweeps when no registered surface is available."""
    sweeps: dict[str, SweepSpec] = field(default_factory=lambda: {
        "linear-x": SweepSpec(),
        "fan-a": SweepSpec(kind="fan", start=(0.0, 0.0), fan_rad=0.25)})

    def __post_init__(self) -> None:
        if self.pacs_file is not None and not self.pacs_destination:
            raise ValueError("pacs_destination is required with pacs_file")


@dataclass(frozen=True)
class PoseSample:
    at: float
    pose: ProbePose
    force_n: float | None


class PoseTrack:
    """Recent (time, pose, force) samples of the control loop, interpolated to any time."""

    def __init__(self, max_hold_s: float = 0.05) -> None:
        self.samples: collections.deque[PoseSample] = collections.deque(maxlen=POSE_HISTORY)
        self.max_hold_s = max_hold_s

    def add(self, sample: PoseSample) -> None:
        if self.samples and sample.at <= self.samples[-1].at:
            return  # never out of order: interpolation needs increasing times
        self.samples.append(sample)

    def at(self, when: float) -> PoseSample | None:
        """Linear interpolation; the latest sample up to ``max_hold_s`` past it; else None."""
        samples = self.samples
        if not samples or when < samples[0].at:
            return None
        if when >= samples[-1].at:
            last = samples[-1]
            return PoseSample(when, last.pose, last.force_n) \
                if when - last.at <= self.max_hold_s else None
        index = bisect.bisect_right([s.at for s in samples], when)
        before, after = samples[index - 1], samples[index]
        weight = (when - before.at) / (after.at - before.at)
        pose = ProbePose(*(a + (b - a) * weight
                           for a, b in zip(before.pose, after.pose, strict=True)))
        force = None if before.force_n is None or after.force_n is None \
            else before.force_n + (after.force_n - before.force_n) * weight
        return PoseSample(when, pose, force)


def follow_loop(loop: ControlLoop, kinematics: HolderKinematics, track: PoseTrack) -> None:
    """Feed ``track`` with every cycle's *measured* pose and force."""
    def on_cycle(output: CycleOutput, states: Sequence[ServoState]) -> None:
        joints = kinematics.servo_to_joints([s.position_rad for s in states])
        track.add(PoseSample(loop.clock(), kinematics.forward(joints), output.status.force_n))
    loop.listeners.append(on_cycle)


@dataclass(frozen=True)
class StampedFrame:
    jpeg: bytes
    rows: int
    columns: int
    captured_at: float
    """Monotonic seconds."""
    captured_wall: float
    """Epoch seconds (for the live view's age across machines)."""
    pose: PoseSample | None


@dataclass
class Recording:
    recording_id: str
    label: str
    frames: list[StampedFrame] = field(default_factory=list)
    skipped_unposed: int = 0
    """Frames without a pose (before the control loop ran): not recorded."""


class UltrasoundService:
    """Capture loop + recorder + live view + sweeps for one probe."""

    def __init__(self, section: UltrasoundSection, source: FrameSource, track: PoseTrack, *,
                 output_dir: Path, publish: Publish | None = None, live_topic: str = "",
                 deliver: Callable[[Path], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.section = section
        self.source = source
        self.track = track
        self.output_dir = output_dir
        self.publish = publish
        self.live_topic = live_topic
        self.deliver = deliver
        self.clock = clock
        self.frames = 0
        self.dropped = 0
        """Frame slots the source skipped (gaps in capture time over 1.5 periods)."""
        self.live_sent = 0
        self.source_errors = 0
        """Capture failures (each followed by reopening the source)."""
        self.recording: Recording | None = None
        self.last_recording: Recording | None = None
        """The recording stopped last (its frame and skipped counts for the stop reply)."""
        self.written: collections.deque[Path] = collections.deque(maxlen=RECENT_RECORDINGS)
        """The newest recordings (for ``list``): a box that records for years holds no more."""
        self.sweep: SweepRun | None = None
        self.latest: StampedFrame | None = None
        self._frame_event = asyncio.Event()
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="us-encode",
                                           initializer=lower_thread_priority,
                                           initargs=(CAPTURE_THREAD_NICE,))
        self._last_capture: float | None = None
        self._next_live = 0.0
        self._counter = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        if self.sweep is not None and self.sweep.running:
            self.sweep.abort("daemon_stopping")
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._encoder.shutdown(wait=True)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("ultrasound task failed", error=repr(task.exception()))

    # --- capture ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Capture until cancelled; after a frame source error the source is reopened.

        Reading and encoding are pipelined: the read of the next frame never waits for the
        encoding of the last one (a grabber that is not read in time drops frames). Up to a
        second of frames may wait for the encoder; beyond that they are counted as dropped.
        """
        backlog: asyncio.Queue[tuple[GrayFrame, float]] = asyncio.Queue(
            max(1, round(self.source.frame_rate_hz)))
        consumer = asyncio.create_task(self._consume(backlog), name="ultrasound-encode")
        try:
            while True:
                try:
                    image = await self.source.capture()
                except (OSError, ValueError) as exc:
                    log.error("ultrasound capture failed; reopening the source", error=str(exc))
                    self.source_errors += 1
                    await self._reopen()
                    continue
                try:
                    backlog.put_nowait((image, self.clock() - self.section.capture_latency_s))
                except asyncio.QueueFull:
                    self.dropped += 1
        finally:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer

    async def _reopen(self) -> None:
        """An unplugged grabber or an ended stream does not come back by reading again: close
        the source and open it anew, once a second until it opens."""
        await self.source.close()
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.source.open()
                return
            except (OSError, ValueError) as exc:
                log.warning("ultrasound source does not open", error=str(exc))

    async def _consume(self, backlog: asyncio.Queue[tuple[GrayFrame, float]]) -> None:
        while True:
            image, captured_at = await backlog.get()
            await self.accept(image, captured_at)

    async def accept(self, image: GrayFrame, captured_at: float) -> StampedFrame:
        """Stamp, encode, record and maybe publish one frame."""
        period = 1.0 / self.source.frame_rate_hz
        if self._last_capture is not None and captured_at - self._last_capture > 1.5 * period:
            self.dropped += round((captured_at - self._last_capture) / period) - 1
        self._last_capture = captured_at
        wall = time.time() - (self.clock() - captured_at)
        jpeg = await asyncio.get_running_loop().run_in_executor(
            self._encoder, _encode, image, self.section.jpeg_quality)
        frame = StampedFrame(jpeg, image.shape[0], image.shape[1], captured_at, wall,
                             self.track.at(captured_at))
        self.frames += 1
        self.latest = frame
        self._frame_event.set()
        self._frame_event = asyncio.Event()
        recording = self.recording
        if recording is not None:
            if frame.pose is None:
                recording.skipped_unposed += 1
            else:
                recording.frames.append(frame)
                if len(recording.frames) >= min(us_dicom.MAX_FRAMES, self.section.max_recording_s
                                                * self.source.frame_rate_hz):
                    await self.stop_recording()
        await self._live(frame)
        return frame

    async def next_frame(self, timeout: float = 5.0) -> StampedFrame:
        async with asyncio.timeout(timeout):
            await self._frame_event.wait()
        assert self.latest is not None
        return self.latest

    async def _live(self, frame: StampedFrame) -> None:
        rate = self.section.live_rate_hz
        if self.publish is None or rate <= 0 or frame.captured_at < self._next_live:
            return
        period = 1.0 / rate  # on average ``rate`` a second, whatever the frame rate
        self._next_live = max(self._next_live, frame.captured_at - period / 2) + period
        self.live_sent += 1
        payload = live_payload(frame, self.live_sent,
                               self.recording.recording_id if self.recording else None)
        with contextlib.suppress(Exception):  # the live view is best effort, never in the way
            await self.publish(self.live_topic, payload)

    # --- recording -------------------------------------------------------------------------

    def start_recording(self, label: str = "manual") -> str:
        if self.recording is not None:
            raise UltrasoundError("already_recording",
                                  f"recording {self.recording.recording_id} is running")
        self._counter += 1
        recording_id = time.strftime("%Y%m%dT%H%M%S") + f"-{self._counter}"
        self.recording = Recording(recording_id, label)
        log.info("recording started", recording=recording_id, label=label)
        return recording_id

    async def stop_recording(self) -> Path:
        """End the recording: DICOM written, validated by construction, handed to the spool."""
        recording, self.recording = self.recording, None
        if recording is None:
            raise UltrasoundError("not_recording", "no recording is running")
        self.last_recording = recording
        if not recording.frames:
            raise UltrasoundError("empty_recording",
                                  f"recording {recording.recording_id} captured no posed frame")
        path = await asyncio.get_running_loop().run_in_executor(
            self._encoder, self._write, recording)
        self.written.append(path)
        log.info("recording written", recording=recording.recording_id, path=str(path),
                 frames=len(recording.frames))
        if self.deliver is not None:
            self.deliver(path)
        return path

    def _write(self, recording: Recording) -> Path:
        frames = recording.frames
        first = frames[0]
        records = []
        for frame in frames:
            assert frame.pose is not None
            pose = frame.pose.pose
            records.append(us_dicom.FrameRecord(frame.captured_at, pose.tip,
                                                (pose.tilt_a, pose.tilt_b), frame.pose.force_n))
        geometry = us_dicom.ImageGeometry(first.rows, first.columns,
                                          self.section.depth_m * 1000.0 / first.rows)
        exam = us_dicom.Exam(self.section.patient_id, self.section.accession_number,
                             series_description=f"{recording.label} {recording.recording_id}")
        return us_dicom.write_cine(exam, [f.jpeg for f in frames], records, geometry,
                                   self.output_dir)

    # --- sweeps ----------------------------------------------------------------------------

    def start_sweep(self, name: str, loop: ControlLoop, surface: Surface) -> SweepRun:
        spec = self.section.sweeps.get(name)
        if spec is None:
            raise UltrasoundError("unknown_sweep", f"no sweep {name!r} (known: "
                                                   f"{', '.join(sorted(self.section.sweeps))})")
        if self.sweep is not None and self.sweep.running:
            raise UltrasoundError("sweep_running", f"sweep {self.sweep.name} is running")
        run = SweepRun(name, spec, loop, surface)
        run.start()
        self.sweep = run
        if self.recording is None:
            self.start_recording(f"sweep {name}")
            task = asyncio.get_running_loop().create_task(self._stop_with(run))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        return run

    async def _stop_with(self, run: SweepRun) -> None:
        """A sweep's recording ends with the sweep (completed, stopped or aborted)."""
        await run.finished()
        if self.recording is not None and self.recording.label == f"sweep {run.name}":
            with contextlib.suppress(UltrasoundError):
                await self.stop_recording()

    def listing(self) -> dict[str, Any]:
        return {"sweeps": {name: {"kind": spec.kind, "length": spec.length}
                           for name, spec in sorted(self.section.sweeps.items())},
                "sweep": self.sweep.summary() if self.sweep else None,
                "recording": self.recording.recording_id if self.recording else None,
                "written": [p.name for p in self.written],
                "frames": self.frames, "dropped": self.dropped,
                "source_errors": self.source_errors}


def _encode(image: GrayFrame, quality: int) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise UltrasoundError("encode_failed", "JPEG encoding failed")
    return bytes(buffer)


def live_payload(frame: StampedFrame, seq: int, recording: str | None) -> bytes:
    now = time.time()
    pose = frame.pose
    header = {
        "v": LIVE_VERSION, "seq": seq, "captured_at": round(frame.captured_wall, 4),
        "published_at": round(now, 4),
        "age_ms": round((now - frame.captured_wall) * 1000.0, 2),
        "width": frame.columns, "height": frame.rows, "recording": recording,
        "pose": None if pose is None else {"tip": [round(c, 6) for c in pose.pose.tip],
                                           "tilt": [round(pose.pose.tilt_a, 6),
                                                    round(pose.pose.tilt_b, 6)]},
        "force_n": None if pose is None or pose.force_n is None else round(pose.force_n, 3),
    }
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + frame.jpeg


def parse_live(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Header and JPEG of a live-view message (for the console and tests)."""
    head, sep, jpeg = payload.partition(b"\n")
    if not sep:
        raise ValueError("live-view payload has no header line")
    header = json.loads(head)
    if not isinstance(header, dict) or header.get("v") != LIVE_VERSION:
        raise ValueError(f"live-view header is not version {LIVE_VERSION}")
    return header, jpeg


def age_ms(header: dict[str, Any], now: float | None = None) -> float:
    """The frame's age now, as the console shows it."""
    now = time.time() if now is None else now
    return float(header["age_ms"]) + max(0.0, now - float(header["published_at"])) * 1000.0




# --- the manipulator daemon's hook ------------------------------------------------------------

US_COMMANDS = frozenset({"list", "record_start", "record_stop", "sweep_start", "sweep_pause",
                         "sweep_resume", "sweep_abort", "take_over", "hand_back"})


def make_source(section: UltrasoundSection, track: PoseTrack) -> FrameSource:
    """The grabber, or the phantom seen from the daemon's own measured probe pose and force."""
    if section.source != "simulated":
        return FrameGrabber(section.source, resolution=section.resolution,
                            crop=Crop(*section.crop) if section.crop else None,
                            frame_rate_hz=section.frame_rate_hz,
                            thread_nice=CAPTURE_THREAD_NICE)
    from firmware_sim.ultrasound import ImageGeometry, ProbeState, SimulatedUltrasound

    def probe() -> ProbeState:
        latest = track.samples[-1] if track.samples else None
        if latest is None:
            return (0.0, 0.0, 0.0), (0.0, 0.0, -1.0), 0.0
        return latest.pose.tip, latest.pose.axis, latest.force_n or 0.0
    width, height = section.crop[2:] if section.crop else section.resolution
    return SimulatedUltrasound(probe, frame_rate_hz=section.frame_rate_hz,
                               geometry=ImageGeometry(width, height, depth_m=section.depth_m))


async def attach(daemon: ManipulatorDaemon, section: UltrasoundSection,
                 source: FrameSource | None = None) -> UltrasoundService:
    """Start the ultrasound service inside a started manipulator daemon (its ``[ultrasound]``).

    Capture and delivery run as daemon tasks (cancelled by its stop), the source and the
    service close with its exit stack, requests arrive on ``cmd/{operator}/us``.
    """
    loop = daemon.control
    track = PoseTrack()
    follow_loop(loop, daemon.kinematics, track)
    source = source or make_source(section, track)
    await source.open()
    daemon._stack.push_async_callback(source.close)
    deliver = None
    output_dir = daemon.cfg.node.state_dir / "ultrasound"
    if section.pacs_file is not None:
        deliver = _start_delivery(daemon, section.pacs_file, section.pacs_destination, output_dir)
        daemon._spawn(tidy_recordings(output_dir, section.keep_delivered_days), "ultrasound-tidy")
    service = UltrasoundService(
        section, source, track, output_dir=output_dir,
        publish=lambda topic, payload: daemon.rt.link.publish(topic, payload, qos=0),
        live_topic=f"{daemon.topics.state}/us", deliver=deliver, clock=daemon.clock)
    daemon._stack.push_async_callback(service.close)
    daemon._spawn(service.run(), "ultrasound-capture")
    requests = UsRequests(daemon, service)
    daemon.rt.link.subscribe(f"{daemon.topics.prefix}/cmd/+/us", requests.on_message, qos=1)
    return service


def _start_delivery(daemon: ManipulatorDaemon, pacs_file: Path, destination: str,
                    output_dir: Path) -> Callable[[Path], None]:
    """Recordings of ``output_dir`` go through the spool; confirmed ones move to delivered/."""
    from medge.config import load
    from medge.pacs.config import PacsConfig
    from medge.pacs.delivery import SpoolDelivery
    from medge.pacs.spool import Spool

    pacs = load(pacs_file, PacsConfig)
    pacs.destination(destination)  # fails at start, naming the known ones, not at first send
    delivery = SpoolDelivery(Spool(pacs.spool_dir), pacs.destinations, pacs.retry,
                             on_progress=functools.partial(mark_delivered, output_dir))
    daemon._spawn(delivery.run(asyncio.Event(), idle_s=5.0), "ultrasound-pacs-delivery")

    def deliver(path: Path) -> None:
        delivery.spool.enqueue([path], destination)
        delivery.wake()
    return deliver


class UsRequests:
    """MQTT 5 request/response for the ultrasound commands (docs/ultrasound.md)."""

    def __init__(self, daemon: ManipulatorDaemon, service: UltrasoundService) -> None:
        self.daemon = daemon
        self.service = service

    async def on_message(self, message: aiomqtt.Message) -> None:
        properties = message.properties
        response_topic = getattr(properties, "ResponseTopic", None)
        correlation = getattr(properties, "CorrelationData", None)
        topic = message.topic.value
        prefix = f"{self.daemon.topics.prefix}/cmd/"
        operator = topic.removeprefix(prefix).removesuffix("/us")
        try:
            proto.check_level("operator", operator)
            if response_topic is not None:
                self.daemon.topics.check_response_topic(operator, response_topic)
        except proto.ProtocolError:
            self.daemon.rejected["bad_us_request"] += 1
            return  # never answer onto a foreign topic
        try:
            command, args = decode_us_request(message.payload, operator)
            reply = await self.execute(command, args, operator)
        except proto.ProtocolError as exc:
            reply = proto.Reply("?", False, exc.code, {"field": exc.field, "error": exc.reason})
        except (UltrasoundError, SweepError) as exc:
            reply = proto.Reply(command, False, exc.reason, {"error": str(exc)})
        await self.daemon._reply(response_topic, correlation, reply)

    async def execute(self, command: str, args: dict[str, Any], operator: str) -> proto.Reply:
        service = self.service
        if command == "list":
            return proto.Reply(command, True, "ok", service.listing())
        if command == "record_start":
            label = args.get("label", "manual")
            if not isinstance(label, str) or len(label) > 64:
                raise proto.ProtocolError("args.label", "must be a string of at most 64",
                                          "bad_argument")
            return proto.Reply(command, True, "ok", {"recording": service.start_recording(label)})
        if command == "record_stop":
            path = await service.stop_recording()
            stopped = service.last_recording
            assert stopped is not None
            return proto.Reply(command, True, "ok", {
                "file": path.name, "frames": len(stopped.frames),
                "skipped_unposed": stopped.skipped_unposed})
        if command == "sweep_start":
            name = args.get("name")
            if not isinstance(name, str):
                raise proto.ProtocolError("args.name", "must be a sweep name", "bad_argument")
            run = service.start_sweep(name, self.daemon.control, await self._surface())
            return proto.Reply(command, True, "ok", run.summary())
        current = service.sweep
        if current is None or not current.running:
            raise UltrasoundError("no_sweep", "no sweep is running")
        run = current
        if command == "sweep_pause":
            run.pause()
        elif command == "sweep_resume":
            run.resume()
        elif command == "sweep_abort":
            run.abort("aborted")
        elif command == "take_over":
            run.take_over(operator)
        else:
            run.hand_back(operator)
        return proto.Reply(command, True, "ok", run.summary())

    async def _surface(self) -> Surface:
        section = self.service.section
        registration = self.daemon.registration
        if registration is not None and registration.state == "ok":
            try:
                return Surface(await registration.surface(2000), section.surface_z_m)
            except RegistrationError as exc:
                log.warning("no registered surface; sweeping over the configured height",
                            error=str(exc))
        return Surface((), section.surface_z_m)


def decode_us_request(payload: object, operator: str) -> tuple[str, dict[str, Any]]:
    """The teleoperation request envelope (docs/teleop.md) with an ultrasound command."""
    if not isinstance(payload, bytes | bytearray):
        raise proto.ProtocolError("payload", "not bytes")
    document = proto._document(bytes(payload), proto.MAX_REQUEST_BYTES)
    proto._only_keys(document, {"v", "operator", "cmd", "args"})
    proto._operator(document, operator)
    command = document.get("cmd")
    if command not in US_COMMANDS:
        raise proto.ProtocolError("cmd", f"unknown command {command!r}; expected one of "
                                         f"{sorted(US_COMMANDS)}", "unknown_command")
    args = document.get("args", {})
    if not isinstance(args, dict):
        raise proto.ProtocolError("args", "must be an object")
    return str(command), args

