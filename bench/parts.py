"""What bench/chaos and bench/soak run: one ``Part`` per daemon (gateway, scanner, robot), each
with its simulators, its own faults, its workload and its end-of-run invariants, sharing one
mosquitto, one Orthanc and one hospital subscriber (``Shared``).

A part's daemon runs as its own process (``medge run NAME --config ...``), as under systemd, so
that SIGKILL, prlimit and /proc sampling hit it and nothing else.

How the rig (bench/chaos.py, bench/soak.py) drives a part:

1. ``Part()`` (no arguments; the class is found by ``PARTS`` below and imported lazily).
2. ``start(shared)`` in a worker thread, after the broker, Orthanc and the hospital subscriber
   are up (the subscriber's persistent session has subscribed to ``medge/v1/#``).
3. ``load()`` as a task for the whole campaign; faults from ``faults()`` and the rig's shared
   faults (broker restart, broker unreachable, PACS down) are injected on one interleaved
   schedule. After each fault the rig times ``Recovered`` (own faults) or ``working(ended)``
   of every part (shared faults) with ``--recovery-timeout``.
   ``load()`` must live through every fault, the shared ones too: while the PACS is down
   Orthanc's REST API raises (``urllib.error.URLError``, ``ConnectionError``), while the
   broker is down MQTT clients do; a workload that dies is reported at once
   (``!! load-NAME died: ...``) and fails the run.
4. ``load()`` is cancelled, ``settle(timeout)`` awaited, every outbox drained (the rig waits
   until ``records`` is empty), then ``check()``; ``stop()`` always, even after a failure.

Loss accounting is the rig's: for every outbox (``outbox_path``), every ``seq`` 1..last of every
stream must have reached the hospital subscriber; stream names must differ between parts
(``{device}/{kind}`` by default), which distinct device names give.

Faults receive the campaign's arguments: ``args.settle`` (seconds a timed fault lasts and
between faults), ``args.outage`` (seconds of a long outage), ``args.recovery_timeout``.

Reuse, rather than copy: ``Sim`` (a ``medge sim`` process on a fixed port, to kill and bring
back) and ``DaemonProcess`` (``medge run NAME``, logging into a pipe copied to a file, with
``kill()``/``restart()``/``stop()``) below.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from medge import topics
from medge.localbroker import Mosquitto, free_port, wait_for_port
from medge.localpacs import Orthanc
from medge.telemetry import DEVICE_CLOCK_EXTENSION

Recovered = Callable[[], Awaitable[None]]
"""Returns once the part works again after a fault (e.g. measurements reach the hospital, the
scan job progresses, the robot follows setpoints); the rig times it, with a timeout."""

Fault = Callable[[argparse.Namespace], Awaitable[tuple[Recovered, float]]]
"""Injects one fault and ends it; returns how to see recovery and how long the fault lasted."""

PARTS = {
    "gateway": ("bench.chaos_gateway", "GatewayPart"),
    "scanner": ("bench.chaos_scanner", "ScannerPart"),
    "robot": ("bench.chaos_robot", "RobotPart"),
}
"""Part name -> (module, class); modules are imported only when their part is chosen."""


def available_parts() -> list[str]:
    """The parts whose module exists (the default selection)."""
    return [name for name, (module, _) in PARTS.items() if importlib.util.find_spec(module)]


def make_part(name: str) -> Part:
    if name not in PARTS:
        raise SystemExit(f"unknown part {name!r} (expected some of {', '.join(PARTS)})")
    module, cls = PARTS[name]
    part: Part = getattr(importlib.import_module(module), cls)()
    return part


UNITS = Path(__file__).parents[1] / "systemd"


@functools.cache
def unit_text(daemon: str) -> str:
    """The daemon's systemd unit, read once per bench run (every daemon restart asks)."""
    for unit in (UNITS / f"medge-{daemon}.service", UNITS / f"medge-{daemon}@.service"):
        if unit.exists():
            return unit.read_text()
    return ""


def unit_lines(daemon: str, key: str) -> list[str]:
    """The values of ``key=`` in the daemon's systemd unit, in order."""
    return [line.removeprefix(f"{key}=") for line in unit_text(daemon).splitlines()
            if line.startswith(f"{key}=")]


def unit_nice(daemon: str) -> int:
    """``Nice=`` of the daemon's systemd unit (0 if it sets none): the bench runs a daemon at
    the priority it has when deployed."""
    return int(next(iter(unit_lines(daemon, "Nice")), 0))


def unit_environment(daemon: str) -> dict[str, str]:
    """``Environment=`` of the daemon's unit (``KEY=VALUE`` each; e.g. the microscope's
    ``MALLOC_ARENA_MAX``), which the bench sets as systemd would."""
    return dict(entry.split("=", 1) for line in unit_lines(daemon, "Environment")
                for entry in line.split())


def medge_command(*args: str, nice: int = 0) -> list[str]:
    """``medge ARGS`` with this interpreter, under ``nice -n`` when ``nice`` is set (a
    negative value needs root; otherwise nice(1) says so in the log and runs it unchanged)."""
    command = [sys.executable, "-m", "medge.cli", *args]
    return ["nice", "-n", str(nice), *command] if nice else command


@dataclass
class Sim:
    """A device simulator process (``medge sim NAME``) on a fixed port, so that it can die and
    come back where the daemon expects it. Its output goes to ``log`` (if given)."""

    name: str
    args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    nice: int = 0
    """A simulator standing for a device's own microcontroller gets the daemon's priority: real
    servos are not starved by the host's load."""
    _started: bool = False

    def start(self, *extra: str) -> None:
        """Start it and wait until it listens. The very first start moves to another free
        port if the process exits early (another program took the port meanwhile); later
        starts keep the port, which the daemon's configuration names."""
        for attempt in range(3):
            try:
                self._spawn(extra)
                break
            except RuntimeError:
                if self._started or attempt == 2:
                    raise
                self.port = free_port()
        self._started = True

    def _spawn(self, extra: tuple[str, ...]) -> None:
        with contextlib.ExitStack() as stack:
            output = (subprocess.DEVNULL if self.log is None
                      else stack.enter_context(self.log.open("ab")))
            self.proc = subprocess.Popen(
                medge_command("sim", self.name, "--listen", f"tcp://127.0.0.1:{self.port}",
                              *self.args, *extra, nice=self.nice),
                stdout=output, stderr=output)
        try:
            wait_for_port(self.port, timeout=60, proc=self.proc)  # slow start on a busy box
        except RuntimeError as exc:
            tail = self.log.read_text(errors="replace")[-400:] if self.log else ""
            self.proc = None
            raise RuntimeError(f"simulator {self.name}: {exc}; {tail}") from exc

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, in case a stall fault stopped it); it may be dead already."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    @property
    def url(self) -> str:
        """The pyserial URL the daemon's config names."""
        return f"socket://127.0.0.1:{self.port}"


@dataclass
class DaemonProcess:
    """``medge run NAME --config CONFIG`` as its own process. It logs into a pipe, as under
    systemd (journald), copied to ``log``: a disk-full fault then hits the daemon's own files
    (outbox, spool), not its log."""

    name: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it at its unit's priority (``Nice=``) and environment, as systemd would."""
        self.proc = subprocess.Popen(
            medge_command("run", self.name, "--config", str(self.config),
                          nice=unit_nice(self.name)),
            env={**os.environ, **unit_environment(self.name)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        threading.Thread(target=_copy, args=(self.proc.stdout, self.log), daemon=True).start()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None or self.proc.poll() is not None else self.proc.pid

    def kill(self) -> None:
        """SIGKILL and reap (a power cut, as far as the daemon can tell)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """SIGKILL, then start again at once (as systemd's ``Restart=always`` would)."""
        self.kill()
        self.start()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _copy(source: IO[bytes], path: Path) -> None:
    with path.open("ab") as log:
        for line in source:
            log.write(line)
            log.flush()


@dataclass
class Hospital:
    """The hospital subscriber: a persistent MQTT 5 session (QoS 1) on ``medge/v1/#``, so that
    what the broker queued for it while it reconnected is not lost on its side.

    Counts every outbox message (those with a ``msg_id``) by ``msg_id`` and by (stream, seq),
    keeps the newest message per (device, kind) of every medge topic (outbox or not: live
    state and health too), counts the observations that carry the device's own clock per
    (device time, code) (``device_times``), and wakes ``arrival()`` waiters: the parts'
    recovery probes."""

    port: int
    identifier: str = "chaos-hospital"
    seen: Counter[str] = field(default_factory=Counter)
    """Copies received per ``msg_id``."""
    by_stream: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    stream_of: dict[str, str] = field(default_factory=dict)
    """``msg_id`` -> its stream (per-part delivered/duplicated counts)."""
    latest: dict[tuple[str, str], tuple[float, float, Any]] = field(default_factory=dict)
    """(device, kind) -> (monotonic receipt time, epoch sent, decoded message)."""
    health: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Daemon name -> its newest health body (``tasks``, ``outbox``, ``link``...)."""
    device_times: dict[str, Counter[tuple[str, str]]] = field(
        default_factory=lambda: defaultdict(Counter))
    """Device -> (device clock as published, first code) -> distinct ``obs`` messages (by
    ``msg_id``) whose Observation carries the device-clock extension: one key per reading of
    a device that dates its results (urine strips), none for the oximeter or ventilator."""
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    _waiters: list[tuple[Callable[[str, str, float], bool], asyncio.Future[float]]] = field(
        default_factory=list)

    async def run(self) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=self.identifier,
                                          protocol=aiomqtt.ProtocolVersion.V5,
                                          clean_start=False, properties=properties) as client:
                    await client.subscribe("medge/v1/#", qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        self.take(str(message.topic), bytes(message.payload))
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.5)

    def take(self, topic: str, payload: bytes, now: float | None = None) -> None:
        try:
            _, _, device, kind = topics.parse(topic)
            message = json.loads(payload)
        except ValueError:
            return  # not a medge message, or not JSON (the subscriber does not judge)
        now = time.monotonic() if now is None else now
        sent = _sent_at(message, time.time() - time.monotonic() + now)
        self.latest[(device, kind)] = (now, sent, message)
        if isinstance(message, dict) and "msg_id" in message:
            self.seen[str(message["msg_id"])] += 1
            self.stream_of[str(message["msg_id"])] = str(message["stream"])
            self.by_stream[str(message["stream"])].add(int(message["seq"]))
            if kind == "obs" and self.seen[str(message["msg_id"])] == 1:
                key = _device_clock_key(message.get("body"))
                if key is not None:
                    self.device_times[device][key] += 1
        elif kind == "health" and isinstance(message, dict) and "daemon" in message:
            self.health[str(message["daemon"])] = message
        for waiter in [w for w in self._waiters if w[0](device, kind, sent)]:
            self._waiters.remove(waiter)
            if not waiter[1].done():
                waiter[1].set_result(now)

    async def arrival(self, after: float, device: str | None = None,
                      kind: str | None = "obs") -> float:
        """The receipt time (``time.monotonic()``) of the first message from ``device`` (any if
        None) of ``kind`` (any if None) received after ``after`` and, if it is an outbox
        envelope, sent after ``after`` (its ``sent_at``: a copy the broker held from before the
        fault does not count); waits for it if none yet."""
        return await self.arrival_from(after, None if device is None else {device}, kind)

    async def arrival_from(self, after: float, devices: Collection[str] | None,
                           kind: str | None = "obs") -> float:
        """``arrival`` from any of ``devices`` (any device if None)."""
        after_wall = time.time() - time.monotonic() + after

        def match(device: str, kind_: str, sent: float) -> bool:
            return ((devices is None or device in devices) and kind in (None, kind_)
                    and sent >= after_wall)

        times = [at for (d, k), (at, sent, _) in self.latest.items()
                 if match(d, k, sent) and at > after]
        if times:
            return min(times)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        waiter = (match, future)
        self._waiters.append(waiter)
        try:
            return await future
        finally:
            if waiter in self._waiters:  # cancelled (timed out) before a message came
                self._waiters.remove(waiter)


def _device_clock_key(body: Any) -> tuple[str, str] | None:
    """(the device's own time, the first code) of an Observation body, None without them."""
    if not isinstance(body, dict):
        return None
    times = [e.get("valueDateTime") for e in body.get("extension", ())
             if isinstance(e, dict) and e.get("url") == DEVICE_CLOCK_EXTENSION]
    with contextlib.suppress(AttributeError, IndexError, KeyError, TypeError):
        if isinstance(times[0], str):
            return times[0], str(body["code"]["coding"][0]["code"])
    return None


def _sent_at(message: Any, received: float) -> float:
    """The envelope's ``sent_at`` (epoch s, rounded up to its millisecond), else ``received``."""
    if isinstance(message, dict) and isinstance(message.get("sent_at"), str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(message["sent_at"]).timestamp() + 0.001
    return received


@dataclass(frozen=True)
class Shared:
    """What every part connects to; owned and started by the rig before any part."""

    work: Path
    broker: Mosquitto
    pacs: Orthanc
    rate: float
    """Times the realistic pace (soak: 10; chaos: higher, for many messages)."""
    hospital: Hospital
    """The hospital subscriber (already subscribed): recovery probes wait on its ``arrival``."""


@dataclass(frozen=True)
class Check:
    """One end-of-run invariant, printed as a row of the report."""

    part: str
    name: str
    ok: bool
    detail: str


class Part(Protocol):
    name: str
    """The part's name in ``--parts`` (``gateway``, ``scanner``, ``robot``)."""
    daemon: str
    """The daemon as in ``medge run NAME``: its health messages' ``daemon`` (task counts)."""

    def start(self, shared: Shared) -> None:
        """Start the simulators and the daemon process (blocking until they listen)."""

    def stop(self) -> None:
        """Stop everything this part started, even after a failed start; never raises."""

    def daemon_pid(self) -> int | None:
        """The daemon process, for sampling RSS/fds/threads/CPU; None while it is down."""

    @property
    def outbox_path(self) -> Path:
        """The daemon's outbox file, for draining and loss accounting (by stream and seq)."""

    def faults(self) -> Sequence[tuple[str, Fault]]:
        """This part's own faults, in schedule order (kind, fault)."""

    async def working(self, since: float) -> None:
        """Returns once the part shows it works after ``time.monotonic()`` ``since`` (the same
        sign its own faults' ``Recovered`` waits for); the rig's recovery probe after a shared
        fault (broker restart or outage, PACS down), timed with a timeout."""

    async def load(self) -> None:
        """The workload (scan jobs, teleoperation, ...) until cancelled; tolerates faults."""

    async def settle(self, timeout: float) -> None:
        """Bring the workload to rest at the end of the run: jobs finished or failed, the robot
        disarmed; returns at ``timeout`` at the latest."""

    async def check(self) -> list[Check]:
        """The part's invariants, after ``settle`` and the outbox drain."""
