"""bench/ultrasound: sustained recording rate and live-view capture-to-delivery latency.

* **recording**: a grabber stand-in delivers 800x600 phantom frames (pre-rendered, so the
  renderer's own cost does not count against the pipeline) at 30 fps on absolute deadlines,
  like a UVC stream, into the ultrasound service with a recording running and the pose track
  fed at 100 Hz; reports frames captured, dropped (gaps in capture time or encoder backlog
  full), achieved fps and the time to write the DICOM cine at the end;
* **throughput**: pre-rendered 800x600 frames pushed as fast as the service takes them
  (stamp + JPEG + record): the headroom above the grabber's rate;
* **live view**: with mosquitto on loopback, the time from a frame's capture to its arrival
  at a subscriber (the JPEG + header message on ``state/us``), p50/p99/max, at 10 fps.

Run: ``.venv/bin/python -m bench.ultrasound [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiomqtt
import numpy as np

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
from medge.localbroker import Mosquitto

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


def _percentile(values: list[float], fraction: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1]


async def main(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as out_dir:
        out = Path(out_dir)
        rec = await recording(seconds, out)
        rate = await throughput(300, out)
        live = await live_view(seconds, out)
    print(f"ultrasound bench, {WIDTH}x{HEIGHT} grayscale, grabber {FPS:.0f} fps, {seconds:.0f} s")
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    asyncio.run(main(parser.parse_args().seconds))
