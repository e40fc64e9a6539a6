"""The durable outbox on its own: bounds and overflow policy, TTL, sequence numbers, and a
store that is corrupt or cannot be written."""

from __future__ import annotations

import asyncio
import resource
import signal
import sqlite3
from pathlib import Path

import pytest

from medge.outbox import Outbox, OutboxError
from medge.settings import OutboxSection
from medge.topics import Topics

TOPICS = Topics("site", "node")


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def body(size: int) -> bytes:
    return b'"' + b"x" * (size - 2) + b'"'


async def test_append_is_durable_and_seq_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    async with Outbox(path, OutboxSection(), TOPICS) as outbox:
        first = [await outbox.append("dev", "obs", {"n": i}) for i in range(3)]
    assert [r.seq for r in first] == [1, 2, 3]
    assert len({r.msg_id for r in first}) == 3
    # a second process opening the same file sees every record and continues the sequence
    async with Outbox(path, OutboxSection(), TOPICS) as reopened:
        stored = await reopened.fetch(0)
        assert [r.msg_id for r in stored] == [r.msg_id for r in first]
        nxt = await reopened.append("dev", "obs", {"n": 3})
    assert nxt.seq == 4


async def test_concurrent_appends_share_commits_and_keep_order(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.sqlite3", OutboxSection(), TOPICS) as outbox:
        records = await asyncio.gather(*(outbox.append("dev", "obs", {"n": i}) for i in range(500)))
        assert [r.seq for r in records] == list(range(1, 501))
        assert [r.id for r in await outbox.fetch(0, 1000)] == [r.id for r in records]


async def test_ack_deletes_only_acknowledged(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.sqlite3", OutboxSection(), TOPICS) as outbox:
        records = [await outbox.append("dev", "obs", {"n": i}) for i in range(4)]
        await outbox.ack([records[0].id, records[2].id])
        left = await outbox.fetch(0)
        assert [r.seq for r in left] == [2, 4]
        assert outbox.health().depth == 2


async def test_overflow_evicts_ephemeral_then_routine_and_alerts_last(tmp_path: Path) -> None:
    cfg = OutboxSection(max_bytes=64 * 1024, ttl={})
    async with Outbox(tmp_path / "o.sqlite3", cfg, TOPICS) as outbox:
        alerts = [await outbox.append("spo2", "alert", body(4000)) for _ in range(4)]
        states = [await outbox.append("spo2", "state", body(4000)) for _ in range(4)]
        routine = [await outbox.append("spo2", "obs", body(4000)) for _ in range(8)]
        # 16 x 4000 bytes = 64000 of 65536: the next routine record must evict
        await outbox.append("spo2", "obs", body(4000))
        kept = {r.msg_id for r in await outbox.fetch(0, 100)}
        assert not kept & {r.msg_id for r in states[:1]}, "ephemeral state goes first"
        assert {r.msg_id for r in routine} <= kept
        assert {r.msg_id for r in alerts} <= kept
        # keep filling with routine data: all state goes, then oldest routine, never an alert
        for _ in range(12):
            await outbox.append("spo2", "obs", body(4000))
        kept = {r.msg_id for r in await outbox.fetch(0, 100)}
        assert {r.msg_id for r in alerts} <= kept, "alerts survive eviction of routine data"
        assert not kept & {r.msg_id for r in states}
        assert routine[0].msg_id not in kept
        health = outbox.health()
        assert health.bytes <= cfg.max_bytes
        assert health.drops["overflow:state"] == 4
        assert health.drops["overflow:obs"] >= 1


async def test_routine_record_cannot_evict_alerts(tmp_path: Path) -> None:
    cfg = OutboxSection(max_bytes=64 * 1024)
    async with Outbox(tmp_path / "o.sqlite3", cfg, TOPICS) as outbox:
        alerts = [await outbox.append("vent", "alert", body(8000)) for _ in range(8)]
        with pytest.raises(OutboxError, match="higher-priority"):
            await outbox.append("vent", "obs", body(4000))
        assert {r.msg_id for r in alerts} == {r.msg_id for r in await outbox.fetch(0)}
        assert outbox.health().drops["overflow:obs"] == 1
        # a new alert still gets in, by evicting the oldest alert
        newest = await outbox.append("vent", "alert", body(4000))
        kept = [r.msg_id for r in await outbox.fetch(0)]
        assert newest.msg_id in kept and alerts[0].msg_id not in kept


async def test_record_larger_than_the_bound_is_refused(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.sqlite3", OutboxSection(max_bytes=65536), TOPICS) as outbox:
        with pytest.raises(OutboxError, match="can never fit"):
            await outbox.append("dev", "obs", body(70000))


async def test_nearing_the_bound_raises_and_clears_pressure(tmp_path: Path) -> None:
    events: list[bool] = []
    cfg = OutboxSection(max_bytes=64 * 1024, warn_fraction=0.5)
    async with Outbox(tmp_path / "o.sqlite3", cfg, TOPICS,
                      on_pressure=lambda high, fill: events.append(high)) as outbox:
        records = [await outbox.append("d", "obs", body(4000)) for _ in range(10)]
        assert events == [True]
        await outbox.ack([r.id for r in records])
        await outbox.append("d", "obs", body(100))
        assert events == [True, False]


async def test_ttl_drops_expired_ephemeral_records_and_counts_them(tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = OutboxSection(ttl={"state": 60.0})
    async with Outbox(tmp_path / "o.sqlite3", cfg, TOPICS, clock=clock) as outbox:
        stale = await outbox.append("robot", "state", {"pose": 1})
        obs = await outbox.append("robot", "obs", {"v": 1})
        alert = await outbox.append("robot", "alert", {"a": 1})
        clock.now += 61
        fresh = await outbox.append("robot", "state", {"pose": 2})
        ids = [r.msg_id for r in await outbox.fetch(0)]
        assert stale.msg_id not in ids, "an expired record is never sent as live"
        assert ids == [obs.msg_id, alert.msg_id, fresh.msg_id]
        clock.now += 10 * 24 * 3600  # clinical data and alerts have no TTL: days late beats lost
        assert [r.msg_id for r in await outbox.fetch(0)] == [obs.msg_id, alert.msg_id]
        assert outbox.health().drops == {"expired:state": 2}


async def test_corrupt_database_is_moved_aside_and_a_fresh_one_started(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    async with Outbox(path, OutboxSection(), TOPICS) as outbox:
        record = await outbox.append("dev", "obs", {"n": 1})
        health = outbox.health()
    assert record.seq == 1
    assert len(health.quarantined) == 1
    kept = Path(health.quarantined[0])
    assert kept.read_bytes().startswith(b"this is not a database"), "never silently discarded"
    assert health.drops["corrupt_store_quarantined"] == 1


async def test_full_disk_is_reported_and_appends_wait_until_space_returns(
    tmp_path: Path,
) -> None:
    """Disk full (simulated with RLIMIT_FSIZE): the append neither fails nor discards; it waits,
    the error is reported in health, and it completes once space is back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        async with Outbox(tmp_path / "o.sqlite3", OutboxSection(), TOPICS) as outbox:
            await outbox.append("dev", "obs", {"n": 0})
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
            try:
                pending = asyncio.create_task(outbox.append("dev", "obs", body(512 * 1024)))
                await _wait(lambda: outbox.health().store_error is not None)
                assert not pending.done()
                assert "full" in (outbox.health().store_error or "")
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            record = await asyncio.wait_for(pending, 15)
            assert record.seq == 2
            assert outbox.health().store_error is None
    finally:
        signal.signal(signal.SIGXFSZ, previous)


async def test_read_only_database_file_is_retried_not_discarded(tmp_path: Path) -> None:
    """A read-only store (as after a filesystem remount): the append waits and reports, then
    completes once the store is writable again."""
    path = tmp_path / "outbox.sqlite3"
    async with Outbox(path, OutboxSection(), TOPICS) as outbox:
        await outbox.append("dev", "obs", {"n": 0})
        blocker = sqlite3.connect(path, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")  # the store cannot be written while this holds
        try:
            pending = asyncio.create_task(outbox.append("dev", "obs", {"n": 1}))
            await _wait(lambda: outbox.health().store_error is not None)
            assert not pending.done()
            assert "locked" in (outbox.health().store_error or "")
        finally:
            blocker.rollback()
            blocker.close()
        record = await asyncio.wait_for(pending, 15)
        assert record.seq == 2
        assert outbox.health().store_error is None


async def _wait(predicate: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)
