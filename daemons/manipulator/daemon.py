"""The tele-ultrasound manipulator daemon: MQTT teleoperation in front of the control loop.

Composes the servos (Dynamixel chain), the load cell, the kinematics, the safety supervisor's
control loop (100 Hz, its own task on absolute deadlines), the camera registration and the MQTT
link (docs/teleop.md). MQTT handlers only decode, stamp and hand over — the control loop never
waits for the broker: setpoints are stamped on the monotonic clock first thing at receipt and
submitted to the supervisor; requests are executed in order by one worker task (E-stop is
executed at once, before queueing); state goes out at 50 Hz at QoS 0 straight on the link,
not through the durable outbox (a state document is worthless once the next one exists, and
50 fsyncs a second would only delay telemetry that matters).

Graceful stop (SIGTERM): disarm → the supervisor decelerates to rest → torque off.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemons.manipulator import teleop_protocol as proto
from daemons.manipulator.control import ControlLoop
from daemons.manipulator.kinematics import HolderGeometry, HolderKinematics, ProbePose, Twist
from daemons.manipulator.registration import (
    MoveFailed,
    Registration,
    RegistrationError,
    RegistrationSection,
    RgbdCamera,
    camera_from_config,
)
from daemons.manipulator.supervisor import (
    ArmState,
    CycleOutput,
    Decision,
    Reason,
    Setpoint,
    SupervisorConfig,
)
from daemons.manipulator.ultrasound import UltrasoundSection, UltrasoundService, attach
from drivers.dynamixel import DynamixelBus, DynamixelChain
from drivers.dynamixel_protocol import DynamixelError
from drivers.force_sensor import ForceSensor
from drivers.serial_link import SerialLink, SerialSettings
from medge.config import bounds
from medge.log import StateLog
from medge.mqtt import LinkDown, PublishRefused
from medge.runtime import Runtime
from medge.service import Service
from medge.settings import DaemonConfig, check_topic_level

DAEMON = "manipulator"
REQUEST_QUEUE = 32
ARRIVAL_TOLERANCE_M = 0.001
ARRIVAL_TOLERANCE_RAD = 0.01
SETTLED_RATE = 1e-3
"""m/s or rad/s below which an approach counts as arrived (the view is taken from the
measured pose, so arriving near the target is enough)."""
READ_ONLY_COMMANDS = frozenset({proto.Command.CHECK_REGISTRATION, proto.Command.SURFACE})
FOLLOWING_TIMEOUT_S = 1.0
CONTROL_STALL_S = 0.5
"""A control loop without a cycle for this long is reported stalled (with where it waits)."""
LOOP_STATS_PERIOD_S = 10.0
REGISTRATION_COMMANDS = frozenset({proto.Command.REGISTER, proto.Command.CHECK_REGISTRATION,
                                   proto.Command.SURFACE})

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class NamedPose:
    """A pose the console can ask for by name (``goto``), e.g. home or the scan start."""

    tip: tuple[float, float, float]
    tilt: tuple[float, float] = (0.0, 0.0)

    @property
    def pose(self) -> ProbePose:
        return ProbePose(*self.tip, *self.tilt)


@dataclass(frozen=True)
class ManipulatorSection:
    robot: str = "probe-arm"
    """The robot's device level in the topic namespace."""
    bus: str = "/dev/ttyUSB0"
    """Dynamixel bus: a tty, a pty or ``socket://host:port`` (the simulator)."""
    baudrate: int = field(default=1_000_000, metadata=bounds(min=9600, max=4_500_000))
    servo_ids: tuple[int, int, int, int, int] = (1, 2, 3, 4, 5)
    bus_timeout_s: float = field(default=0.05, metadata=bounds(min=0.001, max=1.0))
    force_sensor: str = "/dev/ttyUSB1"
    force_baudrate: int = field(default=115200, metadata=bounds(min=9600, max=4_000_000))
    watchdog_s: float = field(default=0.1, metadata=bounds(min=0.02, max=2.54))
    """Servo Bus Watchdog: a frozen daemon stops the robot after this long."""
    state_rate_hz: float = field(default=50.0, metadata=bounds(min=1.0, max=100.0))
    fine_scale: float = field(default=0.25, metadata=bounds(min=0.01, max=1.0))
    """Twist scale in ``fine`` mode."""
    cycle_on_setpoint: bool = True
    """Run a control cycle as soon as a fresh setpoint is accepted (≥ period/4 apart) instead
    of waiting up to a whole period: setpoint → Sync Write is then the MQTT hop plus a cycle."""
    estop_input: Path | None = None
    """A local E-stop input: the file's existence latches the E-stop (stands in for a GPIO)."""
    estop_poll_s: float = field(default=0.01, metadata=bounds(min=0.001, max=0.1))
    geometry: HolderGeometry = field(default_factory=HolderGeometry)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    poses: dict[str, NamedPose] = field(
        default_factory=lambda: {"home": NamedPose((0.0, 0.0, -0.2))})
    registration: RegistrationSection = field(default_factory=RegistrationSection)
    ultrasound: UltrasoundSection | None = None
    """Image capture, sweeps and recordings (docs/ultrasound.md); absent: no ultrasound."""

    def validate(self) -> None:
        check_topic_level("robot", self.robot)
        if len(set(self.servo_ids)) != len(self.servo_ids):
            raise ValueError(f"servo_ids must be distinct, got {self.servo_ids}")
        for name in self.poses:
            check_topic_level("pose name", name)
        if self.watchdog_s <= 2 * self.supervisor.period_s:
            raise ValueError("watchdog_s must exceed two control periods")

    def __post_init__(self) -> None:
        self.validate()


@dataclass(frozen=True)
class ManipulatorConfig(DaemonConfig):
    manipulator: ManipulatorSection = field(default_factory=ManipulatorSection)


CONFIG = ManipulatorConfig


class ManipulatorDaemon:
    """``async with ManipulatorDaemon(cfg, rt, camera)``: hardware up, loop running, subscribed."""

    def __init__(
        self,
        cfg: ManipulatorConfig,
        rt: Runtime,
        camera: RgbdCamera | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.section = cfg.manipulator
        self.rt = rt
        self.topics = proto.RobotTopics(cfg.node.site, cfg.node.node, self.section.robot)
        self.kinematics = HolderKinematics(self.section.geometry)
        self.clock = clock
        self.camera = camera
        self.mode = proto.Mode.NORMAL
        self.goal: ProbePose | None = None
        """While set, the lease holder's enabled "hold" setpoints drive towards it."""
        self.goal_name: str | None = None
        self.rejected: Counter[str] = Counter()
        """Setpoints and requests refused, by reason (published on the state topic)."""
        self.last_rejected_operator: str | None = None
        self.loop: ControlLoop | None = None
        self.registration: Registration | None = None
        self._sensor: ForceSensor | None = None
        self._requests: asyncio.Queue[tuple[proto.Request, str | None, bytes | None]] = \
            asyncio.Queue(REQUEST_QUEUE)
        self._tasks: list[asyncio.Task[Any]] = []
        self._stack = contextlib.AsyncExitStack()
        self._state_seq = 0
        self._loop_stats: dict[str, float] = {}
        self._arrived = asyncio.Event()
        self._estop_input_active = False
        self.ultrasound: UltrasoundService | None = None
        self._bus: DynamixelBus | None = None
        self._stopped = False

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> ManipulatorDaemon:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _start(self) -> None:
        section = self.section
        bus_link = await self._stack.enter_async_context(
            SerialLink.open(section.bus, SerialSettings(baudrate=section.baudrate)))
        force_link = await self._stack.enter_async_context(
            SerialLink.open(section.force_sensor, SerialSettings(baudrate=section.force_baudrate)))
        sensor = ForceSensor(force_link, clock=self.clock)
        self._sensor = sensor
        self._spawn(sensor.run(), "force-sensor")
        await sensor.wait_reading(2.0)
        self._bus = DynamixelBus(bus_link, timeout_s=section.bus_timeout_s)
        chain = DynamixelChain(self._bus, list(section.servo_ids))
        loop = ControlLoop(chain, self.kinematics, lambda: sensor.latest, section.supervisor,
                           watchdog_s=section.watchdog_s, clock=self.clock)
        await loop.start()
        self.loop = loop
        loop.listeners.append(self._on_cycle)
        self._spawn(loop.run(), "control-loop")
        self._spawn(self._watch_control_loop(self._tasks[-1]), "control-loop-watch")
        if self.camera is None:  # measured angles: a stand-in camera for demo runs only
            self.camera = camera_from_config(
                section.registration, lambda: [s.position_rad for s in loop.last_states])
        if self.camera is not None:
            self.registration = Registration(section.registration, self.camera, self.kinematics)
        self._spawn(self._request_worker(), "teleop-requests")
        self._spawn(self._state_publisher(), "teleop-state")
        self._spawn(self._loop_stats_refresher(), "teleop-loop-stats")
        if section.estop_input is not None:
            self._spawn(self._watch_estop_input(section.estop_input), "estop-input")
        if section.ultrasound is not None:
            self.ultrasound = await attach(self, section.ultrasound)
        self.rt.link.subscribe(self.topics.setpoints, self._on_setpoint, qos=0)
        self.rt.link.subscribe(self.topics.requests, self._on_request, qos=1)
        log.info("manipulator started", robot=section.robot, bus=section.bus)

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        if task not in self._tasks:
            return
        if task.cancelled():
            if not self._stopped:  # only stop() cancels them: anything else is a silent death
                log.error("task cancelled", task=task.get_name())
            return
        self._tasks.remove(task)
        if task.exception() is not None:
            log.error("task failed", task=task.get_name(), error=repr(task.exception()))

    async def stop(self) -> None:
        """Controlled stop (disarm, decelerate to rest), then torque off and close the ports."""
        if self._stopped:
            return
        self._stopped = True
        loop = self.loop
        if loop is not None and loop.last_output is not None:
            operator = loop.supervisor.operator
            if operator is not None:
                loop.disarm(operator)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(loop.config.stopping_time() + 0.5):
                    while loop.last_output.status.moving or loop.supervisor.operator:
                        self._arrived.clear()
                        await self._arrived.wait()
        for task in reversed(self._tasks):
            task.cancel()
        for task in reversed(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if loop is not None:
            try:
                await loop.servos.disable()
            except DynamixelError as exc:
                log.error("torque off failed", error=str(exc))
        await self._stack.aclose()

    @property
    def control(self) -> ControlLoop:
        if self.loop is None:
            raise RuntimeError("manipulator daemon not started")
        return self.loop

    # --- setpoints ------------------------------------------------------------------------

    async def _on_setpoint(self, message: aiomqtt.Message) -> None:
        received_at = self.clock()  # the command's age starts here, on our own clock
        payload = message.payload
        try:
            operator = self.topics.operator_of(message.topic.value)
            if not isinstance(payload, bytes | bytearray):
                raise proto.ProtocolError("payload", "not bytes")
            decoded = proto.decode_setpoint(bytes(payload), operator)
        except proto.ProtocolError as exc:
            self._reject(exc.code, None)
            return
        twist, pose = decoded.twist, decoded.pose
        if twist is not None:
            self._clear_goal()
            if self.mode is proto.Mode.FINE:
                scale = self.section.fine_scale
                twist = Twist(_scaled(twist.linear, scale), _scaled(twist.angular, scale))
        elif pose is not None:
            self._clear_goal()
        elif self.goal is not None and decoded.operator == self.control.supervisor.operator:
            pose = self.goal
        reason = self.control.submit(Setpoint(decoded.operator, decoded.seq, decoded.enable,
                                              decoded.sent_at, received_at, twist, pose))
        if reason is not Reason.OK:
            self._reject(reason.value, decoded.operator)
        elif self.section.cycle_on_setpoint:
            self.control.wake()

    def _reject(self, reason: str, operator: str | None) -> None:
        self.rejected[reason] += 1
        if operator is not None:
            self.last_rejected_operator = operator

    def _clear_goal(self) -> None:
        self.goal = self.goal_name = None

    # --- requests -------------------------------------------------------------------------

    async def _on_request(self, message: aiomqtt.Message) -> None:
        properties = message.properties
        response_topic = getattr(properties, "ResponseTopic", None)
        correlation = getattr(properties, "CorrelationData", None)
        payload = message.payload
        try:
            operator = self.topics.operator_of(message.topic.value)
        except proto.ProtocolError as exc:
            self._reject(exc.code, None)
            return
        try:
            if response_topic is not None:
                self.topics.check_response_topic(operator, response_topic)
            if correlation is not None and len(correlation) > proto.MAX_CORRELATION_BYTES:
                raise proto.ProtocolError("correlation_data", "longer than "
                                          f"{proto.MAX_CORRELATION_BYTES} bytes", "too_large")
            if not isinstance(payload, bytes | bytearray):
                raise proto.ProtocolError("payload", "not bytes")
            request = proto.decode_request(bytes(payload), operator)
        except proto.ProtocolError as exc:
            self._reject(exc.code, operator)
            if exc.code != "bad_response_topic":  # never answer onto a foreign topic
                await self._reply(response_topic, correlation, proto.Reply(
                    "?", False, exc.code, {"field": exc.field, "error": exc.reason}))
            return
        if request.command is proto.Command.ESTOP:  # stopping never waits in a queue
            self.control.estop(Reason.ESTOP_COMMAND)
            self._clear_goal()
            log.warning("E-stop from console", operator=operator)
        try:
            self._requests.put_nowait((request, response_topic, correlation))
        except asyncio.QueueFull:
            self._reject("request_queue_full", operator)
            await self._reply(response_topic, correlation, proto.Reply(
                request.command.value, False, "busy", {}))

    async def _request_worker(self) -> None:
        """Requests in arrival order; a registration (minutes) runs beside, not in the way."""
        while True:
            request, response_topic, correlation = await self._requests.get()
            if request.command in REGISTRATION_COMMANDS:
                self._spawn(self._answer(request, response_topic, correlation),
                            f"teleop-{request.command.value}")
            else:
                await self._answer(request, response_topic, correlation)

    async def _answer(self, request: proto.Request, response_topic: str | None,
                      correlation: bytes | None) -> None:
        try:
            reply = await self._execute(request)
        except proto.ProtocolError as exc:
            self._reject(exc.code, request.operator)
            reply = proto.Reply(request.command.value, False, exc.code,
                                {"field": exc.field, "error": exc.reason})
        except DynamixelError as exc:
            reply = proto.Reply(request.command.value, False, "servo_bus_error",
                                {"error": str(exc)})
        if not reply.ok and reply.reason != "ok":
            self._reject(reply.reason, request.operator)
        await self._reply(response_topic, correlation, reply)

    async def _execute(self, request: proto.Request) -> proto.Reply:
        command, operator = request.command, request.operator
        loop = self.control
        name = command.value
        if command is proto.Command.ESTOP:
            return proto.Reply(name, True, Reason.ESTOP_COMMAND.value, {})
        if command is proto.Command.ARM:
            decision = loop.arm(operator)
            if decision.granted and self.registration is not None:
                self._spawn(self._session_check(self.registration), "registration-check")
            return self._decided(name, decision)
        if command is proto.Command.DISARM:
            decision = loop.disarm(operator)
            if decision.granted:
                self._clear_goal()
            return self._decided(name, decision)
        if command is proto.Command.RESET:
            if self._estop_input_active:
                return proto.Reply(name, False, "estop_input_active", {})
            await self._reopen_bus()
            return self._decided(name, await loop.reset())
        if command in READ_ONLY_COMMANDS:
            return await self._registration_request(request)
        self._require_lease(operator)  # what changes how the robot moves needs the lease
        if command is proto.Command.MODE:
            self.mode = proto.Mode(proto.string_arg(request, "mode",
                                                    {m.value for m in proto.Mode}))
            return proto.Reply(name, True, "ok", {"mode": self.mode.value})
        if command is proto.Command.GOTO:
            pose_name = proto.string_arg(request, "pose", set(self.section.poses))
            self.goal, self.goal_name = self.section.poses[pose_name].pose, pose_name
            return proto.Reply(name, True, "ok", {"pose": pose_name, "target": list(self.goal)})
        return await self._registration_request(request)

    async def _reopen_bus(self) -> None:
        """A bus that failed (adapter unplugged, device gone) stays closed, and its failure
        latched the E-stop; the operator's reset opens it again, so a replugged bus works
        without restarting the daemon. Nothing moves before the reset and a new arm."""
        bus = self._bus
        if bus is None or bus.link.is_open:
            return
        await bus.reopen()
        log.info("servo bus reopened", bus=bus.link.url)

    def _require_lease(self, operator: str) -> None:
        if self.control.supervisor.operator != operator:
            raise proto.ProtocolError("operator", f"{operator!r} does not hold the lease",
                                      "not_lease_holder")

    @staticmethod
    def _decided(command: str, decision: Decision) -> proto.Reply:
        return proto.Reply(command, decision.granted, decision.reason.value, {})

    async def _registration_request(self, request: proto.Request) -> proto.Reply:
        name = request.command.value
        registration = self.registration
        if registration is None:
            return proto.Reply(name, False, "no_camera", {})
        try:
            if request.command is proto.Command.SURFACE:
                limit = proto.int_arg(request, "max_points", 2000, 1, proto.MAX_SURFACE_POINTS)
                points = await registration.surface(limit)
                return proto.Reply(name, True, "ok", {
                    "frame": "robot_base", "unit": "m", "points": points})
            if request.command is proto.Command.REGISTER:
                result = await registration.register(self._move_to)
            else:
                drift = await registration.check(self._measured_pose())
                return proto.Reply(name, drift is not None and registration.state == "ok",
                                   registration.state, registration.summary())
        except RegistrationError as exc:
            return proto.Reply(name, False, exc.reason, {"error": str(exc)})
        finally:
            self._clear_goal()
        return proto.Reply(name, result.accepted, "ok" if result.accepted else "refused",
                           result.as_dict())

    def _measured_pose(self) -> ProbePose:
        return self.kinematics.forward(self.control.measured_joints())

    async def _session_check(self, registration: Registration) -> None:
        """Re-check the camera registration whenever an operator starts a session."""
        await registration.check(self._measured_pose())

    async def _move_to(self, pose: ProbePose, timeout: float) -> ProbePose:
        """Drive to ``pose`` under the operator's dead-man; the measured pose once at rest."""
        loop = self.control
        self.goal, self.goal_name = pose, "registration"
        lagging = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._arrived.clear()
                    await self._arrived.wait()
                    output = loop.last_output
                    assert output is not None
                    if output.status.state is not ArmState.ARMED:
                        raise MoveFailed(f"robot {output.status.state.value} "
                                         f"({_reasons(output)})")
                    measured = self._measured_pose()
                    if _settled(output) and _close(measured, pose):
                        return measured
                    if _settled(output) and _close(output.pose, pose):
                        lagging += 1  # commanded there, measured elsewhere
                        if lagging * loop.config.period_s > FOLLOWING_TIMEOUT_S:
                            raise MoveFailed("servos not following the commanded pose "
                                             "(bus watchdog tripped?)")
                    else:
                        lagging = 0
        except TimeoutError:
            output = loop.last_output
            why = _reasons(output) if output is not None else "no cycle"
            raise MoveFailed(f"pose {tuple(round(p, 4) for p in pose)} not reached within "
                             f"{timeout} s ({why})") from None

    async def _reply(self, topic: str | None, correlation: bytes | None,
                     reply: proto.Reply) -> None:
        if topic is None:
            self.rejected["no_response_topic"] += 1
            return
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if correlation is not None:
            properties.CorrelationData = correlation
        try:
            await self.rt.link.publish(topic, proto.encode_reply(reply), qos=1,
                                       properties=properties, timeout=5.0)
        except (LinkDown, PublishRefused) as exc:
            log.warning("reply not delivered", topic=topic, error=str(exc))

    # --- state ----------------------------------------------------------------------------

    def _on_cycle(self, output: CycleOutput, states: Any) -> None:
        del output, states
        self._arrived.set()

    def state_document(self) -> dict[str, Any]:
        loop = self.control
        output = loop.last_output
        assert output is not None
        status = output.status
        measured_joints = loop.measured_joints()
        measured = self.kinematics.forward(measured_joints)
        self._state_seq += 1
        registration = self.registration
        return {
            "v": proto.VERSION, "seq": self._state_seq, "at": time.time(),
            "state": status.state.value,
            "reasons": sorted(r.value for r in status.reasons),
            "lease": status.operator,
            "mode": self.mode.value,
            "goal": self.goal_name,
            "joints": _rounded(measured_joints),
            "pose": {"tip": _rounded(measured.tip), "tilt": _rounded(measured[3:])},
            "commanded": {"tip": _rounded(output.pose.tip), "tilt": _rounded(output.pose[3:])},
            "rates": _rounded(output.pose_rates),
            "moving": status.moving,
            "force_n": None if status.force_n is None else round(status.force_n, 3),
            "command_age_ms": None if status.command_age_s is None
            else round(status.command_age_s * 1000, 2),
            "cycle_age_ms": None if loop.last_cycle_at is None
            else round((self.clock() - loop.last_cycle_at) * 1000, 1),
            "speed_scale": round(status.speed_scale, 3),
            "spin_ignored_rad_s": round(status.spin_ignored_rad_s, 4),
            "counters": {"dropped": status.dropped_setpoints,
                         "foreign": status.foreign_setpoints,
                         "last_foreign_operator": loop.supervisor.last_foreign_operator,
                         "rejected": dict(self.rejected),
                         "last_rejected_operator": self.last_rejected_operator},
            "servo_faults": [s.hardware_error for s in loop.last_states],
            "estop_input": self._estop_input_active,
            "registration": registration.summary() if registration else {"state": "no_camera"},
            "loop": self._loop_stats,
        }

    async def _state_publisher(self) -> None:
        period = 1.0 / self.section.state_rate_hz
        topic = self.topics.state
        next_at = asyncio.get_running_loop().time()
        while True:
            if self.rt.link.connected.is_set() and self.control.last_output is not None:
                payload = proto.encode_state(self.state_document())
                with contextlib.suppress(LinkDown, PublishRefused):
                    await self.rt.link.publish(topic, payload, qos=0)
            next_at += period
            await asyncio.sleep(max(0.0, next_at - asyncio.get_running_loop().time()))

    async def _loop_stats_refresher(self) -> None:
        """Percentiles over the loop's history (up to 60 000 cycles, pure Python) take tens of
        milliseconds: off the event loop, and only every few seconds."""
        while True:
            await asyncio.sleep(LOOP_STATS_PERIOD_S)
            stats = await asyncio.to_thread(self.control.stats)
            self._loop_stats = {"cycles": stats.cycles, "overruns": stats.overruns,
                                "jitter_p99_ms": round(stats.jitter_p99_s * 1000, 3),
                                "cycle_p99_ms": round(stats.cycle_p99_s * 1000, 3)}

    async def _watch_control_loop(self, task: asyncio.Task[Any]) -> None:
        """A control loop that stops cycling leaves the servos to their bus watchdog and the
        state topic repeating its last cycle: say where it hangs, once per stall."""
        loop = self.control
        limit = max(CONTROL_STALL_S, 10 * loop.config.period_s)
        stalled = StateLog(log, "control loop")
        while True:
            await asyncio.sleep(limit / 4)
            last = loop.last_cycle_at
            age = 0.0 if last is None else self.clock() - last
            if age > limit:
                stalled.set("stalled", level="error", stalled_s=round(age, 3),
                            done=task.done(), awaiting=_awaiting(task))
            else:
                stalled.set("cycling")

    async def _watch_estop_input(self, path: Path) -> None:
        """Latch on the input's edge; while it stays active, reset is refused."""
        while True:
            pressed = os.path.exists(path)  # noqa: ASYNC240 (one stat(2), cheaper than a thread)
            if pressed and not self._estop_input_active:
                self.control.estop(Reason.ESTOP_LOCAL)
                self._clear_goal()
                log.warning("local E-stop input active", input=str(path))
            self._estop_input_active = pressed
            await asyncio.sleep(self.section.estop_poll_s)


def _awaiting(task: asyncio.Task[Any]) -> list[str]:
    """Where a task waits: its chain of awaits (``Task.get_stack`` gives only the outer frame
    of a suspended coroutine)."""
    frames = []
    awaited: Any = task.get_coro()
    while awaited is not None and getattr(awaited, "cr_frame", None) is not None:
        frame = awaited.cr_frame
        frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        awaited = awaited.cr_await
    return frames


def _scaled(vector: tuple[float, float, float], scale: float) -> tuple[float, float, float]:
    return vector[0] * scale, vector[1] * scale, vector[2] * scale


def _rounded(values: Any, digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in values]


def _close(a: ProbePose, b: ProbePose) -> bool:
    return (math.dist(a.tip, b.tip) <= ARRIVAL_TOLERANCE_M
            and max(abs(a.tilt_a - b.tilt_a), abs(a.tilt_b - b.tilt_b)) <= ARRIVAL_TOLERANCE_RAD)


def _settled(output: CycleOutput) -> bool:
    """At rest for practical purposes (an approach slows down asymptotically)."""
    return max(abs(rate) for rate in output.pose_rates) < SETTLED_RATE


def _reasons(output: CycleOutput | None) -> str:
    return "no cycle" if output is None else ",".join(sorted(r.value
                                                             for r in output.status.reasons))


@contextlib.asynccontextmanager
async def running(cfg: ManipulatorConfig, camera: RgbdCamera | None = None
                  ) -> AsyncIterator[ManipulatorDaemon]:
    async with Runtime(cfg, DAEMON) as rt, ManipulatorDaemon(cfg, rt, camera) as daemon:
        yield daemon


async def main(cfg: ManipulatorConfig, service: Service) -> None:
    async with running(cfg):
        service.ready(f"robot {cfg.manipulator.robot} on {cfg.manipulator.bus}")
        await service.stopping.wait()
