"""What every daemon composes: the MQTT link, the durable outbox, the publisher and health.

``async with Runtime(cfg, "gateway") as rt: await rt.emit("spo2-1", "obs", body)`` stores the
message durably and it reaches the broker as soon as the link allows.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from medge.aio import cancel_and_wait
from medge.mqtt import LinkDown, MqttLink, PublishRefused
from medge.outbox import Outbox, Record
from medge.publisher import Publisher
from medge.settings import DaemonConfig
from medge.topics import Topics

HEALTH_INTERVAL_S = 30.0


def outbox_path(state_dir: Path, daemon: str) -> Path:
    """Where ``daemon``'s outbox lives (tools that read it, e.g. bench/chaos, ask here)."""
    return state_dir / f"{daemon}-outbox.sqlite3"


class Runtime:
    def __init__(
        self, cfg: DaemonConfig, daemon: str, *, health_interval: float = HEALTH_INTERVAL_S
    ) -> None:
        self.cfg = cfg
        self.daemon = daemon
        self.topics = Topics(cfg.node.site, cfg.node.node)
        self.link = MqttLink(cfg.mqtt, self.topics, daemon)
        self.outbox = Outbox(outbox_path(cfg.node.state_dir, daemon), cfg.outbox,
                             self.topics, on_pressure=self._on_pressure)
        self.publisher = Publisher(self.outbox, self.link, max_inflight=cfg.outbox.max_inflight)
        self.health_interval = health_interval
        self._tasks: list[asyncio.Task[Any]] = []
        self._log = structlog.get_logger().bind(component="runtime")

    async def __aenter__(self) -> Runtime:
        await self.outbox.open()
        await self.link.__aenter__()
        self._tasks = [
            asyncio.create_task(self.publisher.run(), name="publisher"),
            asyncio.create_task(self._health_loop(), name="health"),
        ]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, drain_timeout: float = 3.0) -> None:
        """Give queued records a moment to go out, then publish offline and stop."""
        if self.link.connected.is_set():
            await self.outbox.wait_empty(drain_timeout)
        await cancel_and_wait(self._tasks)
        self._tasks = []
        await self.link.close()
        await self.outbox.close()

    async def emit(
        self,
        device: str,
        kind: str,
        body: Mapping[str, Any] | bytes,
        *,
        stream: str | None = None,
        created_at: float | None = None,
    ) -> Record:
        """Store durably for delivery; returns once the record is safe on disk."""
        return await self.outbox.append(device, kind, body, stream=stream, created_at=created_at)

    async def publish_now(self, device: str, kind: str, body: Mapping[str, Any], *,
                          retain: bool = False, qos: int = 1) -> bool:
        """Best-effort publish that bypasses the outbox (replies, live state); False if offline."""
        payload = json.dumps(body, separators=(",", ":")).encode()
        try:
            await self.link.publish(self.topics.topic(device, kind), payload, qos=qos,
                                    retain=retain)
        except (LinkDown, PublishRefused):
            return False
        return True

    def health(self) -> dict[str, Any]:
        return {
            "daemon": self.daemon,
            "at": time.time(),
            "link": {"connected": self.link.connected.is_set(),
                     "connections": self.link.connections, "last_error": self.link.last_error},
            "outbox": self.outbox.health().as_dict(),
            "published": self.publisher.sent,
            "tasks": len(asyncio.all_tasks()),  # flat over a soak run, or a task leaks
        }

    async def _health_loop(self) -> None:
        while True:
            await self.link.connected.wait()
            await self.publish_now(self.daemon, "health", self.health(), retain=True)
            await asyncio.sleep(self.health_interval)

    def _on_pressure(self, high: bool, fill: float) -> None:
        """Technical alert when the outbox nears its bound (and when that clears)."""
        body = {"alert": "outbox-nearly-full", "active": high, "fill": round(fill, 3),
                "priority": "technical", "daemon": self.daemon}
        task = asyncio.get_running_loop().create_task(self.emit(self.daemon, "alert", body))
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("could not store technical alert", error=str(task.exception()))
