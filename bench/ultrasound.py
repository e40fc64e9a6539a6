"""bench/ultrasound: sustained recording rate and live-view capture-to-delivery latency.

* **recording**: a grabber stand-in delivers 800x600 phantom frames (pre-rendered, so the
  renderer's own cost does not count against the pipeline) at 30 fps on absolute deadlines,
  like a UVC stream, into the ultrasound service with a recording running and the pose track
  fed at 100 Hz; reports frames captured, dropped (gaps in capture time or encoder backlog
  full), achieved fps and the time to write the DICOM cine at the end;
* **throughput**: pre-rendered 800x600 frames pushed as fast as the service takes them
  (stamp + JPEG + record): the headroom above the grabber's rate;
* **live view**: with mosquitto on loopback, the time from a frame's capture to its arrival
  at a subscriber (the JPEG + header message on ``state/us``), p50/p99/max, at 10 fps;
* **DICOM write**: the longest event-loop stall while the encoder thread writes a 300- and a
  3000-frame cine, streamed (the daemon's way) and built in memory first;
* **live simulator process**: the whole robot as deployed, each part its own process — the
  Dynamixel bus and load cell (``medge sim dynamixel``), the grabber (``medge sim ultrasound``:
  800x600 B-mode rendered from the robot's state topic, served as MJPEG over HTTP) and the
  manipulator daemon (``medge run manipulator``: control loop at 100 Hz, state at 50 Hz, live
  view at 10 fps, reading the stream by URL with cv2.VideoCapture). A recording runs for
  ``--seconds`` while a slow sweep moves the probe over the phantom; frames, dropped frames and
  the achieved rate come from the daemon's DICOM (its Frame Time Vector) and counters, CPU from
  /proc for each process. Run twice: the simulator rendering every frame, and with its pose
  cache.

Run: ``.venv/bin/python -m bench.ultrasound [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import aiomqtt
import cv2
import numpy as np

from bench.gateway import cpu_seconds
from daemons.manipulator import us_dicom
from daemons.manipulator.kinematics import ProbePose
from daemons.manipulator.ultrasound import (
    FrameSource,
    PoseSample,
    PoseTrack,
    UltrasoundSection,
    UltrasoundService,
    parse_live,
)
from firmware_sim.ultrasound import ImageGeometry, Phantom, SimulatedUltrasound, render_bmode
from firmware_sim.ultrasound_grabber import FrameStream
from medge.localbroker import Mosquitto
from medge.teleop import Broker, RobotTopics, TeleopClient
from medge.uscli import UsTopics, us_request
from tests.us_grabber import MEDGE, GrabberProcess, grabber_process

WIDTH, HEIGHT, FPS = 800, 600, 30.0
SKIN = -0.2235


def _probe_at(clock_start: float) -> tuple[tuple[float, float, float], tuple[float, float, float],
                                           float]:
    x = 0.02 * np.sin(time.monotonic() - clock_start)
    return (float(x), 0.0, SKIN), (0.0, 0.0, -1.0), 4.5


async def _feed_track(track: PoseTrack, stop: asyncio.Event) -> None:
    start = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        x = 0.02 * float(np.sin(now - start))
        track.add(PoseSample(now, ProbePose(x, 0.0, SKIN, 0.0, 0.0), 4.5))
        await asyncio.sleep(0.01)


def _phantom_jpegs(count: int) -> list[bytes]:
    return [cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
            for frame in _phantom_frames(count)]


def _phantom_frames(count: int) -> list[np.ndarray]:
    return [render_bmode(Phantom(), ImageGeometry(WIDTH, HEIGHT), (0.001 * i, 0.0, SKIN),
                         (0.0, 0.0, -1.0), 4.5) for i in range(count)]


class PacedReplay:
    """A grabber stand-in: the given frames in turn, one per frame period."""

    def __init__(self, frames: list[np.ndarray], frame_rate_hz: float) -> None:
        self.frames = frames
        self.frame_rate_hz = frame_rate_hz
        self._next_at = 0.0
        self._index = 0

    async def open(self) -> None:
        self._next_at = time.monotonic()

    async def close(self) -> None: ...

    async def capture(self) -> np.ndarray:
        self._next_at += 1.0 / self.frame_rate_hz
        await asyncio.sleep(max(0.0, self._next_at - time.monotonic()))
        self._index += 1
        return self.frames[self._index % len(self.frames)]


async def _shut_down(stop: asyncio.Event, tasks: list[asyncio.Task[None]],
                     service: UltrasoundService, source: FrameSource) -> None:
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await service.close()
    await source.close()


async def recording(seconds: float, out: Path) -> dict[str, float]:
    source = PacedReplay(_phantom_frames(30), FPS)
    track, stop = PoseTrack(), asyncio.Event()
    service = UltrasoundService(UltrasoundSection(live_rate_hz=0.0), source, track,
                                output_dir=out)
    feeder = asyncio.create_task(_feed_track(track, stop))
    await source.open()
    await asyncio.sleep(0.05)
    capture = asyncio.create_task(service.run())
    try:
        service.start_recording("bench")
        began = time.monotonic()
        await asyncio.sleep(seconds)
        recorded = service.recording
        assert recorded is not None
        frames = len(recorded.frames)
        elapsed = time.monotonic() - began
        capture.cancel()
        written_at = time.monotonic()
        path = await service.stop_recording()
        write_s = time.monotonic() - written_at
    finally:
        await _shut_down(stop, [capture, feeder], service, source)
    return {"frames": frames, "fps": frames / elapsed, "dropped": service.dropped,
            "write_s": write_s, "mb": path.stat().st_size / 1e6}


async def throughput(frames: int, out: Path) -> float:
    images = _phantom_frames(8)
    track = PoseTrack(max_hold_s=3600.0)
    track.add(PoseSample(0.0, ProbePose(0.0, 0.0, SKIN, 0.0, 0.0), 4.5))

    class Unused:
        frame_rate_hz = 1e6

        async def open(self) -> None: ...
        async def close(self) -> None: ...
        async def capture(self) -> np.ndarray:
            raise NotImplementedError

    service = UltrasoundService(UltrasoundSection(live_rate_hz=0.0), Unused(), track,
                                output_dir=out)
    service.start_recording("throughput")
    began = time.perf_counter()
    for index in range(frames):
        await service.accept(images[index % len(images)], time.monotonic())
    rate = frames / (time.perf_counter() - began)
    service.recording = None
    await service.close()
    return rate


async def live_view(seconds: float, out: Path) -> list[float]:
    with tempfile.TemporaryDirectory() as broker_dir:
        broker = Mosquitto(Path(broker_dir))
        broker.start()
        try:
            return await _live_view(broker.port, seconds, out)
        finally:
            broker.stop()


async def _live_view(port: int, seconds: float, out: Path) -> list[float]:
    start = time.monotonic()
    source = SimulatedUltrasound(lambda: _probe_at(start), frame_rate_hz=FPS,
                                 geometry=ImageGeometry(WIDTH, HEIGHT))
    track, stop = PoseTrack(), asyncio.Event()
    latencies: list[float] = []
    async with aiomqtt.Client("127.0.0.1", port) as publisher, \
            aiomqtt.Client("127.0.0.1", port) as subscriber:
        await subscriber.subscribe("bench/state/us")

        async def publish(topic: str, payload: bytes) -> None:
            await publisher.publish(topic, payload, qos=0)

        service = UltrasoundService(UltrasoundSection(live_rate_hz=10.0), source, track,
                                    output_dir=out, publish=publish, live_topic="bench/state/us")
        feeder = asyncio.create_task(_feed_track(track, stop))
        await source.open()
        capture = asyncio.create_task(service.run())
        try:
            async with asyncio.timeout(seconds):
                async for message in subscriber.messages:
                    received = time.time()
                    assert isinstance(message.payload, bytes)
                    header, _ = parse_live(message.payload)
                    latencies.append((received - header["captured_at"]) * 1000.0)
        except TimeoutError:
            pass
        finally:
            await _shut_down(stop, [capture, feeder], service, source)
    return latencies


SITE, NODE, ROBOT = "bench-site", "us-cart", "probe-arm"
BENCH_SWEEP = "bench"


def render_ms(frames: int = 30) -> float:
    """The grabber simulator's own cost: render + JPEG per 800x600 frame, every one new."""
    stream = FrameStream(lambda: ((0.0, 0.0, SKIN), (0.0, 0.0, -1.0), 4.5),
                         geometry=ImageGeometry(WIDTH, HEIGHT), cache_frames=0)
    began = time.perf_counter()
    for index in range(frames):
        stream.frame(((0.0005 * index, 0.0, SKIN), (0.0, 0.0, -1.0), 4.5))
    elapsed = time.perf_counter() - began
    stream.close()
    return elapsed / frames * 1000.0


async def _line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    return (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()


def _config(work: Path, broker_port: int, bus: str, force: str, stream: str | None) -> Path:
    config = work / "manipulator.toml"
    text = (f'[node]\nsite = "{SITE}"\nnode = "{NODE}"\nstate_dir = "{work}/state"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\n'
            f'[manipulator]\nbus = "{bus}"\nforce_sensor = "{force}"\n')
    if stream is not None:
        text += (f'[manipulator.ultrasound]\nsource = "{stream}"\n'
                 f'resolution = [{WIDTH}, {HEIGHT}]\nframe_rate_hz = {FPS}\n'
                 f'live_rate_hz = 10.0\n'
                 f'[manipulator.ultrasound.sweeps.{BENCH_SWEEP}]\nstart = [-0.03, 0.0]\n'
                 f'end = [0.03, 0.0]\nspeed = 0.004\npress_m = 0.003\n')
    config.write_text(text)
    return config


def _log_file(path: Path) -> BinaryIO:
    return path.open("wb")


async def _start_sweep(client: TeleopClient, robot: TeleopClient) -> str:
    """The bench sweep; an E-stop latched meanwhile (a servo watchdog gap) is reset first."""
    reason = ""
    for _ in range(3):
        reply = await us_request(client, "sweep_start", {"name": BENCH_SWEEP})
        if reply.ok:
            return "started"
        reason = reply.reason
        await robot.reset()
    return f"refused ({reason})"


async def live_process(seconds: float, work: Path, cache_frames: int | None) -> dict[str, Any]:
    """The deployed robot, each part its own process (see the module); ``cache_frames`` None:
    the daemon without ultrasound (control loop alone, for comparison)."""
    broker = Mosquitto(work / "broker")
    broker.start()
    robot_sim = await asyncio.create_subprocess_exec(
        str(MEDGE), "sim", "dynamixel", "--listen", "tcp://127.0.0.1:0",
        "--force-listen", "tcp://127.0.0.1:0", stdout=asyncio.subprocess.PIPE)
    daemon: asyncio.subprocess.Process | None = None
    try:
        bus, force = await _line(robot_sim), (await _line(robot_sim)).removeprefix("force: ")
        topics = UsTopics(SITE, NODE, ROBOT)
        async with contextlib.AsyncExitStack() as stack:
            grabber = None if cache_frames is None else await stack.enter_async_context(
                grabber_process("--size", f"{WIDTH}x{HEIGHT}", "--fps", str(FPS),
                                "--cache-frames", str(cache_frames), "--pose-topic",
                                f"mqtt://127.0.0.1:{broker.port}/{topics.state}"))
            config = _config(work, broker.port, bus, force, grabber.url if grabber else None)
            with _log_file(work / "manipulator.log") as log:
                daemon = await asyncio.create_subprocess_exec(
                    str(MEDGE), "run", "manipulator", "--config", str(config),
                    stdout=log, stderr=log)
            broker_at = Broker(port=broker.port)
            client = await stack.enter_async_context(TeleopClient(broker_at, topics, "bench"))
            robot = await stack.enter_async_context(
                TeleopClient(broker_at, RobotTopics(SITE, NODE, ROBOT), "bench"))
            await robot.wait_state(lambda state: True, 60)  # the daemon is up
            await asyncio.sleep(1.0)  # past the start-up transient
            pids = {"daemon": daemon.pid, "robot_sim": robot_sim.pid}
            if grabber is not None:
                pids["grabber"] = grabber.pid
            result: dict[str, Any] = {}
            cpu0, began = {k: cpu_seconds(p) for k, p in pids.items()}, time.monotonic()
            if grabber is None:
                await asyncio.sleep(seconds)
            else:
                result = await _record(client, robot, grabber, seconds, work)
            elapsed = time.monotonic() - began
            result |= {f"cpu_{k} %": (cpu_seconds(p) - cpu0[k]) / elapsed * 100
                       for k, p in pids.items()}
            loop = (await robot.wait_state(lambda state: state["loop"].get("cycles", 0) > 0,
                                           30))["loop"]
            result |= {"loop jitter p99 ms": loop["jitter_p99_ms"],
                       "loop cycle p99 ms": loop["cycle_p99_ms"], "loop overruns": loop["overruns"]}
    finally:
        for process in (daemon, robot_sim):
            if process is not None and process.returncode is None:
                process.terminate()
                await process.wait()
        broker.stop()
    log_text = (work / "manipulator.log").read_text(errors="replace")
    return result | {"servo watchdog gaps (whole run)": log_text.count("servo watchdog gap")}


async def _record(client: TeleopClient, robot: TeleopClient, grabber: GrabberProcess,
                  seconds: float, work: Path) -> dict[str, Any]:
    before = (await us_request(client, "list")).detail
    sim_before = await grabber.snapshot()
    assert (await us_request(client, "record_start", {"label": "bench"})).ok
    sweep = await _start_sweep(client, robot)
    await asyncio.sleep(seconds)
    sim_after = await grabber.snapshot()  # before the stop: its DICOM write takes a while
    after = (await us_request(client, "list")).detail
    stop = await us_request(client, "record_stop", timeout=60)
    await us_request(client, "sweep_abort")
    assert stop.ok, stop
    ds = us_dicom.load(work / "state" / "ultrasound" / str(stop.detail["file"]))
    intervals = [float(v) for v in ds.FrameTimeVector][1:]

    def sim(key: str) -> int:
        return int(sim_after[key]) - int(sim_before[key])
    running = after["sweep"] or {}
    return {"sweep": sweep, "sweep at the end": running.get("outcome") or running.get("phase"),
            "frames recorded": int(ds.NumberOfFrames),
            "frames without a pose (loop stalled > 50 ms)": stop.detail["skipped_unposed"],
            "grabber frames sent meanwhile": sim("sent"),
            "grabber slots skipped late": sim("skipped_late"),
            "grabber slots skipped, reader slow": sim("skipped_reader"),
            "grabber frames rendered": sim("rendered"),
            "achieved fps": 1000.0 * len(intervals) / sum(intervals),
            "max frame interval ms": max(intervals),
            "intervals > 1.5 periods": sum(1 for i in intervals if i > 1.5 * 1000.0 / FPS),
            "daemon dropped (gap count)": after["dropped"] - before["dropped"],
            "daemon source errors": after["source_errors"] - before["source_errors"]}


async def write_stall(frames: int, out: Path) -> dict[str, float]:
    """The longest event-loop stall (ms) while a worker thread writes a cine of ``frames``
    800x600 frames: streamed (``write_cine``, the daemon's way) vs built in memory first."""
    jpeg = _phantom_jpegs(1)[0]
    records = [us_dicom.FrameRecord(i / FPS, (0.0, 0.0, SKIN), (0.0, 0.0), 4.5)
               for i in range(frames)]
    geometry = us_dicom.ImageGeometry(HEIGHT, WIDTH, 0.1)
    exam = us_dicom.Exam("BENCH", "BENCH")
    jpegs = [jpeg] * frames
    writers = {
        "streamed": lambda: us_dicom.write_cine(exam, jpegs, records, geometry, out),
        "in memory": lambda: us_dicom.write_instance(
            us_dicom.build_dataset(exam, jpegs, records, geometry), out)}
    stalls = {}
    for name, write in writers.items():
        lags: list[float] = []
        done = asyncio.Event()

        async def watch(lags: list[float] = lags, done: asyncio.Event = done) -> None:
            while not done.is_set():
                began = time.perf_counter()
                await asyncio.sleep(0.002)
                lags.append(time.perf_counter() - began - 0.002)
        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.05)
        path = await asyncio.to_thread(write)
        done.set()
        await watcher
        path.unlink()
        stalls[name] = max(lags) * 1000.0
    return stalls


def _percentile(values: list[float], fraction: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]


async def main(seconds: float, only_process: bool) -> None:
    with tempfile.TemporaryDirectory() as out_dir:
        out = Path(out_dir)
        if not only_process:
            rec = await recording(seconds, out)
            rate = await throughput(300, out)
            live = await live_view(seconds, out)
            stalls = {frames: await write_stall(frames, out) for frames in (300, 3000)}
        processes = {}
        for name, cache in (("every frame rendered", 0), ("pose cache", 256),
                            ("no ultrasound: control loop alone", None)):
            (out / name).mkdir()
            processes[name] = await live_process(seconds, out / name, cache)
    print(f"ultrasound bench, {WIDTH}x{HEIGHT} grayscale, grabber {FPS:.0f} fps, {seconds:.0f} s")
    print(f"{'grabber simulator: render + JPEG per frame (ms)':<56}{render_ms():>12.1f}")
    for name, rows in processes.items():
        print(f"live simulator process ({name}):")
        for key, value in rows.items():
            shown = f"{value:>12.1f}" if isinstance(value, float) else f"{value!s:>12}"
            print(f"  {key:<54}{shown}")
    if only_process:
        return
    print(f"{'measure':<44}{'value':>12}")
    print(f"{'recording: frames captured':<44}{rec['frames']:>12.0f}")
    print(f"{'recording: achieved fps':<44}{rec['fps']:>12.1f}")
    print(f"{'recording: dropped frames':<44}{rec['dropped']:>12.0f}")
    print(f"{'recording: DICOM write (s)':<44}{rec['write_s']:>12.2f}")
    print(f"{'recording: DICOM size (MB)':<44}{rec['mb']:>12.1f}")
    print(f"{'throughput: stamp+JPEG+record (frames/s)':<44}{rate:>12.1f}")
    if len(live) >= 2:
        print(f"{'live view: messages received':<44}{len(live):>12d}")
        print(f"{'live view: capture->subscriber p50 (ms)':<44}{_percentile(live, 0.5):>12.1f}")
        print(f"{'live view: capture->subscriber p99 (ms)':<44}{_percentile(live, 0.99):>12.1f}")
        print(f"{'live view: capture->subscriber max (ms)':<44}{max(live):>12.1f}")
    for frames, by_way in stalls.items():
        for way, stall in by_way.items():
            print(f"{f'DICOM write {frames} frames, {way}: loop stall ms':<44}{stall:>12.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only-process", action="store_true",
                        help="only the live simulator process rows")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.seconds, arguments.only_process))
