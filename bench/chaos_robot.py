"""The tele-ultrasound robot as a chaos/soak part (bench/parts.py): the manipulator daemon as its
own process (``medge run manipulator``) against the Dynamixel servo simulator and the load cell
(``medge sim dynamixel`` / ``medge sim force``, two processes), driven by a scripted remote
operator through the real client (:class:`medge.teleop.TeleopClient`).

Witnesses: the servo simulator writes a motion log (``--motion-log``: when each servo starts and
stops moving, its watchdog trips, samples while moving) and the operator a setpoint log (runs of
setpoints as sent: first and last send time, count, dead-man, twist). Both use
``time.monotonic()``, which is one clock for every process on Linux.

The invariant (issue #11): **the robot never moved without a fresh enabled setpoint** — every
interval in which a servo moved lies within [an enabled setpoint's send time, that time +
``stale_s`` + ``stopping_time()``] of the supervisor config the daemon ran with (plus one
control period: the supervisor judges staleness once a cycle). And after each fault injected
mid-motion the robot stopped within that fault's budget.

The camera registration (RGB-D camera) is left out (``camera = "none"``): teleoperation does
not use it, and the simulated camera is an in-process stand-in, not a process of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import json
import math
import os
import signal
import time
import tomllib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from bench.parts import Check, DaemonProcess, Fault, Recovered, Shared, Sim, unit_nice
from daemons.manipulator.daemon import ManipulatorConfig
from daemons.manipulator.kinematics import Twist
from daemons.manipulator.teleop_protocol import RobotTopics
from medge import config
from medge.mqtt import LinkDown
from medge.runtime import outbox_path
from medge.teleop import Broker, RequestTimeout, TeleopClient

LINK_ERRORS = (LinkDown, aiomqtt.MqttError, RequestTimeout, ConnectionError)
"""What the operator's client raises while its link or the daemon is down."""

REPO = Path(__file__).resolve().parent.parent
DEPLOYED = REPO / "config" / "manipulator.toml"
SITE, NODE, ROBOT = "chaos-site", "robot-1", "probe-arm"
OPERATOR, NURSE = "chaos-operator", "chaos-nurse"
SPEED_M_S = 0.02
BURST_S = 3.0
"""How long the operator holds the dead-man per move."""
PAUSE_S = 6.0
"""Realistic pause between moves (divided by ``shared.rate``)."""
RELEASE_S = 0.2
"""Dead-man released (disabled setpoints) before the stream stops."""
DAEMON_ALARMS = frozenset({"control loop stalled", "task failed", "task cancelled"})
"""Events of the manipulator's log that say the daemon itself went wrong."""
MOVE_MIN_S = 1.0
"""Enabled runs at least this long count as moves the robot had to answer."""
DEAD_STRETCH_S = 20.0
"""Moves in a row without motion for longer than this: the robot is dead to its operator
(a daemon reporting "armed" over servos that stopped listening), not a fault's aftermath."""
MOVING_WAIT_S = 30.0
"""How long a fault waits for the robot to be moving before it is injected anyway."""


# --- the logs and the checker (pure functions, tests/test_chaos_robot_check.py) --------------

@dataclass(frozen=True)
class SetpointRun:
    """Setpoints sent back to back with the same dead-man and twist (one line of the log)."""

    first: float
    last: float
    count: int
    enable: bool
    twist: tuple[float, ...]
    max_gap: float


class SetpointLog:
    """The operator's setpoints as JSON lines, one per run: an hour at 100 Hz stays small.

    A run ends when the dead-man or the twist changes or the stream pauses longer than
    ``split_gap_s`` (the stale window: a longer gap would open a hole in the windows the
    checker builds, a shorter one cannot)."""

    def __init__(self, path: Path, split_gap_s: float) -> None:
        self.path = path
        self.split_gap_s = split_gap_s
        self.sent = 0
        self._run: SetpointRun | None = None

    def note(self, at: float, enable: bool, twist: Twist | None) -> None:
        values = (0.0,) * 6 if twist is None else (*twist.linear, *twist.angular)
        run = self._run
        self.sent += 1
        if run is not None and run.enable == enable and run.twist == values \
                and at - run.last <= self.split_gap_s:
            self._run = SetpointRun(run.first, at, run.count + 1, enable, values,
                                    max(run.max_gap, at - run.last))
            return
        self.close_run()
        self._run = SetpointRun(at, at, 1, enable, values, 0.0)

    def close_run(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            with self.path.open("a", encoding="utf-8") as log:
                log.write(json.dumps({"first": round(run.first, 6), "last": round(run.last, 6),
                                      "n": run.count, "enable": run.enable,
                                      "twist": list(run.twist),
                                      "max_gap": round(run.max_gap, 6)}) + "\n")


def read_setpoint_runs(lines: Iterable[str]) -> list[SetpointRun]:
    runs = []
    for line in lines:
        if line.strip():
            record = json.loads(line)
            runs.append(SetpointRun(record["first"], record["last"], record["n"],
                                    record["enable"], tuple(record["twist"]), record["max_gap"]))
    return runs


@dataclass(frozen=True)
class Motion:
    """What the motion log shows: intervals in which any servo moved, and watchdog trips."""

    intervals: list[tuple[float, float]]
    trips: list[float]
    """Times at which a servo's Bus Watchdog tripped."""
    segments: int
    """Simulator processes that wrote to the log (a restart appends a new segment)."""


def read_motion(lines: Iterable[str], join_s: float = 0.0) -> Motion:
    """Intervals from the first step any servo moved to the first step none did, joined across
    pauses up to ``join_s`` (a servo reaching each cycle's goal early waits for the next one:
    that is still one motion); a segment that ends mid-motion (the simulator killed) ends its
    interval at its last line."""
    intervals: list[tuple[float, float]] = []
    trips: list[float] = []
    segments = 0
    started: float | None = None
    last_t = segment_start = 0.0
    tripped: list[int] = []
    for line in lines:
        if not line.strip():
            continue
        record = json.loads(line)
        t = float(record["t"])
        if record["event"] == "open":
            if started is not None:
                intervals.append((started, last_t))
            started, tripped, segments, segment_start = None, [], segments + 1, t
        else:
            moving = any(record["moving"])
            if moving and started is None:
                same_motion = bool(intervals) and segment_start < intervals[-1][0] \
                    and t - intervals[-1][1] <= join_s
                started = intervals.pop()[0] if same_motion else t
            elif not moving and started is not None:
                intervals.append((started, t))
                started = None
            now_tripped = record["tripped"]
            if any(b and not a for a, b in zip(tripped or [0] * len(now_tripped), now_tripped,
                                               strict=True)):
                trips.append(t)
            tripped = now_tripped
        last_t = t
    if started is not None:
        intervals.append((started, last_t))
    return Motion(intervals, trips, segments)


def windows(runs: Iterable[SetpointRun], allowed_s: float) -> list[tuple[float, float]]:
    """Merged [send time, send time + allowed] of every enabled setpoint (runs never hold a gap
    longer than the window, so a run's union is [first, last + allowed])."""
    spans = sorted((run.first, run.last + allowed_s) for run in runs if run.enable)
    merged: list[tuple[float, float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def uncovered(interval: tuple[float, float], allowed: Sequence[tuple[float, float]]) -> float:
    """Seconds of ``interval`` outside every window of ``allowed`` (merged, sorted)."""
    start, end = interval
    outside = end - start
    first = max(0, bisect.bisect_right(allowed, (start, math.inf)) - 1)
    for w_start, w_end in allowed[first:]:
        if w_start >= end:
            break
        outside -= max(0.0, min(end, w_end) - max(start, w_start))
    return max(0.0, outside)


@dataclass(frozen=True)
class Verdict:
    intervals: int
    violations: int
    """Intervals with more than ``tolerance`` seconds outside the windows."""
    worst_excess_s: float
    worst_at: float | None


def judge(motion: Motion, runs: Iterable[SetpointRun], allowed_s: float,
          tolerance_s: float) -> Verdict:
    """Every motion interval within the windows of the enabled setpoints."""
    allowed = windows(runs, allowed_s)
    worst, worst_at, violations = 0.0, None, 0
    for interval in motion.intervals:
        excess = uncovered(interval, allowed)
        if excess > tolerance_s:
            violations += 1
        if excess > worst:
            worst, worst_at = excess, interval[0]
    return Verdict(len(motion.intervals), violations, worst, worst_at)


def unanswered(motion: Motion, runs: Iterable[SetpointRun], min_run_s: float,
               allowed_s: float) -> tuple[int, float]:
    """Moves the robot did not make: enabled runs of at least ``min_run_s`` with no motion in
    [first, last + allowed]; returns their count and the longest stretch of them back to back
    (first send of the first to last send of the last), the robot dead to its operator."""
    count, longest = 0, 0.0
    stretch: float | None = None
    for run in sorted((r for r in runs if r.enable and r.last - r.first >= min_run_s),
                      key=lambda r: r.first):
        moved = any(start <= run.last + allowed_s and end >= run.first
                    for start, end in motion.intervals)
        if moved:
            stretch = None
            continue
        count += 1
        stretch = run.first if stretch is None else stretch
        longest = max(longest, run.last - stretch)
    return count, longest


def stop_delay(motion: Motion, at: float) -> float | None:
    """Seconds from ``at`` until the motion under way at ``at`` ended; None if none was."""
    for start, end in motion.intervals:
        if start <= at <= end:
            return end - at
    return None


# --- the operator's network ------------------------------------------------------------------

class CuttableLink:
    """A TCP relay between the operator and the broker whose connections can be cut at once
    (``cut``: both sides reset, nothing more delivered), as a dropped network would: whatever
    the MQTT client does, it gets no chance to say goodbye."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._relays: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CuttableLink:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        await asyncio.gather(*self._relays, return_exceptions=True)  # ended by the cut
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self) -> None:
        self.cuts += 1
        for pair in self._pairs:
            for writer in pair:
                writer.transport.abort()
        self._pairs.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay = asyncio.current_task()
        assert relay is not None
        self._relays.add(relay)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            self._relays.discard(relay)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        except asyncio.CancelledError:
            pass  # torn down with the event loop: asyncio 3.11 would log it as an error
        finally:
            self._pairs.discard(pair)
            self._relays.discard(relay)
            for side in pair:
                side.transport.abort()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    sink.transport.abort()


# --- the part --------------------------------------------------------------------------------

@dataclass
class FaultStop:
    """A fault injected mid-motion and the time the robot had to stop after it."""

    kind: str
    at: float
    budget_s: float | None
    """None: no stop budget (the servos lost power with their simulator)."""
    needs_trip: bool = False
    """The servos' Bus Watchdog must have tripped (the daemon died)."""
    was_moving: bool = True
    failed: str | None = None
    """The fault could not be injected (why)."""


@dataclass
class Workload:
    moves: int = 0
    arms: Counter[str] = field(default_factory=Counter)
    resets: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    daemon_restarts: int = 0
    """Unexpected exits of the daemon, restarted (as systemd would)."""
    estops_seen: Counter[str] = field(default_factory=Counter)


class RobotPart:
    name = "robot"
    daemon = "manipulator"

    def __init__(self) -> None:
        self.work = Path()
        self.sims: dict[str, Sim] = {}
        self.proc: DaemonProcess | None = None
        self.cfg: ManipulatorConfig | None = None
        self.shared: Shared | None = None
        self.setpoints: SetpointLog | None = None
        self.stops: list[FaultStop] = []
        self.tally = Workload()
        self._op: TeleopClient | None = None
        self._network: CuttableLink | None = None
        self._hold_estop = False
        """A nurse pressed the E-stop: the operator waits before resetting."""
        self._settling = False
        self._tail_offset = 0
        self._tail_moving = False
        self._last_start = -math.inf

    # --- processes -----------------------------------------------------------------------

    @property
    def motion_log(self) -> Path:
        return self.work / "motion.jsonl"

    @property
    def setpoint_log(self) -> Path:
        return self.work / "setpoints.jsonl"

    @property
    def outbox_path(self) -> Path:
        return outbox_path(self.work / "state", self.daemon)

    def start(self, shared: Shared) -> None:
        self.shared = shared
        self.work = shared.work / self.name
        (self.work / "state").mkdir(parents=True, exist_ok=True)
        servo_priority = unit_nice(self.daemon)  # the servos and load cell have their own MCUs
        self.sims = {
            "bus": Sim("dynamixel", ("--motion-log", str(self.motion_log),
                                     "--motion-log-every", "0.25"),
                       log=self.work / "sim-dynamixel.log", nice=servo_priority),
            "force": Sim("force", ("--force", "2.0"), log=self.work / "sim-force.log",
                         nice=servo_priority),
        }
        for sim in self.sims.values():
            sim.start()
        path = self.work / "manipulator.toml"
        path.write_text(self._config_text(shared.broker.port))
        self.cfg = config.load(path, ManipulatorConfig)
        self.setpoints = SetpointLog(self.setpoint_log, self.allowed_s)
        self.proc = DaemonProcess(self.daemon, path, self.work / "manipulator.log")
        self.proc.start()
        deadline = time.monotonic() + 60
        while "manipulator started" not in self.proc.log_text():
            if self.proc.pid is None or time.monotonic() > deadline:
                raise RuntimeError(f"the manipulator did not start: {self.proc.log}")
            time.sleep(0.1)

    def _config_text(self, broker_port: int) -> str:
        """The deployed config (config/manipulator.toml: supervisor numbers, watchdog, rates)
        pointed at this rig's broker and simulators."""
        deployed = tomllib.loads(DEPLOYED.read_text())
        section = deployed["manipulator"]
        supervisor = "\n".join(f"{key} = {value!r}" for key, value in
                               section["supervisor"].items())
        return (f'[node]\nsite = "{SITE}"\nnode = "{NODE}"\nstate_dir = "{self.work}/state"\n\n'
                f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\n'
                f"reconnect_min = 0.5\nreconnect_max = 2.0\n"
                f"keepalive = {deployed['mqtt']['keepalive']}\n\n"
                f'[manipulator]\nrobot = "{ROBOT}"\nbus = "{self.sims["bus"].url}"\n'
                f'force_sensor = "{self.sims["force"].url}"\n'
                f"watchdog_s = {section['watchdog_s']!r}\n"
                f"state_rate_hz = {section['state_rate_hz']!r}\n\n"
                f"[manipulator.supervisor]\n{supervisor}\n\n"
                f'[manipulator.registration]\ncamera = "none"\n')

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.setpoints is not None:
                self.setpoints.close_run()
        with contextlib.suppress(Exception):
            if self.proc is not None:
                self.proc.stop()
        for sim in self.sims.values():
            with contextlib.suppress(Exception):
                sim.kill()

    def daemon_pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    # --- numbers from the config the daemon ran with -------------------------------------

    @property
    def config(self) -> ManipulatorConfig:
        if self.cfg is None:
            raise RuntimeError("robot part not started")
        return self.cfg

    @property
    def allowed_s(self) -> float:
        """How long motion may last after an enabled setpoint was sent."""
        supervisor = self.config.manipulator.supervisor
        return supervisor.stale_s + supervisor.stopping_time()

    @property
    def tolerance_s(self) -> float:
        """The supervisor judges staleness once a control period."""
        return self.config.manipulator.supervisor.period_s

    @property
    def setpoint_period_s(self) -> float:
        return self.config.manipulator.supervisor.setpoint_period_s

    # --- the operator --------------------------------------------------------------------

    def _client(self, operator: str, port: int | None = None) -> TeleopClient:
        assert self.shared is not None
        return TeleopClient(Broker(port=port or self.shared.broker.port),
                            RobotTopics(SITE, NODE, ROBOT), operator)

    async def load(self) -> None:
        """Arm, hold the dead-man and move for a few seconds, release, pause, repeat; after a
        fault reconnect, reset and re-arm. Also restarts the daemon if it exits on its own.
        The operator reaches the broker through a relay that the link-drop fault cuts."""
        assert self.setpoints is not None and self.shared is not None
        pause = PAUSE_S / max(self.shared.rate, 1e-3)
        async with CuttableLink(self.shared.broker.port) as network:
            self._network = network
            try:
                while True:
                    with contextlib.suppress(*LINK_ERRORS):
                        async with self._client(OPERATOR, network.port) as op:
                            self._op = op
                            await self._operate(op, pause)
                    self._op = None
                    self.setpoints.close_run()
                    self.tally.reconnects += 1
                    await asyncio.sleep(1.0)
            finally:
                self._op = self._network = None
                self.setpoints.close_run()

    async def _operate(self, op: TeleopClient, pause: float) -> None:
        while True:
            self._keep_daemon()
            if self._settling:
                await asyncio.sleep(0.2)
            elif await self._ready(op):
                await self._move(op)
                await asyncio.sleep(pause)
            else:
                await asyncio.sleep(0.5)

    def _keep_daemon(self) -> None:
        proc = self.proc
        if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
            self.tally.daemon_restarts += 1
            proc.start()

    async def _ready(self, op: TeleopClient) -> bool:
        """Armed with our lease; resets an E-stop (unless a nurse holds it) and arms."""
        state = op.state
        if state is None or time.time() - float(state.get("at", 0)) > 1.0:
            return False  # the daemon is down or the link is
        try:
            if state["state"] == "estop":
                for reason in state["reasons"]:
                    if reason.startswith("estop"):
                        self.tally.estops_seen[reason] += 1
                if self._hold_estop:
                    return False
                reply = await op.reset()
                self.tally.resets[reply.reason] += 1
                if not reply.ok:
                    return False
            if state["state"] != "armed" or state["lease"] != OPERATOR:
                reply = await op.arm()
                self.tally.arms[reply.reason] += 1
                return reply.ok
        except (RequestTimeout, LinkDown):
            return False  # the daemon or the link is down: try again later
        return True

    async def _move(self, op: TeleopClient) -> None:
        """One move away from the nearer edge, then the dead-man released."""
        state = op.state or {}
        tip = state.get("pose", {}).get("tip", [0.0, 0.0, 0.0])
        axis = self.tally.moves % 2
        linear = [0.0, 0.0, 0.0]
        linear[axis] = -math.copysign(SPEED_M_S, tip[axis]) if tip[axis] else SPEED_M_S
        self.tally.moves += 1
        await self._stream(op, True, Twist((linear[0], linear[1], 0.0), (0.0, 0.0, 0.0)),
                           BURST_S)
        await self._stream(op, False, None, RELEASE_S)

    async def _stream(self, op: TeleopClient, enable: bool, twist: Twist | None,
                      seconds: float) -> None:
        """Setpoints at the rate the supervisor expects; stops early if the robot is no longer
        armed for us (E-stop, lost lease, daemon gone) or the campaign settles."""
        assert self.setpoints is not None
        loop = asyncio.get_running_loop()
        period = self.setpoint_period_s
        end = loop.time() + seconds
        next_at = loop.time()
        sent = 0
        while loop.time() < end and not self._settling:
            at = time.monotonic()  # before the publish: receipt is later
            await op.send_setpoint(enable, twist)
            self.setpoints.note(at, enable, twist)
            sent += 1
            if enable and sent % 10 == 0:
                state = op.state or {}
                if state.get("state") != "armed" or state.get("lease") != OPERATOR:
                    break
            next_at = max(next_at + period, loop.time())
            await asyncio.sleep(next_at - loop.time())
        self.setpoints.close_run()

    async def settle(self, timeout: float) -> None:
        """The operator releases the dead-man and disarms; the robot comes to rest."""
        self._settling = True
        with contextlib.suppress(TimeoutError, *LINK_ERRORS):
            async with asyncio.timeout(timeout), self._client(OPERATOR) as op:
                while True:
                    with contextlib.suppress(RequestTimeout, LinkDown):
                        reply = await op.disarm()
                        if reply.ok or reply.reason in ("not_armed", "foreign_operator"):
                            await op.wait_state(lambda s: s["state"] != "armed"
                                                and not s["moving"], timeout=5)
                            return
                    await asyncio.sleep(0.5)

    # --- recovery ------------------------------------------------------------------------

    async def working(self, since: float) -> None:
        """The robot follows setpoints: the motion log shows a servo starting to move after
        ``since`` (``time.monotonic()``)."""
        while self._read_motion_starts() <= since:
            await asyncio.sleep(0.1)

    def _read_motion_starts(self) -> float:
        """The latest motion start in the log (read incrementally: an hour's log is not read
        again every 100 ms)."""
        with contextlib.suppress(FileNotFoundError), self.motion_log.open("rb") as log:
            log.seek(self._tail_offset)
            data = log.read()
            complete = data.rfind(b"\n") + 1
            self._tail_offset += complete
            for line in data[:complete].splitlines():
                record = json.loads(line)
                moving = record["event"] != "open" and any(record["moving"])
                if moving and not self._tail_moving:
                    self._last_start = float(record["t"])
                self._tail_moving = moving
        return self._last_start

    def _recovered(self) -> Recovered:
        ended = time.monotonic()

        async def recovered() -> None:
            await self.working(ended)
        return recovered

    # --- faults --------------------------------------------------------------------------

    def faults(self) -> Sequence[tuple[str, Fault]]:
        return [("SIGKILL manipulator", self._sigkill),
                ("servo bus unplug/replug", self._unplug),
                ("stalled servo bus", self._stall),
                ("operator link drop", self._link_drop),
                ("corrupt+dropped bus bytes", self._noisy_bus),
                ("E-stop mid-motion", self._estop)]

    def _note_stop(self, stop: FaultStop) -> None:
        """Kept for the check, and written to ``faults.jsonl`` for a post-mortem."""
        self.stops.append(stop)
        with (self.work / "faults.jsonl").open("a", encoding="utf-8") as log:
            log.write(json.dumps(dataclasses.asdict(stop)) + "\n")

    async def _mid_motion(self) -> bool:
        """Wait until the servos move for the operator (the motion log's newest line says so:
        under load a move is stop-and-go), then return True; False if not within a while."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MOVING_WAIT_S):
                while True:
                    self._read_motion_starts()
                    state = self._op.state if self._op is not None else None
                    if self._tail_moving and state is not None and state["state"] == "armed" \
                            and state["lease"] == OPERATOR:
                        return True
                    await asyncio.sleep(0.005)
        return False

    async def _sigkill(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        """The daemon dies mid-motion: the servos' Bus Watchdog must stop them."""
        assert self.proc is not None
        moving = await self._mid_motion()
        at = time.monotonic()
        self.proc.kill()
        self._note_stop(FaultStop("SIGKILL manipulator", at,
                                    self.config.manipulator.watchdog_s, True, moving))
        self.proc.start()
        return self._recovered(), 0.0

    async def _unplug(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        """The servo bus cable pulled mid-motion (the simulator process killed), plugged back
        after ``--settle`` s on the same port."""
        moving = await self._mid_motion()
        sim = self.sims["bus"]
        at = time.monotonic()
        sim.kill()
        self._note_stop(FaultStop("servo bus unplug/replug", at, None, False, moving))
        await asyncio.sleep(args.settle)
        await asyncio.to_thread(sim.start)
        return self._recovered(), float(args.settle)

    async def _stall(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        """The bus hangs mid-motion (SIGSTOP of the simulator): the servos hear nothing, so
        their watchdog stops them (in simulation time, once the process runs again)."""
        moving = await self._mid_motion()
        sim = self.sims["bus"]
        assert sim.proc is not None
        at = time.monotonic()
        os.kill(sim.proc.pid, signal.SIGSTOP)
        self._note_stop(FaultStop("stalled servo bus", at, self.config.manipulator.watchdog_s,
                                    True, moving))
        await asyncio.sleep(args.settle)
        os.kill(sim.proc.pid, signal.SIGCONT)
        return self._recovered(), float(args.settle)

    async def _noisy_bus(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        """Corrupted and dropped bytes from the servos for 2 x ``--settle`` s (the simulator
        restarted with ``--corrupt-rate``/``--drop-rate``), then a clean bus again."""
        sim = self.sims["bus"]
        await self._mid_motion()
        sim.kill()
        await asyncio.to_thread(sim.start, "--corrupt-rate", "0.002", "--drop-rate", "0.002",
                                "--seed", "11")
        await asyncio.sleep(args.settle * 2)
        await self._mid_motion()
        sim.kill()
        await asyncio.to_thread(sim.start)
        return self._recovered(), float(args.settle * 2)

    async def _link_drop(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        """The operator's network dies mid-motion (the relay resets both sides): no release,
        no disconnect; the supervisor must stop the robot on its own."""
        moving = await self._mid_motion()
        at = time.monotonic()
        if self._network is not None:
            self._network.cut()
        self._note_stop(FaultStop("operator link drop", at, self.allowed_s, False, moving))
        return self._recovered(), 0.0

    async def _estop(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        """A nurse presses the E-stop mid-motion (the operator still holds the dead-man); the
        operator resets and re-arms ``--settle`` s later."""
        moving = await self._mid_motion()
        self._hold_estop = True
        try:
            async with self._client(NURSE) as nurse:
                at = time.monotonic()
                reply = await nurse.estop()
                executed = time.monotonic()  # the daemon latched it before it answered
            stopping = self.config.manipulator.supervisor.stopping_time()
            self._note_stop(FaultStop("E-stop mid-motion", at, executed - at + stopping,
                                        False, moving,
                                        None if reply.ok else f"refused: {reply.reason}"))
            await asyncio.sleep(args.settle)
        except LINK_ERRORS as exc:
            self._note_stop(FaultStop("E-stop mid-motion", time.monotonic(), None, False,
                                        moving, f"not delivered: {exc!r}"))
        finally:
            self._hold_estop = False
        return self._recovered(), float(args.settle)

    # --- the invariants ------------------------------------------------------------------

    async def check(self) -> list[Check]:
        if self.setpoints is not None:
            self.setpoints.close_run()
        motion = read_motion(_lines(self.motion_log), join_s=2 * self.tolerance_s)
        runs = read_setpoint_runs(_lines(self.setpoint_log))
        verdict = judge(motion, runs, self.allowed_s, self.tolerance_s)
        checks = [
            Check(self.name, "robot moved only within a fresh enabled setpoint's window",
                  verdict.violations == 0 and verdict.intervals > 0,
                  f"{verdict.intervals} motion intervals, {verdict.violations} outside "
                  f"[setpoint, +{self.allowed_s * 1000:.0f} ms] by more than "
                  f"{self.tolerance_s * 1000:.0f} ms; worst excess "
                  f"{verdict.worst_excess_s * 1000:.1f} ms; {sum(r.count for r in runs)} "
                  f"setpoints in {len(runs)} runs"),
        ]
        dead, longest = unanswered(motion, runs, MOVE_MIN_S, self.allowed_s)
        checks.append(Check(
            self.name, "robot answered its operator (no long stretch of moves without motion)",
            longest <= DEAD_STRETCH_S,
            f"{dead} of {sum(1 for r in runs if r.enable and r.last - r.first >= MOVE_MIN_S)} "
            f"moves of >= {MOVE_MIN_S:.0f} s without motion; longest stretch {longest:.1f} s "
            f"(limit {DEAD_STRETCH_S:.0f} s)"))
        checks += [self._check_stop(stop, motion) for stop in self.stops]
        checks.append(self._check_daemon_log())
        tally = self.tally
        checks.append(Check(
            self.name, "operator workload", tally.moves > 0,
            f"{tally.moves} moves; arms {dict(tally.arms)}; resets {dict(tally.resets)}; "
            f"E-stops seen {dict(tally.estops_seen)}; {tally.reconnects} reconnects; "
            f"{tally.daemon_restarts} unexpected daemon exits; {motion.segments} simulator "
            f"runs"))
        return checks

    def _check_daemon_log(self) -> Check:
        """The daemon's own alarms about itself: a stalled control loop, a task that died."""
        alarms: Counter[str] = Counter()
        first: dict[str, object] = {}
        for line in _lines(self.work / "manipulator.log"):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") in DAEMON_ALARMS:
                    alarms[record["event"]] += 1
                    first.setdefault("first", {k: record.get(k) for k in
                                               ("event", "task", "error", "awaiting", "timestamp")})
        return Check(self.name, "control loop never stalled, no daemon task died", not alarms,
                     f"{dict(alarms)}; {first.get('first')}" if alarms else "none")

    def _check_stop(self, stop: FaultStop, motion: Motion) -> Check:
        name = f"stopped after {stop.kind}"
        if stop.failed is not None:
            return Check(self.name, name, False, stop.failed)
        if not stop.was_moving:
            return Check(self.name, name, True, "not injected mid-motion (robot was not moving)")
        delay = stop_delay(motion, stop.at)
        if stop.budget_s is None:
            return Check(self.name, name, True, "servos powered off with their simulator"
                         + ("" if delay is None else f" ({delay * 1000:.0f} ms later)"))
        budget = stop.budget_s + self.tolerance_s
        detail = ("not moving at the fault" if delay is None
                  else f"stopped {delay * 1000:.0f} ms after (budget {budget * 1000:.0f} ms)")
        ok = delay is None or delay <= budget
        if stop.needs_trip:
            tripped = [t for t in motion.trips if stop.at <= t <= stop.at + budget]
            ok = ok and bool(tripped)
            detail += ("; watchdog tripped "
                       f"{(tripped[0] - stop.at) * 1000:.0f} ms after" if tripped
                       else "; no watchdog trip logged")
        return Check(self.name, name, ok, detail)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []
