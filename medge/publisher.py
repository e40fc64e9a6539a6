"""Moves records from the durable outbox to the broker, in order, at QoS 1.

While connected it sends the oldest unacknowledged records first with up to ``max_inflight``
PUBACKs outstanding (pipelined: no task per message), deletes each record only after its PUBACK,
and then follows new records as they are committed. On link loss everything in flight is
forgotten (the records stay in the outbox) and, after reconnection, sending restarts from the
oldest record: duplicates are possible, loss is not. A record the broker refuses for good
(MQTT 5 failure reason code, e.g. an ACL denial) is moved to the outbox's dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time

import structlog

from medge.aio import cancel_and_wait
from medge.mqtt import LinkDown, MqttLink
from medge.outbox import Outbox, Record

ACK_BATCH = 256
ACK_INTERVAL_S = 0.02


class Publisher:
    def __init__(self, outbox: Outbox, link: MqttLink, *, max_inflight: int = 100) -> None:
        self.outbox = outbox
        self.link = link
        self.max_inflight = max_inflight
        self.sent = 0
        """Records confirmed by the broker since start (for health and benchmarks)."""
        self._acked: list[int] = []
        self._refused: list[tuple[Record, str]] = []
        self._inflight = 0
        self._generation = object()
        """Identifies the current connection's pass; stale PUBACK callbacks are ignored."""
        self._progress = asyncio.Event()
        self._ack_ready = asyncio.Event()
        self._log = structlog.get_logger().bind(component="publisher")

    async def run(self) -> None:
        """Forever: wait for the link, drain the outbox, follow new records; restart on loss."""
        acker = asyncio.create_task(self._ack_loop(), name="outbox-acks")
        try:
            while True:
                await self.link.connected.wait()
                self.outbox.link_up = True
                try:
                    await self._drain_while_connected()
                except LinkDown:
                    pass
                finally:
                    self.outbox.link_up = False
                    self._inflight = 0  # whatever was in flight is resent after reconnection
        finally:
            await cancel_and_wait([acker])
            await self._flush_acks()

    async def _drain_while_connected(self) -> None:
        lost = asyncio.Event()
        unregister = self.link.on_disconnect(lost.set)
        self._generation = generation = object()
        cursor = 0
        try:
            while self.link.connected.is_set() and not lost.is_set():
                await self._settle_refused()
                try:
                    records = await self.outbox.fetch(cursor, limit=self.max_inflight * 4)
                except (sqlite3.Error, OSError) as exc:
                    self._log.warning("outbox unreadable; retrying", error=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                if not records:
                    await self.outbox.wait_for_records(cursor, timeout=0.5)
                    continue
                for record in records:
                    while self._inflight >= self.max_inflight and not lost.is_set():
                        self._progress.clear()
                        await self._wait_progress(lost)
                    if lost.is_set():
                        return
                    self.link.publish_pipelined(
                        record.topic, record.envelope(time.time()),
                        functools.partial(self._on_ack, generation, record),
                    )
                    self._inflight += 1
                    cursor = record.id
        finally:
            unregister()

    async def _wait_progress(self, lost: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(self._progress.wait()), asyncio.ensure_future(lost.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _on_ack(self, generation: object, record: Record, reason: str | None) -> None:
        if generation is not self._generation:
            return  # an acknowledgement from a connection we already gave up on
        self._inflight -= 1
        self._progress.set()
        if reason is None:
            self.sent += 1
            self._acked.append(record.id)
            if len(self._acked) >= ACK_BATCH:
                self._ack_ready.set()
        else:
            self._refused.append((record, reason))

    async def _settle_refused(self) -> None:
        while self._refused:
            record, reason = self._refused.pop(0)
            await self.outbox.dead_letter(record, reason)

    async def _ack_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ack_ready.wait(), ACK_INTERVAL_S)
            self._ack_ready.clear()
            await self._flush_acks()
            await self._settle_refused()

    async def _flush_acks(self) -> None:
        if not self._acked:
            return
        ids, self._acked = self._acked, []
        try:
            await self.outbox.ack(ids)
        except Exception as exc:  # store trouble: keep them; a later flush retries
            self._acked[:0] = ids
            self._log.warning("could not delete acknowledged records yet", error=str(exc))
