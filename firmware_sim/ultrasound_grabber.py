"""``medge sim ultrasound``: the ultrasound machine's video behind a grabber, as MJPEG over HTTP.

A real UVC frame grabber is a separate device: it hands the host finished frames and costs it
no rendering. This simulator is a separate process in the same way. It renders the phantom from
the probe pose at the grabber's frame rate with :func:`firmware_sim.ultrasound.render_bmode`
(the one implementation, shared with the in-process source), JPEG-encodes each frame once and
serves the stream as ``multipart/x-mixed-replace`` over HTTP — the way network grabbers
(ustreamer, mjpg-streamer, video encoders) serve a capture card — so the daemon reads it with
the same ``cv2.VideoCapture.read()`` as a UVC device, through OpenCV's FFmpeg backend
(``source = "http://HOST:PORT/stream.mjpg"``).

Like a capture device it has one reader at a time (:class:`~firmware_sim.link.SimulatorServer`)
and does not queue for a slow one: a frame slot that comes while the previous frame is still
being written is skipped (``skipped_reader``), as a grabber overwrites the buffers the host did
not dequeue; slots missed because rendering overran are counted as ``skipped_late``. The
line faults of ``medge sim`` (drop, corrupt, stall, disconnect) apply to the stream's bytes.

The probe pose comes from ``--pose-topic mqtt://HOST:PORT/TOPIC``: the manipulator's state
messages (its measured tip, tilt and force at the state rate, 50 Hz by default), as the
in-process ``source = "simulated"`` uses the daemon's measured pose. Without it the probe rests
on the phantom and slides slowly from side to side (a standalone stream). Frames are cached by
pose quantised to ``POSE_QUANTUM_M`` / ``AXIS_QUANTUM`` / ``FORCE_QUANTUM_N`` (the speckle is a
function of position, so a resting probe shows the same image): it is a simulator, and a resting
probe then costs no rendering. ``--cache-frames 0`` renders every frame.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

import aiomqtt
import cv2

from firmware_sim.link import DeviceLink, Handler, HostDisconnected, SimulatorServer
from firmware_sim.probe_world import axis_of
from firmware_sim.ultrasound import (
    ImageGeometry,
    Phantom,
    ProbeState,
    UltrasoundSimError,
    render_bmode,
)

HELP = ("ultrasound machine behind a frame grabber: B-mode frames of the phantom from the probe "
        "pose, served as an MJPEG stream over HTTP (read with cv2.VideoCapture)")

STREAM_PATH = "/stream.mjpg"
BOUNDARY = "medgeframe"
MAX_REQUEST_BYTES = 8192
POSE_QUANTUM_M = 0.0001
AXIS_QUANTUM = 0.001
FORCE_QUANTUM_N = 0.05
RESTING: ProbeState = ((0.0, 0.0, 0.0), (0.0, 0.0, -1.0), 0.0)
"""Before the first pose message: no contact, a dark frame."""


@dataclass
class StreamStats:
    slots: int = 0
    """Frame periods elapsed while a reader was connected."""
    sent: int = 0
    skipped_reader: int = 0
    """Slots skipped because the reader had not taken the previous frame yet."""
    skipped_late: int = 0
    """Slots missed because the simulator fell behind (rendering, or no CPU in time)."""
    rendered: int = 0
    cached: int = 0
    """Frames served from the pose cache."""
    readers: int = 0


class FrameStream:
    """Renders ``probe()`` at ``frame_rate_hz`` and streams it to one HTTP reader at a time."""

    def __init__(self, probe: Callable[[], ProbeState], *, frame_rate_hz: float = 30.0,
                 geometry: ImageGeometry | None = None, phantom: Phantom | None = None,
                 jpeg_quality: int = 90, cache_frames: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < frame_rate_hz <= 240:
            raise UltrasoundSimError(f"frame_rate_hz {frame_rate_hz} is outside (0, 240]")
        if not 10 <= jpeg_quality <= 100:
            raise UltrasoundSimError(f"jpeg_quality {jpeg_quality} is outside 10..100")
        if cache_frames < 0:
            raise UltrasoundSimError(f"cache_frames {cache_frames} must be >= 0")
        self.probe = probe
        self.frame_rate_hz = frame_rate_hz
        self.geometry = geometry or ImageGeometry()
        self.phantom = phantom or Phantom()
        self.jpeg_quality = jpeg_quality
        self.cache_frames = cache_frames
        self.clock = clock
        self.stats = StreamStats()
        self._cache: collections.OrderedDict[tuple[int, ...], bytes] = collections.OrderedDict()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="ultrasound-grabber")

    async def __aenter__(self) -> FrameStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._worker.shutdown(wait=True)  # at most one render (milliseconds) is in flight

    # --- one reader ------------------------------------------------------------------------

    async def serve(self, link: DeviceLink) -> None:
        """One HTTP connection: ``GET /stream.mjpg`` streams until the reader goes away."""
        try:
            path = await _request_path(link)
        except (HostDisconnected, ValueError):
            return
        if path != STREAM_PATH:
            body = f"no stream at {path}; the stream is {STREAM_PATH}\n".encode()
            with contextlib.suppress(HostDisconnected):
                await link.write(b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                                 + body)
            return
        self.stats.readers += 1
        await link.write(f"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; "
                         f"boundary={BOUNDARY}\r\nCache-Control: no-store\r\n"
                         f"Connection: close\r\n\r\n".encode())
        streamer = asyncio.create_task(self._stream(link), name="ultrasound-grabber-stream")
        gone = asyncio.create_task(_until_closed(link), name="ultrasound-grabber-reader")
        try:
            await asyncio.wait({streamer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streamer, gone):
                task.cancel()
            for task in (streamer, gone):
                with contextlib.suppress(asyncio.CancelledError, HostDisconnected):
                    await task

    async def _stream(self, link: DeviceLink) -> None:
        period = 1.0 / self.frame_rate_hz
        next_at = self.clock()
        sending: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(max(0.0, next_at - self.clock()))
                late = math.floor((self.clock() - next_at) / period)
                if late > 0:  # we fell behind: those slots passed without a frame
                    self.stats.slots += late
                    self.stats.skipped_late += late
                    next_at += late * period
                next_at += period
                self.stats.slots += 1
                if sending is not None:
                    if not sending.done():
                        self.stats.skipped_reader += 1
                        continue
                    sending.result()  # HostDisconnected ends the session
                seq = self.stats.sent + 1
                jpeg = await asyncio.get_running_loop().run_in_executor(
                    self._worker, self.frame, self.probe())
                part = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: "
                        f"{len(jpeg)}\r\nX-Frame-Seq: {seq}\r\n\r\n").encode() + jpeg + b"\r\n"
                sending = asyncio.create_task(link.write(part))
                self.stats.sent = seq
        finally:
            if sending is not None:
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError, HostDisconnected):
                    await sending

    def frame(self, probe: ProbeState) -> bytes:
        """The JPEG for a probe state (worker thread): from the cache, or rendered."""
        tip, axis, force = probe
        key = (*(round(c / POSE_QUANTUM_M) for c in tip), *(round(c / AXIS_QUANTUM) for c in axis),
               round(force / FORCE_QUANTUM_N))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self.stats.cached += 1
            return cached
        image = render_bmode(self.phantom, self.geometry, tip, axis, force)
        ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise UltrasoundSimError("JPEG encoding failed")
        jpeg = bytes(buffer)
        self.stats.rendered += 1
        if self.cache_frames:
            self._cache[key] = jpeg
            if len(self._cache) > self.cache_frames:
                self._cache.popitem(last=False)
        return jpeg


async def _request_path(link: DeviceLink) -> str:
    """The path of the reader's ``GET`` request (its headers are read and ignored)."""
    request = b""
    while b"\r\n\r\n" not in request:
        request += await link.read()
        if len(request) > MAX_REQUEST_BYTES:
            raise ValueError("HTTP request head too large")
    method, _, rest = request.partition(b"\r\n")[0].decode("latin-1").partition(" ")
    if method != "GET":
        raise ValueError(f"HTTP method {method!r}")
    return urlparse(rest.partition(" ")[0]).path


async def _until_closed(link: DeviceLink) -> None:
    """Returns when the reader closes the connection (it sends nothing after its request)."""
    with contextlib.suppress(HostDisconnected):
        while True:
            await link.read()


# --- the probe pose ---------------------------------------------------------------------------

class PoseFollower:
    """The latest probe state from the manipulator's ``state`` messages over MQTT."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        topic = parsed.path.lstrip("/")
        if parsed.scheme != "mqtt" or not parsed.hostname or not topic:
            raise UltrasoundSimError(f"--pose-topic {url!r}: expected mqtt://HOST:PORT/TOPIC")
        self.host, self.port, self.topic = parsed.hostname, parsed.port or 1883, topic
        self.latest: ProbeState = RESTING
        self.messages = 0

    def __call__(self) -> ProbeState:
        return self.latest

    def update(self, payload: bytes) -> None:
        """Take pose and force from one state message; anything else is ignored."""
        try:
            state: Any = json.loads(payload)
            tip = tuple(float(c) for c in state["pose"]["tip"])
            tilt_a, tilt_b = (float(c) for c in state["pose"]["tilt"])
            force = state.get("force_n")
        except (ValueError, KeyError, TypeError):
            return
        if len(tip) != 3:
            return
        self.latest = ((tip[0], tip[1], tip[2]), axis_of(tilt_a, tilt_b),
                       float(force) if isinstance(force, int | float) else 0.0)
        self.messages += 1

    async def run(self) -> None:
        """Follow the topic until cancelled; reconnect every second while the broker is away."""
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port) as client:
                    await client.subscribe(self.topic, qos=0)
                    async for message in client.messages:
                        if isinstance(message.payload, bytes):
                            self.update(message.payload)
            except aiomqtt.MqttError:
                await asyncio.sleep(1.0)


def standalone_probe(phantom: Phantom, clock: Callable[[], float] = time.monotonic,
                     period_s: float = 10.0) -> Callable[[], ProbeState]:
    """The probe resting 3 mm into the phantom's skin, sliding ±2 cm along X."""
    surface = phantom.surface

    def state() -> ProbeState:
        x = 0.02 * math.sin(2 * math.pi * clock() / period_s)
        skin = surface.top_z_m - surface.radius_m + math.sqrt(surface.radius_m ** 2 - x * x)
        return (x, 0.0, skin - 0.003), (0.0, 0.0, -1.0), 4.5
    return state


# --- medge sim ultrasound ---------------------------------------------------------------------

def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.partition("x")
    try:
        if sep:
            return int(width), int(height)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 800x600")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=_size, default=(800, 600), metavar="WxH",
                        help="frame size in pixels (default 800x600)")
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate (default 30)")
    parser.add_argument("--depth", type=float, default=0.08, metavar="M",
                        help="imaging depth over the rows, metres (default 0.08)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="(default 90)")
    parser.add_argument("--cache-frames", type=int, default=256, metavar="N",
                        help="frames cached by probe pose; 0 renders every frame (default 256)")
    parser.add_argument("--pose-topic", metavar="mqtt://HOST:PORT/TOPIC",
                        help="follow the manipulator's state topic for the probe pose and force "
                             "(default: a standalone probe sliding on the phantom)")


def create(args: argparse.Namespace) -> Handler:
    if args.pty:
        raise SystemExit("medge sim ultrasound serves HTTP: use --listen tcp://HOST:PORT")
    phantom = Phantom()
    try:
        follower = PoseFollower(args.pose_topic) if args.pose_topic else None
        stream = FrameStream(follower or standalone_probe(phantom), frame_rate_hz=args.fps,
                             geometry=ImageGeometry(args.size[0], args.size[1], args.depth),
                             phantom=phantom, jpeg_quality=args.jpeg_quality,
                             cache_frames=args.cache_frames)
    except UltrasoundSimError as exc:
        raise SystemExit(f"medge sim ultrasound: {exc}") from None
    args.frame_stream, args.pose_follower = stream, follower
    return stream.serve


async def background(args: argparse.Namespace, server: SimulatorServer) -> None:
    """Prints the stream's URL; follows the pose topic; prints the counters (``stats: {...}``)
    on SIGUSR1 and when stopped."""
    stream: FrameStream = args.frame_stream
    follower: PoseFollower | None = args.pose_follower

    def print_stats() -> None:
        counters = asdict(stream.stats) | {"pose_messages": follower.messages if follower else 0}
        print(f"stats: {json.dumps(counters)}", flush=True)
    print(f"stream: {server.address.replace('socket://', 'http://')}{STREAM_PATH}", flush=True)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, print_stats)
    try:
        if follower is None:
            await asyncio.Event().wait()
        else:
            await follower.run()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        print_stats()
