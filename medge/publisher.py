"""Moves records from the durable outbox to the broker, in order, at QoS 1.

While connected it sends the oldest unacknowledged records first with up to ``max_inflight``
PUBACKs outstanding, deletes each record only after its PUBACK, and then follows new records as
they are committed. On link loss every in-flight publish is abandoned (its record stays in the
outbox) and, after reconnection, sending restarts from the oldest record: duplicates are
possible, loss is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time

import structlog

from medge.mqtt import LinkDown, MqttLink, PublishRefused
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
        finally:
            acker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acker
            await self._flush_acks()

    async def _drain_while_connected(self) -> None:
        window = asyncio.Semaphore(self.max_inflight)
        inflight: set[asyncio.Task[None]] = set()
        lost = asyncio.Event()
        unregister = self.link.on_disconnect(lost.set)
        cursor = 0
        try:
            while self.link.connected.is_set() and not lost.is_set():
                try:
                    records = await self.outbox.fetch(cursor, limit=self.max_inflight * 4)
                except (sqlite3.Error, OSError) as exc:
                    self._log.warning("outbox unreadable; retrying", error=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                if not records:
                    await self.outbox.wait_for_records(cursor, timeout=1.0)
                    continue
                for record in records:
                    await window.acquire()
                    if lost.is_set():
                        window.release()
                        break
                    task = asyncio.create_task(self._send(record, window, lost))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                    cursor = record.id
        finally:
            unregister()
            for task in list(inflight):
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)

    async def _send(self, record: Record, window: asyncio.Semaphore, lost: asyncio.Event) -> None:
        try:
            await self.link.publish(record.topic, record.envelope(time.time()), qos=1)
        except LinkDown:
            lost.set()  # the rest of this pass would fail too; restart from the oldest record
        except PublishRefused as exc:
            await self.outbox.dead_letter(record, exc.reason)
        else:
            self.sent += 1
            self._acked.append(record.id)
            if len(self._acked) >= ACK_BATCH:
                self._ack_ready.set()
        finally:
            window.release()

    async def _ack_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ack_ready.wait(), ACK_INTERVAL_S)
            self._ack_ready.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        if not self._acked:
            return
        ids, self._acked = self._acked, []
        try:
            await self.outbox.ack(ids)
        except Exception as exc:  # store trouble: keep them; a later flush retries
            self._acked[:0] = ids
            self._log.warning("could not delete acknowledged records yet", error=str(exc))
