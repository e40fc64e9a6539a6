"""bench/soak (``make soak``): the gateway with its device simulators at ``--rate`` times the
realistic pace (default 10×) against a real mosquitto for ``--minutes`` (default 60; 5 for a
smoke run), sampling the gateway process: RSS, open file descriptors, threads, asyncio tasks
(from its health message), CPU, outbox depth and deliveries. Reports the RSS slope after the
warm-up (first fifth) and checks zero loss at the end (docs/reliability.md).

    .venv/bin/python -m bench.soak [--minutes 60] [--rate 10] [--sample 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

from bench.chaos import Rig, child_pids, drain
from bench.gateway import cpu_seconds, rss_mib


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


async def health_tasks(port: int, into: dict[str, int]) -> None:
    """Keep ``into["tasks"]`` at the gateway's latest reported asyncio task count."""
    while True:
        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, identifier="soak-health") as client:
                await client.subscribe("medge/v1/+/+/gateway/health")
                async for message in client.messages:
                    body = json.loads(bytes(message.payload))
                    into["tasks"] = int(body.get("body", body).get("tasks", -1))
        await asyncio.sleep(1)


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) in MiB per hour."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mean_x) ** 2 for x in xs)
    return 0.0 if den == 0 else 3600 * sum(
        (x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / den


async def soak(args: argparse.Namespace) -> bool:
    rig = Rig(Path(tempfile.mkdtemp(prefix="medge-soak-")), rate=args.rate)
    rig.start()
    listener = asyncio.create_task(rig.hospital.run())
    health: dict[str, int] = {"tasks": -1}
    watcher = asyncio.create_task(health_tasks(rig.broker.port, health))
    samples: list[tuple[float, float, int, int, int, int, int, float]] = []
    try:
        await asyncio.wait_for(rig.hospital.connected.wait(), 30)
        assert rig.gateway is not None
        pid, start = rig.gateway.pid, time.monotonic()
        cpu0 = cpu_seconds(pid)
        print(f"{'t s':>6} | {'RSS MiB':>7} | {'fds':>4} | {'thr':>3} | {'tasks':>5} | "
              f"{'outbox':>6} | {'delivered':>9} | {'CPU %':>5}")
        while (elapsed := time.monotonic() - start) < args.minutes * 60:
            await asyncio.sleep(args.sample)
            elapsed = time.monotonic() - start
            cpu = 100 * (cpu_seconds(pid) - cpu0) / elapsed
            with contextlib.closing(rig.outbox()) as db:
                depth = int(db.execute("SELECT count(*) FROM records").fetchone()[0])
            row = (elapsed, rss_mib(pid), fd_count(pid), threads(pid), health["tasks"], depth,
                   len(rig.hospital.seen), cpu)
            samples.append(row)
            print(f"{row[0]:>6.0f} | {row[1]:>7.1f} | {row[2]:>4} | {row[3]:>3} | {row[4]:>5} | "
                  f"{row[5]:>6} | {row[6]:>9} | {row[7]:>5.1f}", flush=True)
        left = await drain(rig, 60)
        await asyncio.sleep(2)
        with contextlib.closing(rig.outbox()) as db:
            last_seq = dict(db.execute("SELECT stream, last_seq FROM streams").fetchall())
    finally:
        for task in (listener, watcher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        rig.stop()
    warm = [s for s in samples if s[0] >= args.minutes * 60 / 5]
    lost = sum(len(set(range(1, last + 1)) - rig.hospital.by_stream[stream])
               for stream, last in last_seq.items())
    duplicated = sum(count - 1 for count in rig.hospital.seen.values())
    spread = {name: (min(s[i] for s in warm), max(s[i] for s in warm)) if warm else (0, 0)
              for name, i in (("fds", 2), ("threads", 3), ("tasks", 4), ("outbox", 5))}
    print(f"\nafter warm-up ({len(warm)} samples): RSS slope "
          f"{slope_per_hour([(s[0], s[1]) for s in warm]):+.2f} MiB/h; "
          + ", ".join(f"{k} {lo}..{hi}" for k, (lo, hi) in spread.items()))
    print(f"messages produced {sum(last_seq.values())}, delivered {len(rig.hospital.seen)}, "
          f"duplicated {duplicated}, lost {lost}, still queued {left}; "
          f"mean CPU {samples[-1][7] if samples else 0:.1f} %; "
          f"processes left behind {len(child_pids())}")
    return lost == 0 and not child_pids()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="duration (default 60)")
    parser.add_argument("--rate", type=float, default=10.0,
                        help="times the realistic device pace (default 10)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    return 0 if asyncio.run(soak(parser.parse_args())) else 1


if __name__ == "__main__":
    sys.exit(main())
