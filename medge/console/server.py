"""The console's loopback web server: static page, a state stream (SSE) and JSON POSTs.

The Python process holds the operator's MQTT connection (:class:`~medge.teleop.TeleopClient`);
the page only talks to this server. Safety rules that live here:

* one page setpoint in → at most one MQTT setpoint out, immediately. There is no stream of our
  own, so when the page goes silent (tab hidden, page closed, connection lost) nothing is
  forwarded and the daemon's stale-command rule stops the robot;
* a page setpoint stamped more than ``max_page_age_s`` (100 ms) ago, or not newer than the last
  one, is dropped — a burst the browser flushes after a stall must not drive the robot;
* POSTs need the session token (a custom header, so other web sites cannot forge them) and a
  loopback ``Host`` (no DNS rebinding);
* while the broker link is down (the client reconnects on its own) setpoints and commands are
  refused at once with 503, and the state stream says so: the page shows it and stops sending.

The live ultrasound image (``{robot}/state/us``) is kept in one slot (:mod:`.live`); the page
pulls the newest frame at the operator's display rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiomqtt
import structlog

from daemons.manipulator.kinematics import Twist
from daemons.manipulator.supervisor import SupervisorConfig
from daemons.manipulator.teleop_protocol import ProtocolError, Reply
from medge.console.live import LiveImage
from medge.console.settings import (
    InputSettings,
    SettingsError,
    SettingsStore,
    is_finite_number,
    probe_to_base,
)
from medge.console.spacemouse import SpaceMouseReader
from medge.mqtt import LinkDown, PublishRefused
from medge.teleop import RequestTimeout, TeleopClient

STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
IDLE_TIMEOUT_S = 60.0
EVENT_PERIOD_S = 0.05
REQUEST_COMMANDS = ("arm", "disarm", "estop", "reset", "goto", "register", "mode")
LINK_LOST = "broker link lost — reconnecting"

log = structlog.get_logger(__name__)


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 413: "Payload Too Large", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass(frozen=True)
class ConsoleInfo:
    """What the page shows besides the robot's state."""

    operator: str
    broker: str
    robot: str
    poses: tuple[str, ...] = ("home",)
    force_warn_n: float = SupervisorConfig().force_warn_n
    force_stop_n: float = SupervisorConfig().force_stop_n


@dataclass
class Counters:
    forwarded: int = 0
    dropped_stale: int = 0
    dropped_reordered: int = 0
    publish_failed: int = 0
    last_forwarded_at: float | None = None
    """``time.monotonic()`` of the last MQTT setpoint sent."""
    last_twist: list[float] = field(default_factory=lambda: [0.0] * 6)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


class ConsoleServer:
    """``async with ConsoleServer(client, info, store) as server``: serving on ``server.url``."""

    def __init__(
        self,
        client: TeleopClient,
        info: ConsoleInfo,
        store: SettingsStore,
        *,
        spacemouse: SpaceMouseReader | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_page_age_s: float = 0.1,
    ) -> None:
        self.client = client
        self.info = info
        self.store = store
        self.settings = store.load()
        self.spacemouse = spacemouse
        self.host = host
        self.port = port
        self.max_page_age_s = max_page_age_s
        self.token = secrets.token_urlsafe(24)
        self.counters = Counters()
        self._last_page_stamp_ms = -math.inf
        self._state_received_at: float | None = None
        self._states_seen = -1
        self.live = LiveImage()
        client.link.subscribe(f"{client.robot.state}/us", self.live.on_message, qos=0)
        self._link_down_since: float | None = None if client.connected else time.monotonic()
        self._forget_link_callback = client.link.on_disconnect(self._link_lost)
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._routes: dict[tuple[str, str], Callable[[Request], Awaitable[dict[str, Any]]]] = {
            ("POST", "/api/setpoint"): self._setpoint,
            ("POST", "/api/command"): self._command,
            ("GET", "/api/settings"): self._get_settings,
            ("POST", "/api/settings"): self._put_settings,
            ("GET", "/api/surface"): self._surface,
        }

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/?token={self.token}"

    async def __aenter__(self) -> ConsoleServer:
        self._server = await asyncio.start_server(self._serve_connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with contextlib.suppress(ValueError):  # already forgotten by an earlier exit
            self._forget_link_callback()
        if self._server is not None:
            self._server.close()
        for writer in self._connections.values():
            writer.transport.abort()  # each connection task then ends on its own
        await asyncio.gather(*self._connections)
        if self._server is not None:
            await self._server.wait_closed()

    # --- HTTP -----------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            while await self._serve_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            del self._connections[task]
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is done."""
        request = None
        try:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                request = await self._read_request(reader)
            if request is None:
                return False
            self._check_host(request)
            if request.method == "GET" and request.path == "/events":
                self._check_token(request.query.get("token", [""])[0])
                await self._events(writer)
                return False
            if request.method == "GET" and request.path == "/api/us/frame":
                self._check_token(request.headers.get("x-console-token", ""))
                await self._us_frame(writer)
            elif request.method == "GET" and not request.path.startswith("/api/"):
                await self._static(request.path, writer)
            else:
                await self._api(request, writer)
        except HttpError as exc:
            await self._respond(writer, exc.status, _json({"ok": False, "error": exc.message}))
            if exc.status in (400, 413):
                return False  # the stream may be out of step: close it
        return request is not None and request.headers.get("connection", "").lower() != "close"

    async def _api(self, request: Request, writer: asyncio.StreamWriter) -> None:
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            raise HttpError(404 if request.method in ("GET", "POST") else 405,
                            f"no {request.method} {request.path}")
        self._check_token(request.headers.get("x-console-token", ""))
        await self._respond(writer, 200, _json(await handler(request)))

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise HttpError(400, "incomplete request head") from None
            return None
        except asyncio.LimitOverrunError:
            raise HttpError(413, "request head too large") from None
        request, length = parse_head(head)
        if length:
            request.body = await reader.readexactly(length)
        return request

    def _check_host(self, request: Request) -> None:
        allowed = {f"127.0.0.1:{self.port}", f"localhost:{self.port}", f"[::1]:{self.port}"}
        if request.headers.get("host") not in allowed:
            raise HttpError(403, "the console answers loopback host names only")

    def _check_token(self, token: str) -> None:
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            raise HttpError(403, "missing or wrong console token (open the URL medge printed)")

    async def _respond(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                       content_type: str = "application/json", extra_headers: str = "") -> None:
        writer.write(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                     f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                     "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                     f"{extra_headers}\r\n".encode() + body)
        await writer.drain()

    async def _static(self, path: str, writer: asyncio.StreamWriter) -> None:
        name = "index.html" if path == "/" else path.lstrip("/")
        if "/" in name or name not in {p.name for p in STATIC.iterdir()}:
            raise HttpError(404, f"no {path}")
        file = STATIC / name
        await self._respond(writer, 200, file.read_bytes(),
                            CONTENT_TYPES.get(file.suffix, "application/octet-stream"))

    # --- state stream ---------------------------------------------------------------------

    async def _events(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Cache-Control: no-store\r\nConnection: close\r\n\r\n")
        while not writer.is_closing():
            writer.write(b"data: " + _json(self.snapshot()) + b"\n\n")
            await writer.drain()
            await asyncio.sleep(EVENT_PERIOD_S)

    def snapshot(self) -> dict[str, Any]:
        """Everything the page draws, once per event."""
        now = time.monotonic()
        if self.client.states_received != self._states_seen:
            self._states_seen = self.client.states_received
            self._state_received_at = now
        spacemouse = self.spacemouse
        down_since = self._link_down_since
        if self.client.connected:
            down_since = self._link_down_since = None
        return {
            "console": {"operator": self.info.operator, "broker": self.info.broker,
                        "robot": self.info.robot, "poses": list(self.info.poses),
                        "force_warn_n": self.info.force_warn_n,
                        "force_stop_n": self.info.force_stop_n},
            "robot": self.client.state,
            "robot_state_age_ms": None if self._state_received_at is None
            else round((now - self._state_received_at) * 1000, 1),
            "forwarded": self.counters.forwarded,
            "dropped": {"stale": self.counters.dropped_stale,
                        "reordered": self.counters.dropped_reordered,
                        "publish_failed": self.counters.publish_failed},
            "spacemouse": None if spacemouse is None else {
                "path": str(spacemouse.path), "axes": list(spacemouse.state.axes),
                "buttons": spacemouse.state.buttons, "error": spacemouse.error},
            "broker_link": {
                "up": down_since is None,
                "down_ms": None if down_since is None else round((now - down_since) * 1000.0),
                "connections": self.client.link.connections,
                "error": self.client.link.last_error},
            "us": self.live.summary(),
        }

    def _link_lost(self) -> None:
        self._link_down_since = time.monotonic()

    def _check_link(self) -> None:
        if not self.client.connected:
            raise HttpError(503, LINK_LOST)

    async def _us_frame(self, writer: asyncio.StreamWriter) -> None:
        """The newest ultrasound frame as ``image/jpeg``; its header (with the frame's age now)
        in ``X-Us-Frame``, so the page shows the age, pose and force of what it displays."""
        taken = self.live.take()
        if taken is None:
            raise HttpError(404, "no ultrasound frame received yet")
        header, jpeg = taken
        await self._respond(writer, 200, jpeg, "image/jpeg",
                            f"X-Us-Frame: {_json(header).decode()}\r\n")

    # --- API ------------------------------------------------------------------------------

    async def _setpoint(self, request: Request) -> dict[str, Any]:
        """The dead-man is held: forward one enabled setpoint, or drop it with the reason."""
        stamp, page_twist = parse_setpoint(request.body, self.settings)
        self._check_link()
        age_ms = time.time() * 1000 - stamp
        if stamp <= self._last_page_stamp_ms:
            self.counters.dropped_reordered += 1
            return {"ok": False, "dropped": "reordered"}
        self._last_page_stamp_ms = stamp
        if age_ms > self.max_page_age_s * 1000:
            self.counters.dropped_stale += 1
            return {"ok": False, "dropped": "stale", "age_ms": round(age_ms, 1)}
        twist = self._with_spacemouse(page_twist)
        try:
            await self.client.send_setpoint(True, twist)
        except LinkDown:
            self.counters.publish_failed += 1
            raise HttpError(503, LINK_LOST) from None
        except aiomqtt.MqttError as exc:
            self.counters.publish_failed += 1
            raise HttpError(502, f"broker: {exc}") from None
        self.counters.forwarded += 1
        self.counters.last_forwarded_at = time.monotonic()
        self.counters.last_twist = [0.0] * 6 if twist is None else [*twist.linear, *twist.angular]
        return {"ok": True}

    def _with_spacemouse(self, page_twist: Twist) -> Twist | None:
        """Page and SpaceMouse deflections add up, in the probe frame; all zero → no twist, so
        a "go to pose" target keeps being pursued while the dead-man is held."""
        combined = [*page_twist.linear, *page_twist.angular]
        if self.spacemouse is not None:
            mouse = self.settings.twist(self.spacemouse.state.axes)
            combined = [a + b for a, b in zip(combined, [*mouse.linear, *mouse.angular],
                                              strict=True)]
        if not any(combined):
            return None
        state = self.client.state or {}
        tilt = state.get("pose", {}).get("tilt", [0.0, 0.0])
        return probe_to_base(Twist((combined[0], combined[1], combined[2]),
                                   (combined[3], combined[4], combined[5])),
                             float(tilt[0]), float(tilt[1]))

    async def _command(self, request: Request) -> dict[str, Any]:
        document = _body(request.body)
        command = document.get("cmd")
        if command not in REQUEST_COMMANDS:
            raise HttpError(400, f"cmd: must be one of {list(REQUEST_COMMANDS)}, got {command!r}")
        client = self.client
        self._check_link()
        with _request_errors():
            if command == "goto":
                reply = await client.go_to(_string(document, "pose"))
            elif command == "mode":
                reply = await client.set_mode(_string(document, "mode"))
            elif command == "register":
                reply = await client.register()
            else:
                reply = await getattr(client, command)()
        log.info("console.command", cmd=command, ok=reply.ok, reason=reply.reason)
        return _reply(reply)

    async def _get_settings(self, request: Request) -> dict[str, Any]:
        del request
        return {"ok": True, "user": self.info.operator, "settings": self.settings.as_dict()}

    async def _put_settings(self, request: Request) -> dict[str, Any]:
        try:
            settings = InputSettings.from_dict(_body(request.body))
        except SettingsError as exc:
            raise HttpError(400, str(exc)) from None
        self.store.save(settings)
        self.settings = settings
        return {"ok": True, "user": self.info.operator, "settings": settings.as_dict()}

    async def _surface(self, request: Request) -> dict[str, Any]:
        del request
        self._check_link()
        with _request_errors():
            return _reply(await self.client.surface())


def parse_head(head: bytes) -> tuple[Request, int]:
    """An HTTP/1.x request head (up to and including the blank line) → the request without its
    body, and the body's length; :class:`HttpError` for anything else (fuzzed: fuzz/targets.py)."""
    if len(head) > MAX_HEADER_BYTES:
        raise HttpError(413, "request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"bad request line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError(400, f"bad header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "content-length: not a number") from None
    if not 0 <= length <= MAX_BODY_BYTES:
        raise HttpError(413, f"body of {length} bytes exceeds {MAX_BODY_BYTES}")
    try:
        target = urlsplit(parts[1])
        query = parse_qs(target.query)
    except ValueError as exc:
        raise HttpError(400, f"bad request target {parts[1][:80]!r}: {exc}") from None
    return Request(parts[0], target.path, query, headers, b""), length


def parse_setpoint(body: bytes, settings: InputSettings) -> tuple[float, Twist]:
    """A page setpoint ``{"stamp": ms, "axes": [6 deflections]}`` → (stamp, probe-frame twist
    after the user's dead-band, scaling and inversion)."""
    document = _body(body)
    stamp = _number(document, "stamp")
    axes = document.get("axes")
    if not isinstance(axes, list):
        raise HttpError(400, "axes: must be an array of 6 numbers")
    try:
        return stamp, settings.twist(axes)
    except SettingsError as exc:
        raise HttpError(400, str(exc)) from None


@contextlib.contextmanager
def _request_errors() -> Iterator[None]:
    """A request to the daemon that failed → the HTTP status the page shows."""
    try:
        yield
    except RequestTimeout as exc:
        raise HttpError(504, str(exc)) from None
    except LinkDown:
        raise HttpError(503, LINK_LOST) from None
    except (aiomqtt.MqttError, ProtocolError, PublishRefused) as exc:
        raise HttpError(502, f"broker: {exc}") from None


def _reply(reply: Reply) -> dict[str, Any]:
    return {"ok": reply.ok, "cmd": reply.command, "reason": reply.reason, "detail": reply.detail}


def _json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


def _body(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise HttpError(400, f"body: not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise HttpError(400, "body: must be a JSON object")
    return document


def _number(document: dict[str, Any], key: str) -> float:
    value = document.get(key)
    if not is_finite_number(value):
        raise HttpError(400, f"{key}: must be a finite number, got {value!r}")
    return float(value)


def _string(document: dict[str, Any], key: str) -> str:
    value = document.get(key)
    if not isinstance(value, str) or not value:
        raise HttpError(400, f"{key}: must be a non-empty string, got {value!r}")
    return value
