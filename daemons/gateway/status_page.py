"""Patient-facing status: per device "last reading taken / delivered to the clinic".

A reading is *delivered* once the outbox holds no older unacknowledged record of that
device's observation stream (the broker acknowledged it, QoS 1). The board is kept in memory,
written atomically to ``gateway-status.json`` in the state directory (``medge gateway status``
reads it) and served read-only over HTTP on loopback by default. No clinical values are shown:
only times, connection state and whether data is waiting to be sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from medge.config import bounds

STATUS_FILE = "gateway-status.json"


@dataclass(frozen=True)
class StatusSection:
    http: bool = True
    bind: str = "127.0.0.1"
    """Loopback by default; a LAN address lets a nurse's tablet see the page."""
    port: int = field(default=8088, metadata=bounds(min=0, max=65535))
    """0 picks a free port (written to the status file)."""
    refresh_s: float = field(default=5.0, metadata=bounds(min=0.1, max=3600))


@dataclass
class DeviceStatus:
    name: str
    driver: str
    connection: str = "starting"
    last_taken: datetime | None = None
    last_delivered: datetime | None = None
    waiting: int = 0
    """Readings taken but not yet acknowledged by the clinic's broker."""
    stale: str = "ok"
    _emitted: deque[tuple[int, datetime]] = field(default_factory=deque)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.name, "driver": self.driver, "connection": self.connection,
                "last_taken": _iso(self.last_taken), "last_delivered": _iso(self.last_delivered),
                "waiting": self.waiting, "stale": self.stale}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat(timespec="seconds")


class StatusBoard:
    def __init__(self, node: str, clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.node = node
        self.devices: dict[str, DeviceStatus] = {}
        self.paired: bool = False
        self.clinic_link = False
        self.http_url: str | None = None
        self.stopped = False
        """Set on a clean shutdown, so the CLI can tell "stopped" from "crashed/hung"."""
        self._clock = clock

    def add(self, name: str, driver: str) -> DeviceStatus:
        return self.devices.setdefault(name, DeviceStatus(name, driver))

    def taken(self, name: str, at: datetime) -> None:
        status = self.devices[name]
        status.last_taken = max(at, status.last_taken) if status.last_taken else at

    def emitted(self, name: str, seq: int, taken_at: datetime) -> None:
        """An observation of ``name`` went into the outbox as ``seq`` of its stream."""
        self.devices[name]._emitted.append((seq, taken_at))

    def delivered_up_to(self, oldest_unacked: dict[str, int]) -> None:
        """Mark readings delivered from the outbox's per-stream lowest unacked seq."""
        for name, status in self.devices.items():
            floor = oldest_unacked.get(f"{name}/obs")
            emitted = status._emitted
            while emitted and (floor is None or emitted[0][0] < floor):
                _, taken_at = emitted.popleft()
                if status.last_delivered is None or taken_at > status.last_delivered:
                    status.last_delivered = taken_at
            status.waiting = len({seq for seq, _ in emitted})

    def snapshot(self) -> dict[str, Any]:
        return {"node": self.node, "updated_at": _iso(self._clock()), "paired": self.paired,
                "clinic_link": "connected" if self.clinic_link else "offline (data kept)",
                "http": self.http_url, "stopped": self.stopped,
                "devices": [d.as_dict() for d in self.devices.values()]}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Carry last taken/delivered over a restart (the outbox itself survives too)."""
        for entry in snapshot.get("devices", []):
            status = self.devices.get(str(entry.get("device")))
            if status is None:
                continue
            for key in ("last_taken", "last_delivered"):
                with contextlib.suppress(TypeError, ValueError):
                    setattr(status, key, datetime.fromisoformat(entry[key]))


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    fd, temp = tempfile.mkstemp(prefix=".status-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def read_status(state_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((state_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def render_html(snapshot: dict[str, Any]) -> str:
    rows = "".join(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            *(html.escape(str(v if v is not None else "—")) for v in (
                d["device"], d["connection"], d["last_taken"], d["last_delivered"],
                "yes" if d["waiting"] else "no")))
        for d in snapshot["devices"])
    return (
        "<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' "
        "content='10'><title>medge gateway</title></head><body>"
        f"<h1>Home gateway {html.escape(snapshot['node'])}</h1>"
        f"<p>Clinic link: {html.escape(snapshot['clinic_link'])}. "
        f"Paired with a patient: {'yes' if snapshot['paired'] else 'NO'}.</p>"
        "<table border='1'><tr><th>Device</th><th>Connection</th><th>Last reading taken</th>"
        "<th>Delivered to the clinic</th><th>Waiting to send</th></tr>"
        f"{rows}</table><p>Updated {html.escape(snapshot['updated_at'])} (UTC)</p>"
        "</body></html>")


class StatusPage:
    """A tiny read-only HTTP/1.0 server: ``/`` (HTML) and ``/status.json``."""

    MAX_REQUEST = 8192

    def __init__(self, board: StatusBoard, bind: str, port: int) -> None:
        self.board = board
        self.bind, self.port = bind, port
        self._server: asyncio.Server | None = None
        self._log = structlog.get_logger().bind(component="status-page")

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, self.bind, self.port)
        host, port = self._server.sockets[0].getsockname()[:2]
        url = f"http://{host}:{port}/"
        self.board.http_url = url
        self._log.info("status page listening", url=url)
        return url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body = self._respond(head)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
        try:
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: "
                         f"{len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
                         .encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> tuple[str, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"read-only\n"
        snapshot = self.board.snapshot()
        if target == "/":
            return "200 OK", "text/html; charset=utf-8", render_html(snapshot).encode()
        if target == "/status.json":
            return "200 OK", "application/json", json.dumps(snapshot).encode()
        return "404 Not Found", "text/plain", b"not found\n"
