"""bench/chaos (``make chaos``, opt-in): every daemon (one ``Part`` each, bench/parts.py: gateway,
scanner, robot) as its own process against its device simulators, one real mosquitto and one
real Orthanc, with faults injected on one schedule; at the end the invariants are checked and a
table printed (docs/reliability.md).

Shared faults (the rig's): broker restart, broker unreachable for ``--outage`` s, PACS down
(Orthanc stopped, back on the same ports after ``--pacs-outage`` s) and, with ``--host-clock``,
the machine's wall clock stepped an hour ahead and back. Each part adds its own
(SIGKILL of its daemon, serial unplug, stalled or noisy devices, disk nearly full, clock
jump...); the schedule interleaves them: shared, part 1, part 2, ..., shared, ...

Recovery time: from the end of a fault until the part works again (its ``Recovered`` probe; for
a shared fault, every part's ``working`` probe, the worst counted).

Invariants: for every part's outbox, every record numbered (per stream, seq 1..last) reached the
hospital subscriber (by ``msg_id``; none missing), none refused for good (dead letters),
duplicates counted; every fault recovered; every part's own checks (scan in the PACS or failed
with its tiles kept, robot motion only on fresh setpoints...); no process left behind.

    .venv/bin/python -m bench.chaos [--parts gateway,scanner,robot] [--outage 20] [--settle 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.parts import (
    Check,
    Fault,
    Hospital,
    Part,
    Recovered,
    Shared,
    available_parts,
    make_part,
)
from medge.localbroker import Mosquitto
from medge.localpacs import Orthanc

T = TypeVar("T")


class Rig:
    """Broker, PACS, the hospital subscriber and the parts; ``async with`` starts them in that
    order and stops everything it started, in reverse, even after a failed start."""

    def __init__(self, work: Path, rate: float, parts: Sequence[Part]) -> None:
        self.work = work
        self.broker = Mosquitto(work / "broker")
        self.pacs = Orthanc(work / "pacs")
        self.hospital = Hospital(self.broker.port)
        self.shared = Shared(work, self.broker, self.pacs, rate, self.hospital)
        self.parts = list(parts)
        self._started: list[Part] = []
        self._listener: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Rig:
        try:
            self.broker.start()
            await asyncio.to_thread(self.pacs.start)
            self._listener = asyncio.create_task(self.hospital.run(), name="hospital")
            await asyncio.wait_for(self.hospital.connected.wait(), 30)
            for part in self.parts:
                self._started.append(part)
                await asyncio.to_thread(part.start, self.shared)
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        for part in reversed(self._started):
            try:
                await asyncio.to_thread(part.stop)
            except Exception as exc:  # the other parts must stop all the same
                print(f"  !! {part.name}: stop failed: {exc!r}", flush=True)
        self._started = []
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await asyncio.to_thread(self.pacs.stop)
        self.broker.stop()


# --- shared faults -----------------------------------------------------------------------------

async def broker_restart(rig: Rig, args: argparse.Namespace) -> float:
    rig.broker.stop()
    rig.broker.start()
    return 0.0


async def broker_outage(rig: Rig, args: argparse.Namespace) -> float:
    rig.broker.stop()
    await asyncio.sleep(args.outage)
    rig.broker.start()
    return float(args.outage)


async def pacs_down(rig: Rig, args: argparse.Namespace) -> float:
    """Orthanc stopped, then started again on the same ports with the same storage."""
    await asyncio.to_thread(rig.pacs.stop)
    await asyncio.sleep(args.pacs_outage)
    await asyncio.to_thread(rig.pacs.start)
    return float(args.pacs_outage)


CLOCK_STEP_S = 3600.0
CAP_SYS_TIME = 25


def can_step_clock() -> bool:
    """CAP_SYS_TIME in this process's effective set (root on a VM, rarely in a container)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_TIME & 1)
    return False


@contextlib.contextmanager
def wall_clock_stepped(seconds: float) -> Iterator[None]:
    """The machine's real clock stepped by ``seconds``, then set back to the true time, taken
    from the monotonic clock (which a step does not move): the box ends on the right time."""
    true_then, monotonic_then = time.time(), time.monotonic()
    time.clock_settime(time.CLOCK_REALTIME, true_then + seconds)
    try:
        yield
    finally:
        time.clock_settime(time.CLOCK_REALTIME, true_then + time.monotonic() - monotonic_then)


async def host_clock_jump(rig: Rig, args: argparse.Namespace) -> float:
    """The wall clock an hour ahead for ``--settle`` s, then back (an RTC that lost its battery,
    then NTP stepping it): every daemon, the broker and the PACS see both steps."""
    with wall_clock_stepped(CLOCK_STEP_S):
        await asyncio.sleep(args.settle)
    return float(args.settle)


SharedFault = Callable[[Rig, argparse.Namespace], Awaitable[float]]
"""Injects a fault of the shared services and ends it; returns how long it lasted."""

SHARED_FAULTS: list[tuple[str, SharedFault]] = [
    ("broker restart", broker_restart), ("broker unreachable", broker_outage),
    ("PACS down", pacs_down)]
HOST_CLOCK_FAULT: tuple[str, SharedFault] = ("host clock +1 h, then back", host_clock_jump)


class EveryPartWorking:
    """The recovery probe after a shared fault: every part's ``working``; remembers each
    part's time (the report names the slowest)."""

    def __init__(self, parts: Sequence[Part]) -> None:
        self.parts = parts
        self.ended = time.monotonic()
        self.times: dict[str, float] = {}

    async def __call__(self) -> None:
        async def one(part: Part) -> None:
            await part.working(self.ended)
            self.times[part.name] = time.monotonic() - self.ended
        await asyncio.gather(*(one(part) for part in self.parts))

    def detail(self) -> str:
        return ", ".join(f"{part.name} {self.times[part.name]:.1f} s" if part.name in self.times
                         else f"{part.name} —" for part in self.parts)


def shared_fault(rig: Rig, action: SharedFault) -> Fault:
    """A rig fault as a ``Fault``: recovered when every part works again."""
    async def fault(args: argparse.Namespace) -> tuple[Recovered, float]:
        lasted = await action(rig, args)
        return EveryPartWorking(rig.parts), lasted
    return fault


def interleave(*lists: Sequence[T]) -> list[T]:
    """Round robin over the lists: the first of each, then the second of each, ..."""
    out: list[T] = []
    for i in range(max((len(items) for items in lists), default=0)):
        out += [items[i] for items in lists if i < len(items)]
    return out


def schedule(rig: Rig, host_clock: bool) -> list[tuple[str, str, Fault]]:
    """(owner, kind, fault): the shared faults interleaved with every part's own."""
    shared = [("shared", kind, shared_fault(rig, action))
              for kind, action in [*SHARED_FAULTS, *([HOST_CLOCK_FAULT] if host_clock else [])]]
    own = [[(part.name, kind, fault) for kind, fault in part.faults()] for part in rig.parts]
    return interleave(shared, *own)


@dataclass
class Outcome:
    owner: str
    kind: str
    lasted_s: float
    recovery_s: float | None
    """None: not recovered within ``--recovery-timeout``."""
    detail: str = ""
    """Per part, after a shared fault."""


async def inject(owner: str, kind: str, fault: Fault, args: argparse.Namespace) -> Outcome:
    recovered, lasted = await fault(args)
    ended = time.monotonic()
    try:
        await asyncio.wait_for(recovered(), args.recovery_timeout)
        recovery: float | None = time.monotonic() - ended
    except TimeoutError:
        recovery = None
    detail = recovered.detail() if isinstance(recovered, EveryPartWorking) else ""
    outcome = Outcome(owner, kind, lasted, recovery, detail)
    print(f"  {owner:<8} {kind:<26} lasted {lasted:5.1f} s, recovered in "
          f"{'— (not within the timeout)' if recovery is None else f'{recovery:.1f} s'}"
          f"{f' ({detail})' if detail else ''}", flush=True)
    return outcome


# --- loss accounting ---------------------------------------------------------------------------

@dataclass
class OutboxSnapshot:
    """One outbox read in one transaction: what it numbered and what it still holds."""

    last_seq: dict[str, int]
    queued: dict[str, set[int]]
    dead: int


def read_outbox(path: Path) -> OutboxSnapshot:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, isolation_level=None)
    with contextlib.closing(db):
        db.execute("BEGIN")  # one snapshot: a record numbered and sent meanwhile is not lost
        last_seq = {str(s): int(n) for s, n in db.execute("SELECT stream, last_seq FROM streams")}
        queued: dict[str, set[int]] = defaultdict(set)
        for stream, seq in db.execute("SELECT stream, seq FROM records"):
            queued[str(stream)].add(int(seq))
        dead = int(db.execute("SELECT count(*) FROM dead_letters").fetchone()[0])
        db.execute("COMMIT")
    return OutboxSnapshot(last_seq, dict(queued), dead)


@dataclass
class Tally:
    produced: int = 0
    delivered: int = 0
    duplicated: int = 0
    queued: int = 0
    dead: int = 0
    missing: dict[str, list[int]] = field(default_factory=dict)
    """Stream -> seqs numbered, no longer queued, never received: lost."""

    @property
    def lost(self) -> int:
        return sum(len(seqs) for seqs in self.missing.values())


def tally(outbox: OutboxSnapshot, received: Mapping[str, set[int]],
          copies: Iterable[tuple[str, int]]) -> Tally:
    """Loss accounting of one outbox: ``received`` holds the (stream -> seqs) that reached the
    hospital, ``copies`` (stream, copies received) per ``msg_id``."""
    result = Tally(queued=sum(len(s) for s in outbox.queued.values()), dead=outbox.dead)
    for stream, last in outbox.last_seq.items():
        got = received.get(stream, set())
        result.produced += last
        result.delivered += sum(1 for seq in got if seq <= last)
        missing = set(range(1, last + 1)) - got - outbox.queued.get(stream, set())
        if missing:
            result.missing[stream] = sorted(missing)
    result.duplicated = sum(n - 1 for stream, n in copies if stream in outbox.last_seq)
    return result


def colliding_streams(snapshots: Mapping[str, OutboxSnapshot]) -> set[str]:
    """Streams numbered by more than one outbox: the hospital could not tell them apart."""
    owners: dict[str, int] = defaultdict(int)
    for snapshot in snapshots.values():
        for stream in snapshot.last_seq:
            owners[stream] += 1
    return {stream for stream, count in owners.items() if count > 1}


async def drain(part: Part, timeout: float) -> Check:
    """Wait until the part's outbox is empty once (its daemon keeps up; a record numbered
    after that is still accounted: queued or delivered)."""
    deadline = time.monotonic() + timeout
    while (left := sum(map(len, read_outbox(part.outbox_path).queued.values()))) and \
            time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return Check(part.name, "outbox drained (empty once) at the end", not left,
                 f"{left} records still queued after {timeout:.0f} s" if left else "yes")


async def account(rig: Rig) -> tuple[dict[str, Tally], Check]:
    """After the drain, wait (briefly) for what the broker acknowledged to reach the
    subscriber; per part, what was produced, delivered, duplicated, lost, still queued; and
    whether the parts' stream names let the subscriber tell their messages apart."""
    snapshots = {part.name: read_outbox(part.outbox_path) for part in rig.parts}
    collisions = colliding_streams(snapshots)
    distinct = Check("rig", "stream names distinct across outboxes", not collisions,
                     ", ".join(sorted(collisions)) or "yes")
    deadline = time.monotonic() + 10  # broker -> subscriber, after the daemon's PUBACK
    while True:
        copies = [(rig.hospital.stream_of[m], n) for m, n in rig.hospital.seen.items()]
        tallies = {name: tally(snapshot, rig.hospital.by_stream, copies)
                   for name, snapshot in snapshots.items()}
        if time.monotonic() > deadline or not any(t.missing for t in tallies.values()):
            return tallies, distinct
        await asyncio.sleep(0.5)


# --- processes ---------------------------------------------------------------------------------

def child_pids() -> set[int]:
    """Live (non-zombie) children of this process."""
    me = str(os.getpid())
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[1] == me and fields[0] != "Z":
                    found.add(int(entry.name))
    return found


def run_loads(parts: Sequence[Part]) -> dict[str, asyncio.Task[None]]:
    """Each part's workload as a task; one that dies says so at once (it is also a failed
    check at the end), since the faults after it no longer meet a working part."""
    def died(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            print(f"  !! {task.get_name()} died: {task.exception()!r}", flush=True)

    loads = {part.name: asyncio.create_task(part.load(), name=f"load-{part.name}")
             for part in parts}
    for task in loads.values():
        task.add_done_callback(died)
    return loads


async def stop_loads(loads: Mapping[str, asyncio.Task[None]]) -> list[Check]:
    """Cancel the workloads; a workload that had died meanwhile is a broken invariant."""
    checks = []
    for name, task in loads.items():
        crashed = task.done() and not task.cancelled() and task.exception() is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        checks.append(Check(name, "workload ran to the end", not crashed,
                            repr(task.exception()) if crashed else "cancelled at the end"))
    return checks


async def wind_down(rig: Rig, loads: Mapping[str, asyncio.Task[None]], settle_timeout: float,
                    drain_timeout: float) -> tuple[dict[str, Tally], list[Check]]:
    """The end of a run: workloads stopped and brought to rest, every outbox drained, the loss
    accounting, every part's own checks (one that raises is a failed check, not a lost
    report)."""
    checks = await stop_loads(loads)
    for part in rig.parts:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(part.settle(settle_timeout), settle_timeout + 5)
    checks += [await drain(part, drain_timeout) for part in rig.parts]
    tallies, distinct = await account(rig)
    checks.append(distinct)
    for part in rig.parts:
        try:
            checks += await part.check()
        except Exception as exc:  # the other parts' checks and the report still count
            checks.append(Check(part.name, "its checks ran", False, repr(exc)))
    return tallies, checks


# --- the campaign ------------------------------------------------------------------------------

async def campaign(args: argparse.Namespace) -> bool:
    parts = [make_part(name) for name in args.parts]
    work = Path(tempfile.mkdtemp(prefix="medge-chaos-"))
    print(f"chaos: parts {', '.join(args.parts)}; work dir {work}", flush=True)
    outcomes: list[Outcome] = []
    async with Rig(work, args.rate, parts) as rig:
        loads = run_loads(rig.parts)
        await asyncio.sleep(args.settle)  # every part working before the first fault
        for _ in range(args.rounds):
            for owner, kind, fault in schedule(rig, args.host_clock):
                outcomes.append(await inject(owner, kind, fault, args))
                await asyncio.sleep(args.settle)
        tallies, checks = await wind_down(rig, loads, args.settle_timeout,
                                          args.recovery_timeout)
    leftovers = child_pids()
    return report(outcomes, tallies, checks, leftovers)


def report(outcomes: Sequence[Outcome], tallies: Mapping[str, Tally], checks: Sequence[Check],
           leftovers: set[int]) -> bool:
    print(f"\n{'fault':<40} | {'count':>5} | {'lasted s':>8} | {'recovery s (worst)':>18}")
    print("-" * 81)
    by_kind: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_kind[(outcome.owner, outcome.kind)].append(outcome)
    for (owner, kind), items in by_kind.items():
        times = [o.recovery_s for o in items]
        worst = "never" if None in times else f"{max(t for t in times if t is not None):.1f}"
        slowest = max(items, key=lambda o: math.inf if o.recovery_s is None else o.recovery_s)
        print(f"{owner + ': ' + kind:<40} | {len(items):>5} | {items[0].lasted_s:>8.1f} | "
              f"{worst:>18}{f'  ({slowest.detail})' if slowest.detail else ''}")
    print(f"\n{'part':<8} | {'produced':>8} | {'delivered':>9} | {'duplicated':>10} | "
          f"{'lost':>5} | {'queued':>6} | {'dead letters':>12}")
    print("-" * 78)
    for name, t in tallies.items():
        print(f"{name:<8} | {t.produced:>8} | {t.delivered:>9} | {t.duplicated:>10} | "
              f"{t.lost:>5} | {t.queued:>6} | {t.dead:>12}")
        for stream, seqs in t.missing.items():
            print(f"  missing on {stream}: seq {seqs[:20]}{' …' if len(seqs) > 20 else ''}")
    print(f"\n{'part':<8} | {'check':<60} | ok")
    print("-" * 75)
    for check in checks:
        print(f"{check.part:<8} | {check.name:<60} | {'yes' if check.ok else 'NO'}  "
              f"{check.detail}")
    print(f"\nprocesses left behind: {len(leftovers)} {sorted(leftovers) or ''}")
    ok = (all(o.recovery_s is not None for o in outcomes) and all(c.ok for c in checks)
          and all(t.lost == 0 and t.dead == 0 for t in tallies.values())
          and not leftovers)
    print("INVARIANTS", "HOLD" if ok else "BROKEN")
    return ok


def parts_arg(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no part named")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=parts_arg, default=available_parts(),
                        help="comma-separated (default: every part whose module exists)")
    parser.add_argument("--outage", type=float, default=20.0,
                        help="seconds the broker stays unreachable (default 20)")
    parser.add_argument("--pacs-outage", type=float, default=30.0,
                        help="seconds Orthanc stays down (default 30)")
    parser.add_argument("--settle", type=float, default=8.0,
                        help="seconds between faults and of each timed fault (default 8)")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the schedule")
    parser.add_argument("--recovery-timeout", type=float, default=90.0)
    parser.add_argument("--settle-timeout", type=float, default=180.0,
                        help="seconds for the parts' workloads to come to rest (default 180)")
    parser.add_argument("--rate", type=float, default=120.0,
                        help="times the realistic device pace (default 120: many messages)")
    parser.add_argument("--host-clock", action="store_true",
                        help="also step the machine's wall clock an hour ahead and back (needs "
                             "CAP_SYS_TIME; off by default: it moves the clock of everything "
                             "on the machine, restored from the monotonic clock)")
    args = parser.parse_args()
    if args.host_clock and not can_step_clock():
        parser.error("--host-clock: this process may not set the clock (no CAP_SYS_TIME)")
    return 0 if asyncio.run(campaign(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
