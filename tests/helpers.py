"""Test helpers: a hospital-side subscriber that records every medge message it receives."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from medge.settings import DaemonConfig, MqttSection, NodeSection, OutboxSection


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """For rigs whose servo simulator runs in the test's own process: a full collection over
    all that earlier tests left behind (late in the suite: millions of objects) paused the
    process past the servos' 100 ms watchdog, and the robot stopped mid-test. Frozen, that heap
    is not walked again; collections during the test see only its own objects."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def daemon_config(state_dir: Path, port: int, **outbox: Any) -> DaemonConfig:
    return DaemonConfig(
        node=NodeSection(site="test-site", node="edge-1", state_dir=state_dir),
        mqtt=MqttSection(port=port, reconnect_min=0.05, reconnect_max=0.5, keepalive=5),
        outbox=OutboxSection(**outbox),
    )


@dataclass
class Collector:
    """Subscribes with a persistent session so nothing is missed across broker restarts."""

    port: int
    hostname: str = "127.0.0.1"
    topic_filter: str = "medge/v1/#"
    identifier: str = "hospital-ingest"
    client_options: dict[str, Any] = field(default_factory=dict)
    """Extra aiomqtt.Client arguments (TLS context, username, password)."""
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(10):
            await self.subscribed.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        connect_properties = Properties(PacketTypes.CONNECT)
        connect_properties.SessionExpiryInterval = 3600
        while True:
            try:
                async with aiomqtt.Client(
                    self.hostname, self.port, identifier=self.identifier,
                    protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
                    properties=connect_properties,
                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                    **self.client_options,
                ) as client:
                    await client.subscribe(self.topic_filter, qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        payload = message.payload
                        assert isinstance(payload, bytes | bytearray)
                        self.messages.append((message.topic.value, json.loads(payload)))
                        self.changed.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for t, m in self.messages if t.endswith("/" + kind)]


def delivery_report(envelopes: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts duplicates and checks per-stream order of first deliveries."""
    ids = Counter(e["msg_id"] for e in envelopes)
    first_seqs: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for e in envelopes:
        if e["msg_id"] not in seen:
            seen.add(e["msg_id"])
            first_seqs[e["stream"]].append(e["seq"])
    in_order = all(s == sorted(s) for s in first_seqs.values())
    return {"unique": len(ids), "duplicates": sum(ids.values()) - len(ids), "in_order": in_order}
