"""Durable outbox throughput and end-to-end latency through a real mosquitto on loopback.

    .venv/bin/python -m bench.outbox [--messages 20000] [--latency-messages 3000]

Prints, in one run on the same broker:
- the durable path: ``Runtime.emit`` (fsynced group commit) -> publisher -> mosquitto -> subscriber;
- the reference: a plain, non-durable aiomqtt QoS 1 publish loop with the same in-flight window;
- end-to-end latency (emit call -> subscriber receipt) of paced small telemetry messages.
Targets (issue 2): >= 5,000 durable msg/s, >= 0.5x the reference, p99 latency < 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

from medge import log
from medge.localbroker import Mosquitto
from medge.runtime import Runtime
from medge.settings import DaemonConfig, LogSection, MqttSection, NodeSection, OutboxSection

WINDOW = 100
PAYLOAD = {"resourceType": "Observation", "code": "2708-6", "value": 97, "unit": "%"}


class Subscriber:
    """The hospital side, in its own process so it does not compete with the producer for the
    producer's core: it counts messages and reports receipt latencies of stamped ones."""

    def __init__(self, port: int, topic_filter: str, total: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.outbox", "--subscribe", str(port), topic_filter,
             str(total)], stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("bench subscriber did not start")

    async def result(self, timeout: float = 300) -> list[float]:
        """Wait until every expected message arrived; return the latencies in seconds."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        await asyncio.to_thread(self.proc.wait)
        self.proc.stdout.close()
        latencies: list[float] = json.loads(line)
        return latencies


async def subscribe(port: int, topic_filter: str, total: int) -> None:
    count = 0
    latencies: list[float] = []
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=f"bench-sub-{os.getpid()}",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    ) as client:
        await client.subscribe(topic_filter, qos=1)
        print("ready", flush=True)
        async for message in client.messages:
            now = time.monotonic()
            count += 1
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            if b'"t0"' in payload:
                data: dict[str, Any] = json.loads(payload)
                latencies.append(now - data.get("body", data)["t0"])
            if count >= total:
                break
    print(json.dumps(latencies), flush=True)


def config(state_dir: Path, port: int) -> DaemonConfig:
    return DaemonConfig(
        node=NodeSection(site="bench", node="edge", state_dir=state_dir),
        mqtt=MqttSection(port=port),
        outbox=OutboxSection(sync="full", max_inflight=WINDOW),
        log=LogSection(level="warning"),
    )


async def durable_throughput(rt: Runtime, port: int, total: int) -> float:
    sub = Subscriber(port, "medge/v1/bench/edge/meter/obs", total)
    producers = 64
    start = time.perf_counter()

    async def producer(offset: int) -> None:
        for n in range(offset, total, producers):
            await rt.emit("meter", "obs", {**PAYLOAD, "n": n})

    await asyncio.gather(*(producer(i) for i in range(producers)))
    await sub.result()
    return total / (time.perf_counter() - start)


async def reference_throughput(port: int, total: int) -> float:
    sub = Subscriber(port, "medge/v1/bench/ref/meter/obs", total)
    quiet = logging.getLogger("bench.aiomqtt")
    quiet.setLevel(logging.ERROR)  # aiomqtt warns on every publish beyond 10 pending
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier="bench-ref", protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        max_inflight_messages=WINDOW, logger=quiet,
    ) as client:
        window = asyncio.Semaphore(WINDOW)
        start = time.perf_counter()

        async def send(n: int) -> None:
            try:
                payload = json.dumps({**PAYLOAD, "n": n}).encode()
                await client.publish("medge/v1/bench/ref/meter/obs", payload, qos=1)
            finally:
                window.release()

        tasks = []
        for n in range(total):
            await window.acquire()
            tasks.append(asyncio.create_task(send(n)))
        await asyncio.gather(*tasks)
        await sub.result()
        return total / (time.perf_counter() - start)


async def latency(rt: Runtime, port: int, total: int, rate: float) -> list[float]:
    sub = Subscriber(port, "medge/v1/bench/edge/vitals/obs", total)
    interval = 1.0 / rate
    next_at = time.perf_counter()
    for n in range(total):
        await rt.emit("vitals", "obs", {**PAYLOAD, "n": n, "t0": time.monotonic()})
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    return await sub.result(60)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    log.configure("warning", "console")
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "broker", persistence=False)
        broker.start()
        port = broker.port
        try:
            async with Runtime(config(Path(tmp) / "state", port), "bench") as rt:
                await rt.link.wait_connected(10)
                reference = await reference_throughput(port, args.messages)
                durable = await durable_throughput(rt, port, args.messages)
                lat = await latency(rt, port, args.latency_messages, args.rate)
        finally:
            broker.stop()
    ms = [x * 1000 for x in lat]
    rows = [
        ("durable emit -> subscriber (fsync, group commit)", f"{durable:,.0f} msg/s", ">= 5,000"),
        ("plain aiomqtt QoS 1 loop (reference, not durable)", f"{reference:,.0f} msg/s", ""),
        ("ratio durable / reference", f"{durable / reference:.2f}x", ">= 0.5x"),
        (f"end-to-end latency p50 ({args.rate:.0f} msg/s paced)",
         f"{quantile(ms, 0.5):.2f} ms", ""),
        ("end-to-end latency p99", f"{quantile(ms, 0.99):.2f} ms", "< 20 ms"),
        ("end-to-end latency mean / max",
         f"{statistics.fmean(ms):.2f} / {max(ms):.2f} ms", ""),
    ]
    print(f"bench/outbox on {platform.node()}: {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {args.messages} messages, window {WINDOW}")
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)} | {'value':>16} | target")
    print(f"{'-' * width}-+-{'-' * 16}-+-------")
    for name, value, target in rows:
        print(f"{name.ljust(width)} | {value:>16} | {target}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--latency-messages", type=int, default=3_000)
    parser.add_argument("--rate", type=float, default=500.0, help="paced rate for latency")
    parser.add_argument("--subscribe", nargs=3, metavar=("PORT", "FILTER", "COUNT"),
                        help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.subscribe:
        port, topic_filter, count = arguments.subscribe
        asyncio.run(subscribe(int(port), topic_filter, int(count)))
    else:
        asyncio.run(main(arguments))
