"""bench/soak (``make soak``): every daemon (the chaos parts, bench/parts.py: gateway, scanner,
robot) with its simulators and workload at ``--rate`` times the realistic pace (default 10x)
against a real mosquitto and Orthanc for ``--minutes`` (default 60; 5 for a smoke run), no
faults. Every ``--sample`` seconds each daemon process is sampled: RSS, open file descriptors,
threads, asyncio tasks (from its health message), CPU since start, outbox depth, deliveries.

Reports per daemon the RSS slope after the warm-up (first fifth of the run) and the ranges, and
checks zero loss across every outbox, every part's own invariants and that no process is left
behind (docs/reliability.md).

    .venv/bin/python -m bench.soak [--parts gateway,scanner,robot] [--minutes 60] [--rate 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.chaos import Rig, Tally, child_pids, parts_arg, run_loads, wind_down
from bench.gateway import cpu_seconds, rss_mib
from bench.parts import Check, Hospital, Part, available_parts, make_part


@dataclass(frozen=True)
class Sample:
    t: float
    rss_mib: float
    fds: int
    threads: int
    tasks: int
    """From the daemon's newest health message; -1 before the first."""
    outbox: int
    delivered: int
    cpu_pct: float
    """Mean since the process started being sampled, % of one core."""


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def outbox_depth(path: Path) -> tuple[int, set[str]]:
    """Records waiting in the outbox, and the streams it has numbered."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        depth = int(db.execute("SELECT count(*) FROM records").fetchone()[0])
        streams = {str(row[0]) for row in db.execute("SELECT stream FROM streams")}
    return depth, streams


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) in MiB per hour."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mean_x) ** 2 for x in xs)
    return 0.0 if den == 0 else 3600 * sum(
        (x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / den


class Sampler:
    """Samples each part's daemon process; notices restarts (a new pid) on the way."""

    def __init__(self, parts: Sequence[Part], hospital: Hospital) -> None:
        self.parts = parts
        self.hospital = hospital
        self.start = time.monotonic()
        self.samples: dict[str, list[Sample]] = defaultdict(list)
        self.pids: dict[str, set[int]] = defaultdict(set)
        self._cpu0: dict[int, tuple[float, float]] = {}

    def sample(self, part: Part) -> Sample | None:
        pid = part.daemon_pid()
        if pid is None:
            return None
        now = time.monotonic()
        try:
            cpu = cpu_seconds(pid)
            cpu_at, cpu_then = self._cpu0.setdefault(pid, (now, cpu))
            depth, streams = outbox_depth(part.outbox_path)
            row = Sample(
                t=now - self.start, rss_mib=rss_mib(pid), fds=fd_count(pid),
                threads=threads(pid),
                tasks=int(self.hospital.health.get(part.daemon, {}).get("tasks", -1)),
                outbox=depth,
                delivered=sum(len(self.hospital.by_stream.get(s, ())) for s in streams),
                cpu_pct=0.0 if now == cpu_at else 100 * (cpu - cpu_then) / (now - cpu_at))
        except (OSError, sqlite3.Error):  # the process died or the outbox is not there yet
            return None
        self.pids[part.name].add(pid)
        self.samples[part.name].append(row)
        return row

    async def run(self, seconds: float, every: float) -> None:
        print(f"{'part':<8} | {'t s':>6} | {'RSS MiB':>7} | {'fds':>4} | {'thr':>3} | "
              f"{'tasks':>5} | {'outbox':>6} | {'delivered':>9} | {'CPU %':>5}", flush=True)
        while time.monotonic() - self.start < seconds:
            await asyncio.sleep(every)
            for part in self.parts:
                s = self.sample(part)
                if s is not None:
                    print(f"{part.name:<8} | {s.t:>6.0f} | {s.rss_mib:>7.1f} | {s.fds:>4} | "
                          f"{s.threads:>3} | {s.tasks:>5} | {s.outbox:>6} | {s.delivered:>9} | "
                          f"{s.cpu_pct:>5.1f}", flush=True)


async def soak(args: argparse.Namespace) -> bool:
    parts = [make_part(name) for name in args.parts]
    work = Path(tempfile.mkdtemp(prefix="medge-soak-"))
    print(f"soak: parts {', '.join(args.parts)} at {args.rate}x for {args.minutes} min; "
          f"work dir {work}", flush=True)
    async with Rig(work, args.rate, parts) as rig:
        loads = run_loads(rig.parts)
        sampler = Sampler(rig.parts, rig.hospital)
        await sampler.run(args.minutes * 60, args.sample)
        tallies, checks = await wind_down(rig, loads, args.settle_timeout, 120)
        checks += [Check(name, "daemon never restarted during the soak", len(pids) <= 1,
                         f"pids {sorted(pids)}") for name, pids in sampler.pids.items()]
    leftovers = child_pids()
    return report(args, sampler.samples, tallies, checks, leftovers)


def report(args: argparse.Namespace, samples: dict[str, list[Sample]],
           tallies: dict[str, Tally], checks: list[Check], leftovers: set[int]) -> bool:
    warm_up = args.minutes * 60 / 5
    print(f"\nafter the warm-up (first {warm_up:.0f} s):")
    print(f"{'part':<8} | {'n':>4} | {'RSS MiB':>13} | {'slope MiB/h':>11} | {'fds':>7} | "
          f"{'threads':>7} | {'tasks':>7} | {'outbox':>7} | {'CPU %':>5} | {'produced':>8} | "
          f"{'delivered':>9} | {'dup':>4} | {'lost':>4}")
    print("-" * 126)

    def spread(rows: list[Sample], attr: str) -> str:
        values = [getattr(s, attr) for s in rows]
        return f"{min(values)}..{max(values)}" if values else "-"

    for name, tally in tallies.items():
        warm = [s for s in samples.get(name, []) if s.t >= warm_up]
        rss = f"{warm[0].rss_mib:.1f}->{warm[-1].rss_mib:.1f}" if warm else "-"
        slope = slope_per_hour([(s.t, s.rss_mib) for s in warm])
        cpu = warm[-1].cpu_pct if warm else 0.0
        print(f"{name:<8} | {len(warm):>4} | {rss:>13} | {slope:>+11.2f} | "
              f"{spread(warm, 'fds'):>7} | {spread(warm, 'threads'):>7} | "
              f"{spread(warm, 'tasks'):>7} | {spread(warm, 'outbox'):>7} | {cpu:>5.1f} | "
              f"{tally.produced:>8} | {tally.delivered:>9} | {tally.duplicated:>4} | "
              f"{tally.lost:>4}")
        for stream, seqs in tally.missing.items():
            print(f"  missing on {stream}: seq {seqs[:20]}{' …' if len(seqs) > 20 else ''}")
    print()
    for check in checks:
        print(f"{check.part:<8} | {check.name:<60} | {'yes' if check.ok else 'NO'}  "
              f"{check.detail}")
    print(f"processes left behind: {len(leftovers)} {sorted(leftovers) or ''}")
    ok = (all(c.ok for c in checks) and not leftovers
          and all(t.lost == 0 and t.dead == 0 for t in tallies.values()))
    print("SOAK", "OK (zero loss; read the RSS slopes above)" if ok else "BROKEN")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=parts_arg, default=available_parts(),
                        help="comma-separated (default: every part whose module exists)")
    parser.add_argument("--minutes", type=float, default=60.0, help="duration (default 60)")
    parser.add_argument("--rate", type=float, default=10.0,
                        help="times the realistic device pace (default 10)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--settle-timeout", type=float, default=180.0,
                        help="seconds for the parts' workloads to come to rest (default 180)")
    return 0 if asyncio.run(soak(parser.parse_args())) else 1


if __name__ == "__main__":
    sys.exit(main())
