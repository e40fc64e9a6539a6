"""The MQTT link every daemon uses: one object owns the broker connection for its whole life.

- MQTT 5 over aiomqtt (on paho-mqtt 2), TCP_NODELAY on the client socket (QoS 1 round trips
  otherwise take ~90 ms: Nagle plus delayed ACK), optional TLS with client certificate, and
  username/password.
- Birth and death: a retained ``online`` status on connect, an MQTT will (retained ``offline``)
  for link loss, and an explicit retained ``offline`` on clean shutdown (``announce=False``:
  none of these, for clients the ACL gives no status topic, e.g. an operator's console).
- Reconnects forever with capped exponential backoff and full jitter, restoring subscriptions.
  State changes are logged once (connected -> lost -> recovered), not once per retry.
- :meth:`MqttLink.publish` at QoS 1 returns after the PUBACK and raises :class:`PublishRefused`
  when the broker answers with an MQTT 5 failure reason code (e.g. 135, not authorized), which
  aiomqtt 2 would otherwise report as success.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from medge.aio import cancel_and_wait
from medge.log import StateLog
from medge.settings import MqttSection
from medge.topics import Topics

Handler = Callable[[aiomqtt.Message], Awaitable[None]]
AckCallback = Callable[[str | None], None]
"""Called with None on success or the broker's failure reason."""

STABLE_AFTER_S = 10.0
"""A connection that lasted this long resets the reconnect backoff."""


class LinkDown(ConnectionError):
    """The broker is not reachable right now; the caller keeps the data and retries."""


class PublishRefused(RuntimeError):
    """The broker acknowledged a publish with a failure reason code (MQTT 5)."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"broker refused publish to {topic}: {reason}")
        self.topic = topic
        self.reason = reason


class AuthenticationFailed(ConnectionError):
    """The broker refused our credentials; retrying unchanged will not help (but we still do)."""


class _Client(aiomqtt.Client):
    """aiomqtt 2's client, keeping the PUBACK reason code its ``_on_publish`` drops.

    Relies on aiomqtt 2.x internals (``_pending_publishes``); the dependency is pinned ``<3``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused: dict[int, str] = {}
        self.callbacks: dict[int, AckCallback] = {}

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        reason = None
        if reason_code.is_failure:
            reason = f"{reason_code.getName()} ({reason_code.value})"
        callback = self.callbacks.pop(mid, None)
        if callback is not None:
            callback(reason)
            return
        if reason is not None:
            self.refused[mid] = reason
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def publish_pipelined(self, topic: str, payload: bytes, on_ack: AckCallback) -> None:
        """QoS 1 publish without a task per message: ``on_ack(reason)`` runs on the PUBACK."""
        info = self._client.publish(topic, payload, 1, False)
        if info.rc != 0:
            raise LinkDown(f"publish to {topic} failed: paho rc {info.rc}")
        self.callbacks[info.mid] = on_ack

    async def publish_checked(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: Properties | None,
        timeout: float,
    ) -> None:
        info = self._client.publish(topic, payload, qos, retain, properties)
        if info.rc != 0:
            raise LinkDown(f"publish to {topic} failed: paho rc {info.rc}")
        if qos == 0 or info.is_published():
            reason = self.refused.pop(info.mid, None)
        else:
            confirmation = asyncio.Event()
            self._pending_publishes[info.mid] = confirmation
            try:
                async with asyncio.timeout(timeout):
                    await confirmation.wait()
            except TimeoutError:
                raise LinkDown(f"no PUBACK for {topic} within {timeout} s") from None
            finally:
                self._pending_publishes.pop(info.mid, None)
            reason = self.refused.pop(info.mid, None)
        if reason is not None:
            raise PublishRefused(topic, reason)


@dataclass(frozen=True)
class Subscription:
    topic_filter: str
    handler: Handler
    qos: int


def status_payload(state: str) -> bytes:
    return json.dumps({"state": state, "at": time.time()}, separators=(",", ":")).encode()


def tls_context(cfg: MqttSection) -> ssl.SSLContext | None:
    if cfg.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.tls.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.tls.cert_file is not None and cfg.tls.key_file is not None:
        context.load_cert_chain(str(cfg.tls.cert_file), str(cfg.tls.key_file))
    return context


class MqttLink:
    """``async with MqttLink(cfg, topics, "gateway") as link``: connected in the background."""

    def __init__(
        self,
        cfg: MqttSection,
        topics: Topics,
        daemon: str,
        *,
        publish_timeout: float = 10.0,
        announce: bool = True,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.topics = topics
        self.daemon = daemon
        self.client_id = cfg.client_id or f"medge-{topics.node}-{daemon}"
        self.status_topic = topics.topic(daemon, "status") if announce else None
        """Birth/death topic; None: the link announces nothing."""
        self.tls = tls
        """A TLS context the caller built (the console's, from its options); None: ``cfg.tls``,
        read again on every connection (a renewed certificate is picked up)."""
        self.publish_timeout = publish_timeout
        self.connected = asyncio.Event()
        self.connections = 0
        """How many times a connection was established (tests and health use it)."""
        self.last_error: str | None = None
        self._client: _Client | None = None
        self._subscriptions: list[Subscription] = []
        self._on_connect: list[Callable[[], Awaitable[None]]] = []
        self._on_disconnect: list[Callable[[], None]] = []
        self._runner: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        self._attempted = asyncio.Event()
        self._log = structlog.get_logger().bind(component="mqtt", broker=f"{cfg.host}:{cfg.port}")
        self._state = StateLog(self._log, "broker link")

    # ---- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> MqttLink:
        self._runner = asyncio.create_task(self._run(), name=f"mqtt-{self.daemon}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Publish the retained ``offline`` status (if connected) and disconnect."""
        self._closing = True
        if self.status_topic is not None and self._client is not None and self.connected.is_set():
            with contextlib.suppress(LinkDown, PublishRefused, aiomqtt.MqttError):
                await self.publish(self.status_topic, status_payload("offline"), qos=1,
                                   retain=True, timeout=2.0)
        await cancel_and_wait([self._runner, *self._background])
        self._runner = None
        self.connected.clear()

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Deliver matching messages to ``handler``; kept across reconnects."""
        subscription = Subscription(topic_filter, handler, qos)
        self._subscriptions.append(subscription)
        client = self._client
        if client is not None:  # connected, or still restoring (which may have passed us)
            task = asyncio.create_task(self._subscribe_now(client, subscription))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _subscribe_now(self, client: _Client, subscription: Subscription) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.subscribe(subscription.topic_filter, subscription.qos)

    def on_connect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` after every (re)connection, e.g. to republish retained state."""
        self._on_connect.append(callback)

    def on_disconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when the link drops; returns a function that unregisters it."""
        self._on_disconnect.append(callback)
        return lambda: self._on_disconnect.remove(callback)

    async def wait_connected(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self.connected.wait()

    async def first_attempt(self, timeout: float | None = None) -> None:
        """Wait for the first connection attempt; :class:`LinkDown` with the broker's error if
        it failed (a command line reports an unreachable broker or bad credentials at once,
        while the link keeps retrying behind it)."""
        async with asyncio.timeout(timeout):
            await self._attempted.wait()
        if not self.connected.is_set():
            raise LinkDown(f"broker {self.cfg.host}:{self.cfg.port}: {self.last_error}")

    @property
    def client(self) -> aiomqtt.Client:
        """The current connection (tests publish raw payloads on it); LinkDown without one."""
        if self._client is None or not self.connected.is_set():
            raise LinkDown("not connected to the broker")
        return self._client

    # ---- publishing ----------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish; at QoS 1 return after the PUBACK. Raise :class:`LinkDown` when offline."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise LinkDown("not connected to the broker")
        await client.publish_checked(topic, payload, qos, retain, properties,
                                     self.publish_timeout if timeout is None else timeout)

    def publish_pipelined(self, topic: str, payload: bytes, on_ack: AckCallback) -> None:
        """Start a QoS 1 publish; ``on_ack`` runs when its PUBACK arrives (never, if the link
        drops first: the caller treats everything unacknowledged at a disconnect as unsent)."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise LinkDown("not connected to the broker")
        client.publish_pipelined(topic, payload, on_ack)

    # ---- connection manager --------------------------------------------------------------

    def _make_client(self) -> _Client:
        will = None
        if self.status_topic is not None:
            will_properties = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
            will_properties.PayloadFormatIndicator = 1
            will = aiomqtt.Will(self.status_topic, status_payload("offline"), qos=1, retain=True,
                                properties=will_properties)
        password = self.cfg.password_file.value if self.cfg.password_file else None
        return _Client(
            self.cfg.host,
            port=self.cfg.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            username=self.cfg.username,
            password=password,
            keepalive=self.cfg.keepalive,
            clean_start=True,
            tls_context=self.tls if self.tls is not None else tls_context(self.cfg),
            will=will,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            # Unlimited in paho: the publisher keeps its own window, and paho's limit costs a scan
            # of every queued message on each PUBACK.
            max_inflight_messages=0,
            timeout=self.cfg.connect_timeout,
        )

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            client = self._make_client()
            connected_at: float | None = None
            try:
                async with client:
                    self._client = client
                    connected_at = time.monotonic()
                    await self._established(client)
                    async for message in client.messages:
                        await self._dispatch(message)
            except aiomqtt.MqttCodeError as exc:
                self._lost(exc, auth=exc.rc in (4, 5, 134, 135))
            except (aiomqtt.MqttError, OSError) as exc:
                self._lost(exc)
            finally:
                self._client = None
                self._attempted.set()
                if self.connected.is_set():
                    self.connected.clear()
                    for callback in self._on_disconnect:
                        callback()
            if self._closing:
                break
            # Back off afresh only after a stable connection, so a broker that accepts and then
            # drops us (e.g. mosquitto 2.0 disconnects after an ACL-denied QoS 1 publish) does
            # not turn into a tight reconnect loop.
            stable = connected_at is not None and time.monotonic() - connected_at > STABLE_AFTER_S
            attempt = 1 if stable else attempt + 1
            ceiling = min(self.cfg.reconnect_max, self.cfg.reconnect_min * 2 ** min(attempt, 16))
            await asyncio.sleep(random.uniform(self.cfg.reconnect_min, ceiling))

    async def _established(self, client: _Client) -> None:
        for subscription in self._subscriptions:
            await client.subscribe(subscription.topic_filter, subscription.qos)
        if self.status_topic is not None:
            try:
                await client.publish_checked(self.status_topic, status_payload("online"), 1,
                                             True, None, self.publish_timeout)
            except PublishRefused as exc:
                self._log.error("birth message refused; check the broker ACL", error=str(exc))
        self.connections += 1
        self.last_error = None
        self._state.set("connected" if self.connections == 1 else "recovered")
        self.connected.set()
        self._attempted.set()
        for callback in self._on_connect:
            await callback()

    def _lost(self, exc: BaseException, auth: bool = False) -> None:
        self.last_error = str(exc)
        if auth:
            self._state.set("refused", level="error", error=str(exc),
                            hint="check the username, password file or client certificate")
        else:
            self._state.set("lost" if self.connections else "unreachable", level="warning",
                            error=str(exc))

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        topic = message.topic
        for subscription in self._subscriptions:
            if topic.matches(subscription.topic_filter):
                try:
                    await subscription.handler(message)
                except Exception:
                    self._log.exception("message handler failed", topic=topic.value)
