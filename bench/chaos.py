"""bench/chaos (``make chaos``, opt-in): the gateway daemon as its own process against device
simulator processes and a real mosquitto, with faults injected on a schedule; at the end the
invariants are checked and a table printed (docs/reliability.md).

Faults: broker restart, broker unreachable for ``--outage`` seconds, SIGKILL of the gateway,
device unplugged (simulator process killed, back after a pause), corrupted and dropped bytes
(simulator restarted with ``--corrupt-rate``/``--drop-rate``), stalled device (SIGSTOP/SIGCONT
of the simulator), disk nearly full (``RLIMIT_FSIZE`` of the running gateway pinned to its
current file sizes with ``prlimit``), device clock jump (simulator restarted with
``--clock-offset``; the host clock cannot be changed here).

Invariants: every record the gateway's outbox numbered (per stream, seq 1..last) reached the
hospital subscriber (by ``msg_id``; none missing), duplicates counted; no process left behind.

    .venv/bin/python -m bench.chaos [--outage 20] [--settle 8] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.gateway import gateway_toml
from medge.localbroker import Mosquitto, free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
VENT_MAP = REPO / "config" / "ventilators" / "home-ventilator.toml"


@dataclass
class Sim:
    """A device simulator process on a fixed port, so that it can die and come back."""

    name: str
    args: tuple[str, ...]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "medge.cli", "sim", self.name, "--listen",
             f"tcp://127.0.0.1:{self.port}", *self.args, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout=60, proc=self.proc)  # slow start on a busy box

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.port}"


@dataclass
class Hospital:
    """The hospital subscriber: a persistent MQTT 5 session (QoS 1), so that what the broker
    queued for it while it reconnected is not lost on its side."""

    port: int
    seen: Counter[str] = field(default_factory=Counter)
    by_stream: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    last_at: dict[str, float] = field(default_factory=dict)
    """Receipt time of the newest observation per device."""
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier="chaos-hospital",
                                          protocol=aiomqtt.ProtocolVersion.V5,
                                          clean_start=False, properties=properties) as client:
                    await client.subscribe("medge/v1/#", qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        self._take(bytes(message.payload))
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.5)

    def _take(self, payload: bytes) -> None:
        try:
            head = json.loads(payload)
        except ValueError:
            return
        if not isinstance(head, dict) or "msg_id" not in head:
            return  # live state and replies bypass the outbox: not counted
        self.seen[head["msg_id"]] += 1
        self.by_stream[head["stream"]].add(int(head["seq"]))
        if head.get("kind") == "obs":  # recovery means measurements flowing again
            self.last_at[head["device"]] = time.monotonic()

    async def next_from(self, device: str | None, after: float, timeout: float) -> float | None:
        """Seconds from ``after`` until a message (from ``device``, or any) arrives; None if not
        within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            times = [t for d, t in self.last_at.items() if device in (None, d)]
            if times and max(times) > after:
                return max(times) - after
            await asyncio.sleep(0.1)
        return None


class Rig:
    """Broker, simulators, gateway process and the hospital subscriber."""

    def __init__(self, work: Path, rate: float) -> None:
        """``rate``: times the realistic pace (oximeter and ventilator published every 60 s,
        ventilator polled every 1 s, a urine strip every 5 minutes)."""
        self.work = work
        self.broker = Mosquitto(work / "broker")
        vent_map = work / "vent.toml"
        vent_map.write_text(VENT_MAP.read_text().replace(
            "poll_interval = 1.0", f"poll_interval = {max(0.01, 1.0 / rate):.3f}"))
        publish, strip_every = 60.0 / rate, f"{300.0 / rate:.2f}"
        self.sims = {
            "oximeter": Sim("cms50", ()),
            "urine-astm": Sim("astm-urine", ("--every", strip_every, "--first-after", "1",
                                             "--ack-timeout", "2", "--busy-retry", "1")),
            "ventilator": Sim("modbus-vent", ()),
            "urine-printout": Sim("printout-urine", ("--every", strip_every)),
        }
        self.devices: dict[str, dict[str, Any]] = {
            "oximeter": {"driver": "cms50", "obs_interval_s": publish, "pleth_every_s": 0.0},
            "urine-astm": {"driver": "urine-astm"},
            "ventilator": {"driver": "modbus", "map": str(vent_map), "serial": "VENT-1",
                           "obs_interval_s": publish},
            "urine-printout": {"driver": "urine-printout"},
        }
        self.state = work / "gateway"
        self.gateway: subprocess.Popen[bytes] | None = None
        self.hospital = Hospital(self.broker.port)

    def start(self) -> None:
        self.broker.start()
        for sim in self.sims.values():
            sim.start()
        tables = {name: {**table, "port": self.sims[name].url,
                         "reconnect_min_s": 0.5, "reconnect_max_s": 2.0}
                  for name, table in self.devices.items()}
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "gateway.toml").write_text(
            gateway_toml(self.state, self.broker.port, tables).replace(
                "[mqtt]\n", "[mqtt]\nreconnect_min = 0.5\nreconnect_max = 2.0\n"))
        self.start_gateway()

    def start_gateway(self) -> None:
        """The gateway logs into a pipe, as under systemd (journald), so that the disk-full
        fault hits its outbox, not its log file."""
        self.gateway = subprocess.Popen([sys.executable, "-m", "medge.cli", "run", "gateway",
                                         "--config", str(self.state / "gateway.toml")],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=_copy, args=(self.gateway.stdout, self.work / "gateway.log"),
                         daemon=True).start()

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.terminate()
            try:
                self.gateway.wait(15)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait()
        for sim in self.sims.values():
            if sim.proc is not None:
                os.kill(sim.proc.pid, signal.SIGCONT)
            sim.kill()
        self.broker.stop()

    def outbox(self) -> sqlite3.Connection:
        """Read-only view of the gateway's outbox (medge.runtime names it so)."""
        path = self.state / "gateway-outbox.sqlite3"
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)


def _copy(source: IO[bytes], path: Path) -> None:
    with path.open("ab") as log:
        for line in source:
            log.write(line)
            log.flush()


@dataclass
class Outcome:
    kind: str
    injected_for_s: float
    recovery_s: float | None


Fault = Callable[["Rig", argparse.Namespace], Awaitable[tuple[str | None, float]]]
"""Injects one fault and ends it; returns (device whose messages show recovery, or None for any;
how long the fault lasted)."""


async def broker_restart(rig: Rig, args: argparse.Namespace) -> tuple[str | None, float]:
    rig.broker.stop()
    rig.broker.start()
    return None, 0.0


async def broker_outage(rig: Rig, args: argparse.Namespace) -> tuple[str | None, float]:
    rig.broker.stop()
    await asyncio.sleep(args.outage)
    rig.broker.start()
    return None, args.outage


async def gateway_sigkill(rig: Rig, args: argparse.Namespace) -> tuple[str | None, float]:
    assert rig.gateway is not None
    rig.gateway.kill()
    rig.gateway.wait()
    rig.start_gateway()
    return None, 0.0


async def unplug(rig: Rig, args: argparse.Namespace) -> tuple[str | None, float]:
    sim = rig.sims["ventilator"]
    sim.kill()
    await asyncio.sleep(args.settle)
    sim.start()
    return "ventilator", args.settle


async def stall(rig: Rig, args: argparse.Namespace) -> tuple[str | None, float]:
    sim = rig.sims["oximeter"]
    assert sim.proc is not None
    os.kill(sim.proc.pid, signal.SIGSTOP)
    await asyncio.sleep(args.settle)
    os.kill(sim.proc.pid, signal.SIGCONT)
    return "oximeter", args.settle


async def noisy_line(rig: Rig, args: argparse.Namespace) -> tuple[str | None, float]:
    sim = rig.sims["urine-astm"]
    sim.kill()
    sim.start("--corrupt-rate", "0.003", "--drop-rate", "0.003", "--seed", "7")
    await asyncio.sleep(args.settle * 2)
    sim.kill()
    sim.start()
    return "urine-astm", args.settle * 2


async def disk_full(rig: Rig, args: argparse.Namespace) -> tuple[str | None, float]:
    """The gateway may not write past the first 4 KiB of any file: SQLite gets EFBIG
    ("database or disk is full") on every commit, as on a full disk."""
    assert rig.gateway is not None
    pid = rig.gateway.pid
    limits = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (4096, limits[1]))
    await asyncio.sleep(args.settle)
    with contextlib.suppress(ProcessLookupError):
        resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)
    return None, args.settle


async def clock_jump(rig: Rig, args: argparse.Namespace) -> tuple[str | None, float]:
    sim = rig.sims["urine-printout"]
    sim.kill()
    sim.start("--clock-offset", "3600")
    return "urine-printout", 0.0


SCHEDULE: list[tuple[str, Fault]] = [
    ("broker restart", broker_restart), ("broker unreachable", broker_outage),
    ("SIGKILL gateway", gateway_sigkill), ("serial unplug/replug", unplug),
    ("stalled device", stall), ("corrupt+dropped bytes", noisy_line),
    ("disk nearly full", disk_full), ("device clock jump", clock_jump),
]


def child_pids() -> set[int]:
    me = str(os.getpid())
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[1] == me and fields[0] != "Z":
                    found.add(int(entry.name))
    return found


async def drain(rig: Rig, timeout: float) -> int:
    """Wait until the outbox holds no record; return how many are left at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(rig.outbox()) as db:
            left = int(db.execute("SELECT count(*) FROM records").fetchone()[0])
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.5)


async def campaign(args: argparse.Namespace) -> bool:
    work = Path(tempfile.mkdtemp(prefix="medge-chaos-"))
    rig = Rig(work, rate=args.rate)
    rig.start()
    listener = asyncio.create_task(rig.hospital.run())
    outcomes: list[Outcome] = []
    try:
        await asyncio.wait_for(rig.hospital.connected.wait(), 30)
        await asyncio.sleep(args.settle)  # every device delivering before the first fault
        for _ in range(args.rounds):
            for kind, fault in SCHEDULE:
                device, lasted = await fault(rig, args)
                ended = time.monotonic()
                recovery = await rig.hospital.next_from(device, ended, args.recovery_timeout)
                outcomes.append(Outcome(kind, lasted, recovery))
                print(f"  {kind:<24} lasted {lasted:5.1f} s, recovered in "
                      f"{'—' if recovery is None else f'{recovery:.1f} s'}", flush=True)
                await asyncio.sleep(args.settle)
        left = await drain(rig, args.recovery_timeout)
        await asyncio.sleep(2)  # the last acknowledged messages reach the subscriber
        with contextlib.closing(rig.outbox()) as db:
            last_seq = dict(db.execute("SELECT stream, last_seq FROM streams").fetchall())
            dead = int(db.execute("SELECT count(*) FROM dead_letters").fetchone()[0])
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        rig.stop()
    leftovers = child_pids()
    return report(rig, outcomes, last_seq, left, dead, leftovers)


def report(rig: Rig, outcomes: list[Outcome], last_seq: dict[str, int], left: int, dead: int,
           leftovers: set[int]) -> bool:
    produced = sum(last_seq.values())
    missing = {stream: sorted(set(range(1, last + 1)) - rig.hospital.by_stream[stream])
               for stream, last in last_seq.items()}
    lost = sum(len(seqs) for seqs in missing.values())
    delivered = len(rig.hospital.seen)
    duplicated = sum(count - 1 for count in rig.hospital.seen.values())
    print(f"\n{'fault':<24} | {'count':>5} | {'lasted s':>8} | {'recovery s (max)':>16}")
    print("-" * 63)
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_kind[outcome.kind].append(outcome)
    for kind, items in by_kind.items():
        times = [o.recovery_s for o in items]
        worst = "never" if None in times else f"{max(t for t in times if t is not None):.1f}"
        print(f"{kind:<24} | {len(items):>5} | {items[0].injected_for_s:>8.1f} | {worst:>16}")
    print(f"\nmessages produced (outbox seq) {produced}, delivered {delivered}, duplicated "
          f"{duplicated}, lost {lost}, still queued {left}, dead letters {dead}")
    for stream, seqs in missing.items():
        if seqs:
            print(f"  missing on {stream}: seq {seqs[:20]}{' …' if len(seqs) > 20 else ''}")
    log = (rig.work / "gateway.log").read_text(errors="replace")
    print(f"outbox store failures logged by the gateway (disk-full fault biting): "
          f"{log.count('outbox store unavailable')}")
    print(f"processes left behind: {len(leftovers)}")
    ok = lost == 0 and not leftovers and all(o.recovery_s is not None for o in outcomes)
    print("INVARIANTS", "HOLD" if ok else "BROKEN")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage", type=float, default=20.0,
                        help="seconds the broker stays unreachable (default 20)")
    parser.add_argument("--settle", type=float, default=8.0,
                        help="seconds between faults and of each timed fault (default 8)")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the schedule")
    parser.add_argument("--recovery-timeout", type=float, default=90.0)
    parser.add_argument("--rate", type=float, default=120.0,
                        help="times the realistic device pace (default 120: many messages)")
    return 0 if asyncio.run(campaign(parser.parse_args())) else 1


if __name__ == "__main__":
    sys.exit(main())
