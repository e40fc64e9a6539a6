"""The operator's side of the manipulator's MQTT teleoperation protocol (docs/teleop.md).

The console and the tests use it::

    async with TeleopClient(broker, robot=RobotTopics("site", "node", "probe-arm"),
                            operator="alice") as op:
        await op.arm()
        op.command(enable=True, twist=Twist((0.01, 0, 0), (0, 0, 0)))
        await op.start_stream(100)          # setpoints at 100 Hz, QoS 0, seq + stamp + dead-man
        ...
        op.command(enable=False)            # dead-man released: the robot decelerates to rest
        await op.disarm()

Setpoints carry ``seq`` (strictly increasing), the sender's stamp and the enable bit; they are
QoS 0 with a 1 s message expiry and never retained. Requests are QoS 1 MQTT 5 request/response
(Response Topic below ``reply/{operator}``, Correlation Data). The session expires at once
(clean start, Session Expiry 0), so nothing queued for an old connection is ever replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemons.manipulator.kinematics import ProbePose, Twist
from daemons.manipulator.teleop_protocol import (
    Command,
    ProtocolError,
    Reply,
    RobotTopics,
    SetpointMessage,
    decode_reply,
    encode_request,
    encode_setpoint,
)
from medge.aio import cancel_and_wait
from medge.config import Secret
from medge.mqtt import LinkDown, MqttLink
from medge.settings import MqttSection
from medge.topics import Topics

__all__ = ["Broker", "LinkDown", "ProbePose", "RequestTimeout", "RobotTopics", "TeleopClient",
           "Twist"]

SETPOINT_EXPIRY_S = 1
"""MQTT message expiry (whole seconds): the broker drops a setpoint it could not deliver by
then; the daemon's own 100 ms / 250 ms freshness rules do the fine-grained part."""


class RequestTimeout(TimeoutError):
    """No reply to a request in time (daemon down, or the ACL refused the request)."""


@dataclass(frozen=True)
class Broker:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    keepalive: int = 5
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 2.0
    """One operator, not a fleet: retry often, so the console is back soon after the broker."""
    connect_timeout: float = 5.0


class TeleopClient:
    """One operator's connection: requests, a setpoint stream, and the robot's state.

    The connection is an :class:`~medge.mqtt.MqttLink` without birth/will (the operator's ACL
    has no status topic): it reconnects with backoff and restores the subscriptions. Entering
    waits for the first connection attempt and raises :class:`~medge.mqtt.LinkDown` if it
    failed. While the link is down, requests and setpoints raise ``LinkDown`` at once, pending
    requests fail with it, and a running stream skips its sends (the daemon's stale-command
    rule stops the robot; after 1 s its lease lapses and must be taken again).
    """

    def __init__(
        self,
        broker: Broker,
        robot: RobotTopics,
        operator: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        robot.setpoint(operator)  # validates the operator as a topic level
        self.broker = broker
        self.robot = robot
        self.operator = operator
        self.clock = clock
        """Sender stamps: any epoch, but it must not jump (the daemon checks its sanity)."""
        self.state: dict[str, Any] | None = None
        """The latest state document (50 Hz)."""
        self.states_received = 0
        self.sent: dict[int, float] = {}
        """seq → ``time.monotonic()`` at publish, for latency measurements (bench/teleop)."""
        self.record_sends = False
        self._seq = itertools.count(1)
        self._reply_topic = f"{robot.reply(operator)}/{os.getpid()}-{id(self):x}"
        self._pending: dict[bytes, asyncio.Future[Reply]] = {}
        self._correlation = itertools.count(1)
        self._state_changed = asyncio.Event()
        self.link = MqttLink(_link_settings(broker, f"teleop-{operator}-{id(self):x}"),
                             Topics(robot.site, robot.node), robot.robot, announce=False,
                             tls=broker.tls)
        self.link.subscribe(self._reply_topic, self._on_reply, qos=1)
        self.link.subscribe(robot.state, self._on_state, qos=0)
        self.link.on_disconnect(self._fail_pending)
        self._streamer: asyncio.Task[None] | None = None
        self._command: tuple[bool, Twist | None, ProbePose | None] = (False, None, None)

    async def __aenter__(self) -> TeleopClient:
        await self.link.__aenter__()
        try:
            await self.link.first_attempt(self.broker.connect_timeout + 5.0)
        except BaseException:
            await self.link.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_stream()
        await self.link.close()

    @property
    def connected(self) -> bool:
        return self.link.connected.is_set()

    @property
    def client(self) -> aiomqtt.Client:
        """The current connection, for raw publishes (tests); ``LinkDown`` without one."""
        return self.link.client

    # --- requests -------------------------------------------------------------------------

    async def request(self, command: Command, args: dict[str, Any] | None = None,
                      timeout: float = 5.0) -> Reply:
        try:
            return await self.request_raw(encode_request(self.operator, command, args), timeout)
        except RequestTimeout:
            raise RequestTimeout(f"no reply to {command.value} within {timeout} s") from None

    async def request_raw(self, payload: bytes, timeout: float = 5.0) -> Reply:
        """Send any payload as a request (tests send malformed ones) and await the reply."""
        correlation = str(next(self._correlation)).encode()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ResponseTopic = self._reply_topic
        properties.CorrelationData = correlation
        properties.MessageExpiryInterval = max(1, round(timeout))
        try:
            await self.link.publish(self.robot.request(self.operator), payload, qos=1,
                                    properties=properties, timeout=timeout)
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise RequestTimeout(f"no reply within {timeout} s") from None
        finally:
            self._pending.pop(correlation, None)

    async def arm(self) -> Reply:
        return await self.request(Command.ARM)

    async def disarm(self) -> Reply:
        return await self.request(Command.DISARM)

    async def estop(self) -> Reply:
        return await self.request(Command.ESTOP)

    async def reset(self) -> Reply:
        return await self.request(Command.RESET)

    async def set_mode(self, mode: str) -> Reply:
        return await self.request(Command.MODE, {"mode": mode})

    async def go_to(self, pose_name: str) -> Reply:
        """Target a named pose; the robot moves there while enabled "hold" setpoints (no twist,
        no pose) keep coming. The stream switches to hold first (keeping the dead-man as it is):
        a twist arriving after the request would cancel the goal."""
        self.command(self._command[0])
        return await self.request(Command.GOTO, {"pose": pose_name})

    async def register(self, timeout: float = 180.0) -> Reply:
        """Camera registration; needs the lease and an enabled stream (the robot moves)."""
        self.command(self._command[0])  # hold: the daemon drives the view poses
        return await self.request(Command.REGISTER, timeout=timeout)

    async def check_registration(self, timeout: float = 30.0) -> Reply:
        return await self.request(Command.CHECK_REGISTRATION, timeout=timeout)

    async def surface(self, max_points: int = 2000, timeout: float = 30.0) -> Reply:
        """The patient's surface as points in the robot base frame (``detail["points"]``)."""
        return await self.request(Command.SURFACE, {"max_points": max_points}, timeout=timeout)

    # --- setpoints ------------------------------------------------------------------------

    async def send_setpoint(
        self,
        enable: bool,
        twist: Twist | None = None,
        pose: ProbePose | None = None,
        *,
        seq: int | None = None,
        sent_at: float | None = None,
    ) -> int:
        """Publish one setpoint now (QoS 0); returns its seq. ``seq``/``sent_at`` override the
        automatic ones (tests use them to replay or reorder)."""
        number = next(self._seq) if seq is None else seq
        message = SetpointMessage(self.operator, number,
                                  self.clock() if sent_at is None else sent_at, enable, twist,
                                  pose)
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.MessageExpiryInterval = SETPOINT_EXPIRY_S
        if self.record_sends:
            self.sent[number] = time.monotonic()
        # QoS 0 goes straight to paho: never waited for (aiomqtt's own publish awaits the socket
        # write, and on Python 3.11 its wait_for can swallow the cancellation that stops a stream).
        await self.link.publish(self.robot.setpoint(self.operator), encode_setpoint(message),
                                qos=0, properties=properties)
        return number

    def command(self, enable: bool, twist: Twist | None = None,
                pose: ProbePose | None = None) -> None:
        """What the stream sends from now on (enable = the dead-man button)."""
        self._command = (enable, twist, pose)

    async def start_stream(self, rate_hz: float = 100.0) -> None:
        if not 0 < rate_hz <= 1000:
            raise ValueError(f"rate_hz {rate_hz} must be within (0, 1000]")
        await self.stop_stream()
        self._streamer = asyncio.create_task(self._stream(1.0 / rate_hz),
                                             name=f"teleop-stream-{self.operator}")

    async def stop_stream(self) -> None:
        """Stop sending (as a cut link would): the daemon stops the robot on its own."""
        if self._streamer is not None:
            await cancel_and_wait([self._streamer])
            self._streamer = None

    async def _stream(self, period: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            enable, twist, pose = self._command
            with contextlib.suppress(LinkDown):  # a cut link is silence; the daemon stops
                await self.send_setpoint(enable, twist, pose)
            next_at = max(next_at + period, loop.time())
            await asyncio.sleep(next_at - loop.time())

    # --- state ----------------------------------------------------------------------------

    async def wait_state(self, predicate: Callable[[dict[str, Any]], bool],
                         timeout: float = 10.0) -> dict[str, Any]:
        """The first state document (the current one included) that satisfies ``predicate``."""
        async with asyncio.timeout(timeout):
            while self.state is None or not predicate(self.state):
                self._state_changed.clear()
                await self._state_changed.wait()
        return self.state

    async def _on_state(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        if isinstance(payload, bytes | bytearray):
            with contextlib.suppress(ValueError):
                document = json.loads(payload)
                if isinstance(document, dict):
                    self.state = document
                    self.states_received += 1
                    self._state_changed.set()

    async def _on_reply(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        correlation = getattr(message.properties, "CorrelationData", None)
        future = self._pending.get(bytes(correlation)) if correlation else None
        if future is not None and not future.done() and isinstance(payload, bytes | bytearray):
            try:
                future.set_result(decode_reply(bytes(payload)))
            except ProtocolError as exc:
                future.set_exception(exc)

    def _fail_pending(self) -> None:
        """The link dropped: replies to the requests in flight will never come (Session Expiry
        0 drops them with the subscription), so their callers learn it now, not at the timeout."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(LinkDown("broker link lost before the reply"))


def _link_settings(broker: Broker, client_id: str) -> MqttSection:
    password = None if broker.password is None else Secret(Path("(operator password)"),
                                                            broker.password)
    return MqttSection(host=broker.host, port=broker.port, username=broker.username,
                       password_file=password, client_id=client_id, keepalive=broker.keepalive,
                       reconnect_min=broker.reconnect_min_s, reconnect_max=broker.reconnect_max_s,
                       connect_timeout=broker.connect_timeout)
