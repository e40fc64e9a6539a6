"""The manipulator's control loop: one Sync Read, the safety supervisor, one Sync Write per cycle.

The loop owns the servos and the :class:`~daemons.manipulator.supervisor.Supervisor`; the
teleoperation daemon composes it, feeding :meth:`ControlLoop.submit` with setpoints stamped at
receipt and forwarding arm / disarm / E-stop / reset requests. Every cycle the servos' Bus
Watchdog is refreshed by the traffic itself, so if this process freezes the servos stop on
their own after ``watchdog_s`` — the second line of defence behind the supervisor.

Cycles are scheduled on absolute deadlines (no drift) and the lateness of each cycle start is
kept, so the period jitter can be reported (p50 / p99) on the state topic and in the bench.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import structlog

from daemons.manipulator.kinematics import HolderKinematics
from daemons.manipulator.supervisor import (
    CycleOutput,
    Decision,
    Reason,
    Setpoint,
    Supervisor,
    SupervisorConfig,
)
from drivers.dynamixel import JointServos, ServoState
from drivers.dynamixel_protocol import DynamixelError
from drivers.force_sensor import ForceReading
from medge.log import StateLog

log = structlog.get_logger(__name__)

CycleListener = Callable[[CycleOutput, Sequence[ServoState]], None]


@dataclass(frozen=True)
class LoopStats:
    cycles: int
    overruns: int
    """Cycles that started a whole period late (skipped deadlines)."""
    jitter_p50_s: float
    jitter_p99_s: float
    jitter_max_s: float
    cycle_p50_s: float
    """Time from cycle start to the Sync Write handed to the link."""
    cycle_p99_s: float
    cycle_max_s: float


WATCHDOG_READ_EVERY = 10
"""Cycles between reads of the servos' own watchdog state (100 ms at 100 Hz; one small Sync
Read, so the bus load grows by a few percent)."""

STATS_WINDOW = 60_000
"""Cycles the loop statistics cover: ten minutes at 100 Hz."""


class RecentSamples:
    """The last ``size`` values, in a buffer filled once at start: the statistics take their
    memory when the daemon starts, not over a session's first ten minutes. (A deque of
    Python floats, and later lists of them sorted for the percentiles, grew the daemon's RSS
    by ~4 MB there, which the soak could not tell from a leak.)"""

    def __init__(self, size: int) -> None:
        self._buffer = np.empty(size)
        self._buffer.fill(0.0)  # touched now, so resident now
        self._written = 0

    def append(self, value: float) -> None:
        self._buffer[self._written % len(self._buffer)] = value
        self._written += 1

    def values(self) -> npt.NDArray[np.float64]:
        """A copy of the samples held, in no particular order (statistics need none)."""
        return self._buffer[:min(self._written, len(self._buffer))].copy()


def _summary(values: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    """p50, p99 (linear interpolation) and the maximum; zeros without samples."""
    if not len(values):
        return 0.0, 0.0, 0.0
    p50, p99 = np.quantile(values, (0.50, 0.99))
    return float(p50), float(p99), float(values.max())


class ControlLoop:
    """Servos + kinematics + supervisor, stepped every ``config.period_s``."""

    def __init__(
        self,
        servos: JointServos,
        kinematics: HolderKinematics,
        force_source: Callable[[], ForceReading | None],
        config: SupervisorConfig | None = None,
        *,
        watchdog_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or SupervisorConfig()
        if watchdog_s and watchdog_s <= 2 * self.config.period_s:
            raise ValueError(f"watchdog_s {watchdog_s} must exceed two control periods")
        self.servos = servos
        self.kinematics = kinematics
        self.force_source = force_source
        self.watchdog_s = watchdog_s
        self.clock = clock
        self.listeners: list[CycleListener] = []
        self.last_output: CycleOutput | None = None
        self.last_cycle_at: float | None = None
        """``clock()`` at the end of the last cycle: the daemon watches it for a stalled loop."""
        self.last_states: list[ServoState] = []
        self._supervisor: Supervisor | None = None
        self._lateness = RecentSamples(STATS_WINDOW)
        self._cycle_times = RecentSamples(STATS_WINDOW)
        self._overruns = 0
        self._last_bus_traffic: float | None = None
        """When the servos last heard from us (their watchdog counts from there)."""
        self._cycles_since_watchdog_read = 0
        self._bus_log = StateLog(log, "servo bus")
        self._watchdog_log = StateLog(log, "servo watchdog")
        self._wake = asyncio.Event()
        self._turn = asyncio.Lock()
        """Held by a cycle and by a reset: no cycle may write the supervisor's old goal between
        a reset's torque enable and its re-base on where the servos stand."""
        self.min_gap_s = self.config.period_s / 4
        """Closest spacing of cycles brought forward by :meth:`wake` (bus load stays bounded
        however fast setpoints arrive)."""

    @property
    def supervisor(self) -> Supervisor:
        if self._supervisor is None:
            raise RuntimeError("control loop not started")
        return self._supervisor

    def measured_joints(self) -> tuple[float, ...]:
        return self.kinematics.servo_to_joints([s.position_rad for s in self.last_states])

    async def start(self) -> None:
        """Enable the servos (watchdog armed) and start the supervisor from where they stand."""
        await self.servos.enable(watchdog_s=self.watchdog_s)
        self.last_states = await self.servos.read_states()
        self._last_bus_traffic = self.clock()
        self.servos.take_longest_silence()  # before the watchdog was armed: does not count
        self._supervisor = Supervisor(self.kinematics, self.measured_joints(), self.config,
                                      clock=self.clock)

    async def cycle(self) -> CycleOutput:
        """Read all states, run the supervisor, write all goals."""
        async with self._turn:
            return await self._cycle()

    async def _cycle(self) -> CycleOutput:
        started = self.clock()
        supervisor = self.supervisor
        self._check_watchdog_gap(started)
        read_ok = False
        try:
            self.last_states = await self.servos.read_states()
        except DynamixelError as exc:
            self._bus_failed(exc)
        else:
            self._last_bus_traffic = self.clock()
            read_ok = True
        self._check_bus_silence()
        output = supervisor.step(self.force_source(), [s.hardware_error for s in self.last_states])
        try:
            await self.servos.write_goals(self.kinematics.joints_to_servo(output.joint_goals))
        except DynamixelError as exc:
            self._bus_failed(exc)
        else:
            if read_ok:  # a write alone (no reply) does not show the servos answer again
                self._bus_log.set("ok")
        self.last_cycle_at = self.clock()
        self._cycle_times.append(self.last_cycle_at - started)
        self.last_output = output
        for listener in self.listeners:
            listener(output, self.last_states)
        if read_ok:  # last: the extra read never delays a setpoint's way to the servos
            await self._check_servo_watchdogs()
        return output

    def _check_watchdog_gap(self, now: float) -> None:
        """A gap in our bus traffic longer than (nearly) the servos' watchdog means they have
        tripped: they stopped on their own and ignore goals until re-enabled (a reset)."""
        last = self._last_bus_traffic
        silent = 0.0 if last is None else now - last
        if not self._watchdog_tripped(silent) and self._watchdog_log.state == "gap":
            self._watchdog_log.set("heard again")

    def _check_bus_silence(self) -> None:
        """The same, measured between the packets themselves: the whole process may freeze
        while a cycle waits for its reply (the next cycle then starts on time, and the servos
        have tripped all the same)."""
        self._watchdog_tripped(self.servos.take_longest_silence())

    async def _check_servo_watchdogs(self) -> None:
        """Ask the servos, every ``WATCHDOG_READ_EVERY`` cycles, whether their watchdog has
        tripped: the chaos campaign saw all five trip while every packet left on time (the bus
        simulator fell behind after a restart) and the daemon armed and commanded, for two
        minutes, servos that ignored it."""
        self._cycles_since_watchdog_read += 1
        if not self.watchdog_s or self._cycles_since_watchdog_read < WATCHDOG_READ_EVERY:
            return
        self._cycles_since_watchdog_read = 0
        try:
            tripped = await self.servos.tripped_watchdogs()
        except DynamixelError as exc:
            self._bus_failed(exc)
            return
        self._last_bus_traffic = self.clock()
        if tripped:
            self._watchdog_log.set("tripped", level="error", servos=tripped)
            self.supervisor.estop(Reason.ESTOP_SERVO_WATCHDOG)
        elif self._watchdog_log.state == "tripped":
            self._watchdog_log.set("heard again")

    def _watchdog_tripped(self, silent_s: float) -> bool:
        """``silent_s`` without a packet trips the servos' watchdog: latch the E-stop, logged
        once per gap (with the bus down it lasts until the bus answers again)."""
        if not self.watchdog_s or silent_s <= self.watchdog_s * 0.8:
            return False
        self._watchdog_log.set("gap", level="error", silent_s=round(silent_s, 3),
                               watchdog_s=self.watchdog_s)
        self.supervisor.estop(Reason.ESTOP_SERVO_WATCHDOG)
        return True

    def _bus_failed(self, error: DynamixelError) -> None:
        """The bus is the robot's only brake we control: losing it latches the E-stop."""
        self._bus_log.set("failed", level="error", error=str(error))
        self.supervisor.estop(Reason.ESTOP_SERVO_LINK)

    async def run(self) -> None:
        """Cycle on absolute deadlines until cancelled; :meth:`wake` brings a cycle forward."""
        loop = asyncio.get_running_loop()
        period = self.config.period_s
        deadline = loop.time()
        woken = False
        while True:
            if not woken:  # jitter is the timer's lateness; a woken cycle has no deadline
                lateness = loop.time() - deadline
                self._lateness.append(lateness)
                if lateness > period:
                    self._overruns += 1
                    deadline += period * int(lateness // period)  # skip, never burst
            started = loop.time()
            await self.cycle()
            deadline += period
            woken = await self._woken_before(deadline)
            if woken:
                # a fresh setpoint: cycle now (but never closer than min_gap to the last one)
                # and count the period from this cycle, so the loop follows the operator's
                # stream instead of adding up to a whole period of waiting to every command
                await asyncio.sleep(max(0.0, started + self.min_gap_s - loop.time()))
                deadline = loop.time()

    def wake(self) -> None:
        """Run the next cycle as soon as allowed (called when a fresh setpoint arrives)."""
        self._wake.set()

    async def _woken_before(self, deadline: float) -> bool:
        try:
            async with asyncio.timeout_at(deadline):
                await self._wake.wait()
        except TimeoutError:
            return False
        self._wake.clear()  # cleared only once seen: a wake during a cycle is not lost
        return True

    def stats(self) -> LoopStats:
        cycles = self._cycle_times.values()
        jitter_p50, jitter_p99, jitter_max = _summary(self._lateness.values())
        cycle_p50, cycle_p99, cycle_max = _summary(cycles)
        return LoopStats(
            cycles=len(cycles), overruns=self._overruns,
            jitter_p50_s=jitter_p50, jitter_p99_s=jitter_p99, jitter_max_s=jitter_max,
            cycle_p50_s=cycle_p50, cycle_p99_s=cycle_p99, cycle_max_s=cycle_max,
        )

    # --- requests from the teleoperation daemon -------------------------------------------

    def submit(self, setpoint: Setpoint) -> Reason:
        return self.supervisor.submit(setpoint)

    def arm(self, operator: str) -> Decision:
        return self.supervisor.arm(operator, self.measured_joints())

    def disarm(self, operator: str) -> Decision:
        return self.supervisor.disarm(operator)

    def estop(self, reason: Reason = Reason.ESTOP_COMMAND) -> None:
        self.supervisor.estop(reason)

    async def reset(self) -> Decision:
        """Clear an E-stop: reboot servos with a latched hardware error, re-enable (which also
        clears a tripped bus watchdog), then reset — with no cycle in between: the supervisor
        still holds the goal from before the E-stop, and servos that were power cycled (or
        moved by hand with torque off) stand elsewhere; once enabled they would drive back to
        it with no operator command."""
        async with self._turn:
            return await self._reset()

    async def _reset(self) -> Decision:
        await self.servos.clear_faults()
        self.last_states = await self.servos.read_states()  # torque still off: where they stand
        self.supervisor.hold_where_measured(self.measured_joints())  # even if the rest fails
        await self.servos.enable(watchdog_s=self.watchdog_s)
        self.last_states = await self.servos.read_states()
        self._last_bus_traffic = self.clock()
        self.servos.take_longest_silence()  # enable cleared a trip: earlier silence is moot
        faults = [s.hardware_error for s in self.last_states]
        decision = self.supervisor.reset(self.measured_joints(), faults)
        log.info("reset", granted=decision.granted, reason=decision.reason.value)
        return decision
