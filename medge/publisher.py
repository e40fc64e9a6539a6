"""Moves records from the durable outbox to the broker, in order, at QoS 1.

While connected it sends the oldest unacknowledged records first with up to ``max_inflight``
PUBACKs outstanding (pipelined: no task per message), deletes each record only after its PUBACK,
and then follows new records as they are committed. Alerts go ahead of routine data: each pass
sends every pending alert before the next chunk of the routine backlog (order is kept within
each stream, and alerts are streams of their own). On link loss everything in flight is
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
from collections.abc import Awaitable

import structlog

from medge.aio import cancel_and_wait
from medge.mqtt import LinkDown, MqttLink
from medge.outbox import Outbox, Record

ACK_BATCH = 256
ACK_INTERVAL_S = 0.02
IDLE_RECHECK_S = 5.0
"""An idle publisher wakes on new records; this is only a safety net."""


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
        self._ack_pending = asyncio.Event()
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
        cursors = {True: 0, False: 0}  # alerts, everything else
        try:
            while self.link.connected.is_set() and not lost.is_set():
                await self._settle_refused()
                newest = self.outbox.last_id
                sent_any = False
                for critical in (True, False):
                    try:
                        records = await self.outbox.fetch(
                            cursors[critical], limit=self.max_inflight * 4, critical=critical
                        )
                    except (sqlite3.Error, OSError) as exc:
                        self._log.warning("outbox unreadable; retrying", error=str(exc))
                        await asyncio.sleep(1.0)
                        break
                    for record in records:
                        if not await self._window_open(lost):
                            return
                        self.link.publish_pipelined(
                            record.topic, record.envelope(time.time()),
                            functools.partial(self._on_ack, generation, record),
                        )
                        self._inflight += 1
                        cursors[critical] = record.id
                    sent_any = sent_any or bool(records)
                if not sent_any:
                    await self._unless_lost(
                        self.outbox.wait_for_records(newest, timeout=IDLE_RECHECK_S), lost
                    )
        finally:
            unregister()

    async def _window_open(self, lost: asyncio.Event) -> bool:
        """Wait for a free in-flight slot; False if the link was lost meanwhile."""
        while self._inflight >= self.max_inflight and not lost.is_set():
            self._progress.clear()
            await self._unless_lost(self._progress.wait(), lost)
        return not lost.is_set()

    @staticmethod
    async def _unless_lost(awaitable: Awaitable[object], lost: asyncio.Event) -> None:
        """Wait for ``awaitable`` or for the link to be lost, whichever comes first."""
        waiters = [asyncio.ensure_future(awaitable), asyncio.ensure_future(lost.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(waiters)

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
        self._ack_pending.set()

    async def _settle_refused(self) -> None:
        while self._refused:
            record, reason = self._refused.pop(0)
            await self.outbox.dead_letter(record, reason)

    async def _ack_loop(self) -> None:
        """Delete acknowledged records in batches; sleeps while there is nothing to do."""
        while True:
            await self._ack_pending.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ACK_INTERVAL_S):
                    await self._ack_ready.wait()
            self._ack_pending.clear()
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
            self._ack_pending.set()
            self._log.warning("could not delete acknowledged records yet", error=str(exc))
