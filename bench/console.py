"""Console: what the loopback hop adds between the page and the broker, the live ultrasound
image's path to the page, and how soon the console is back after a broker restart.

    .venv/bin/python -m bench.console [--count 2000] [--rate 50] [--live-seconds 20]
                                      [--restarts 5]

Starts mosquitto, the console server holding an operator's MQTT connection, and a subscriber on
the robot's setpoint topic; then POSTs page setpoints over one keep-alive HTTP connection (as
the browser does) at the page's rate and prints:
- HTTP round trip of one page setpoint (what the page shows as "console link");
- page POST sent → the MQTT setpoint received by a subscriber on the broker (the console's
  share of the command age the daemon measures; the daemon's own share is in bench/manipulator).
- live image: 800×600 JPEG frames published at 10/s as the manipulator daemon does, the page's
  pull at 10/s over keep-alive HTTP: publish → held by the console server, and capture → served
  to the page (the age the page shows, before its own decode);
- broker restart: the broker listening again → the console's link up (reconnect backoff).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import platform
import tempfile
import time
from pathlib import Path

import aiomqtt
import cv2
import numpy as np

from daemons.manipulator.ultrasound import StampedFrame, live_payload
from medge import log
from medge.console.server import ConsoleInfo, ConsoleServer
from medge.console.settings import SettingsStore
from medge.localbroker import Mosquitto
from medge.teleop import Broker, RobotTopics, TeleopClient

ROBOT = RobotTopics("bench", "console", "probe-arm")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"| {name} | {len(ms)} | {pct(ms, 50):.2f} | {pct(ms, 99):.2f} | {max(ms):.2f} |")


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: ConsoleServer,
               body: bytes) -> None:
    writer.write(f"POST /api/setpoint HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                 f"X-Console-Token: {server.token}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)


async def measure(port: int, directory: Path, count: int, rate: float) -> None:
    round_trips: list[float] = []
    to_broker: list[float] = []
    posted: collections.deque[float] = collections.deque()
    """POST start times, oldest first: QoS 0 on one connection arrives in order."""
    async with TeleopClient(Broker(port=port), ROBOT, "bench") as client, \
            ConsoleServer(client, ConsoleInfo("bench", f"127.0.0.1:{port}", ROBOT.prefix),
                          SettingsStore("bench", directory)) as server, \
            aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as spy:
        await spy.subscribe(ROBOT.setpoints)

        async def receive() -> None:
            async for message in spy.messages:
                del message
                to_broker.append(time.perf_counter() - posted.popleft())

        receiver = asyncio.create_task(receive())
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            next_at = time.perf_counter()
            for _ in range(count):
                body = json.dumps({"stamp": time.time() * 1000,
                                   "axes": [0.5, 0, 0, 0, 0, 0]}).encode()
                started = time.perf_counter()
                posted.append(started)
                await post(reader, writer, server, body)
                round_trips.append(time.perf_counter() - started)
                next_at += 1 / rate
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            async with asyncio.timeout(5):
                while posted:
                    await asyncio.sleep(0.01)
        finally:
            writer.close()
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
    print(f"console bench: {count} page setpoints at {rate:.0f} Hz; "
          f"{platform.python_version()} on {platform.machine()}")
    print("| measure | n | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|")
    print(row("page POST round trip (HTTP, loopback)", round_trips))
    print(row("page POST sent → MQTT setpoint at a subscriber", to_broker))
    print(f"forwarded {server.counters.forwarded}, dropped stale "
          f"{server.counters.dropped_stale}, reordered {server.counters.dropped_reordered}")


async def get_frame(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    server: ConsoleServer) -> dict[str, object] | None:
    """One page pull of ``/api/us/frame``: the frame's header, or None before the first."""
    writer.write(f"GET /api/us/frame HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                 f"X-Console-Token: {server.token}\r\n\r\n".encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    fields = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
    await reader.readexactly(int(fields["Content-Length"]))
    header: dict[str, object] | None = json.loads(fields["X-Us-Frame"]) if "X-Us-Frame" in fields \
        else None
    return header


async def measure_live(port: int, directory: Path, seconds: float) -> None:
    rng = np.random.default_rng(7)
    speckle = cv2.GaussianBlur(rng.integers(0, 255, (600, 800), dtype=np.uint8), (5, 5), 0)
    jpeg = bytes(cv2.imencode(".jpg", speckle, [cv2.IMWRITE_JPEG_QUALITY, 85])[1])
    held: list[float] = []
    shown_age_ms: list[float] = []
    async with TeleopClient(Broker(port=port), ROBOT, "bench") as client, \
            ConsoleServer(client, ConsoleInfo("bench", f"127.0.0.1:{port}", ROBOT.prefix),
                          SettingsStore("bench", directory)) as server, \
            aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as robot:
        async with asyncio.timeout(10):  # the live-image subscription is made in the background
            while not server.live.received:
                frame = StampedFrame(jpeg, 600, 800, 0.0, time.time(), None)
                await robot.publish(f"{ROBOT.state}/us", live_payload(frame, 0, None))
                await asyncio.sleep(0.05)

        async def page() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            last = None
            try:
                while True:
                    header = await get_frame(reader, writer, server)
                    if header is not None and header["seq"] != last:
                        last = header["seq"]
                        shown_age_ms.append(float(header["age_ms"]))  # type: ignore[arg-type]
                    await asyncio.sleep(0.1)
            finally:
                writer.close()

        puller = asyncio.create_task(page())
        try:
            for seq in range(1, round(seconds * 10) + 1):
                frame = StampedFrame(jpeg, 600, 800, 0.0, time.time(), None)
                started = time.perf_counter()
                await robot.publish(f"{ROBOT.state}/us", live_payload(frame, seq, None))
                async with asyncio.timeout(5):
                    while server.live.frame is None or server.live.frame.header["seq"] != seq:
                        await asyncio.sleep(0.001)
                held.append(time.perf_counter() - started)
                await asyncio.sleep(max(0.0, 0.1 - (time.perf_counter() - started)))
        finally:
            puller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await puller
    print(f"\nlive image: {len(held)} frames of {len(jpeg) // 1024} KiB (800×600 JPEG) at 10/s, "
          "the page pulling at 10/s")
    print("| measure | n | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|")
    print(row("frame published → held by the console server", held))
    print(row("capture → served to the page (the age shown)", [a / 1000 for a in shown_age_ms]))
    print(f"received {server.live.received}, served {server.live.served}, "
          f"skipped {server.live.skipped}, refused {server.live.refused}")


async def measure_restarts(broker: Mosquitto, directory: Path, restarts: int) -> None:
    back: list[float] = []
    async with TeleopClient(Broker(port=broker.port), ROBOT, "bench") as client, \
            ConsoleServer(client, ConsoleInfo("bench", f"127.0.0.1:{broker.port}",
                                              ROBOT.prefix), SettingsStore("bench", directory)):
        for _ in range(restarts):
            await asyncio.to_thread(broker.stop)
            async with asyncio.timeout(10):
                while client.connected:
                    await asyncio.sleep(0.005)
            await asyncio.sleep(2.0)  # an outage of 2 s: the backoff has grown meanwhile
            await asyncio.to_thread(broker.start)  # returns once the port listens
            listening = time.perf_counter()
            async with asyncio.timeout(30):
                while not client.connected:
                    await asyncio.sleep(0.005)
            back.append(time.perf_counter() - listening)
    print(f"\nbroker restarts: {restarts} outages of 2 s (reconnect backoff 0.1…2 s, jittered)")
    print("| measure | n | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|")
    print(row("broker listening again → console link up", back))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--live-seconds", type=float, default=20.0)
    parser.add_argument("--restarts", type=int, default=5)
    args = parser.parse_args()
    log.configure("warning", stream="stderr")  # the tables go to stdout
    with tempfile.TemporaryDirectory(prefix="medge-bench-console-") as tmp:
        broker = Mosquitto(Path(tmp) / "broker", persistence=False)
        broker.start()
        try:
            asyncio.run(measure(broker.port, Path(tmp), args.count, args.rate))
            asyncio.run(measure_live(broker.port, Path(tmp), args.live_seconds))
            asyncio.run(measure_restarts(broker, Path(tmp), args.restarts))
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
