"""Console: what the loopback hop adds between the page and the broker.

    .venv/bin/python -m bench.console [--count 2000] [--rate 50]

Starts mosquitto, the console server holding an operator's MQTT connection, and a subscriber on
the robot's setpoint topic; then POSTs page setpoints over one keep-alive HTTP connection (as
the browser does) at the page's rate and prints:
- HTTP round trip of one page setpoint (what the page shows as "console link");
- page POST sent → the MQTT setpoint received by a subscriber on the broker (the console's
  share of the command age the daemon measures; the daemon's own share is in bench/manipulator).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medge-bench-console-") as tmp:
        broker = Mosquitto(Path(tmp) / "broker", persistence=False)
        broker.start()
        try:
            asyncio.run(measure(broker.port, Path(tmp), args.count, args.rate))
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
