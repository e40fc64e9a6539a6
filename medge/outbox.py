"""Durable store-and-forward outbox: SQLite in WAL mode under the daemon's state directory.

The contract (docs/telemetry.md, "Delivery guarantees"):

- :meth:`Outbox.append` returns only once the record is committed (``sync = "full"`` fsyncs the
  WAL). Appends that arrive while a commit is running share the next commit (group commit), so
  throughput does not collapse to one fsync per message.
- Every record gets a unique ``msg_id`` and a per-stream ``seq`` assigned inside the committing
  transaction, so a consumer sees no gap that was not a real loss.
- A record is deleted only by :meth:`ack` (after its PUBACK): at-least-once, in order per stream.
- Bounded by payload bytes. Overflow evicts ephemeral kinds first, then routine observations,
  alerts last, oldest first within a class; every eviction is logged and counted. A per-kind TTL
  drops stale ephemeral records (counted) instead of sending them late as if live.
- A database that cannot be written (read-only, disk full) is reported and retried; appends wait
  rather than discard. A file that is not a database is moved aside (kept, never deleted) and a
  fresh one started.

SQLite runs on one dedicated worker thread so that fsyncs never stall the daemon's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from medge.log import StateLog
from medge.settings import OutboxSection
from medge.topics import Topics

T = TypeVar("T")

EPHEMERAL, ROUTINE, CRITICAL = 0, 1, 2
"""Eviction classes: lower goes first when the outbox is full."""
_CLASS_OF_KIND = {"status": EPHEMERAL, "state": EPHEMERAL, "health": EPHEMERAL, "alert": CRITICAL}

HISTORICAL_AFTER_S = 10.0
"""A record sent later than this after it was made is flagged historical, as is any record made
while the link was down."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    device TEXT NOT NULL,
    kind TEXT NOT NULL,
    class INTEGER NOT NULL,
    topic TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    offline INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_class ON records (class, id);
CREATE TABLE IF NOT EXISTS streams (stream TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY, msg_id TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL,
    kind TEXT NOT NULL, topic TEXT NOT NULL, created_at REAL NOT NULL, body BLOB NOT NULL,
    reason TEXT NOT NULL, refused_at REAL NOT NULL
);
"""


class OutboxError(RuntimeError):
    """The outbox refused a record (it can never fit, or it was evicted on arrival)."""


@dataclass(frozen=True)
class Record:
    id: int
    stream: str
    seq: int
    msg_id: str
    device: str
    kind: str
    topic: str
    created_at: float
    expires_at: float | None
    offline: bool
    body: bytes
    """The message body, already JSON-encoded."""

    def envelope(self, sent_at: float) -> bytes:
        """The wire message: the envelope around the stored body (docs/telemetry.md)."""
        historical = self.offline or sent_at - self.created_at > HISTORICAL_AFTER_S
        head = json.dumps(
            {
                "msg_id": self.msg_id,
                "seq": self.seq,
                "stream": self.stream,
                "device": self.device,
                "kind": self.kind,
                "created_at": _iso(self.created_at),
                "sent_at": _iso(sent_at),
                "historical": historical,
            },
            separators=(",", ":"),
        )
        return head[:-1].encode() + b',"body":' + self.body + b"}"


def _compact_json(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


@dataclass
class OutboxHealth:
    depth: int
    bytes: int
    max_bytes: int
    oldest_age_s: float | None
    drops: dict[str, int]
    last_publish_at: float | None
    store_error: str | None
    quarantined: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "bytes": self.bytes,
            "fill": round(self.bytes / self.max_bytes, 4),
            "oldest_age_s": None if self.oldest_age_s is None else round(self.oldest_age_s, 3),
            "drops": dict(self.drops),
            "last_publish_at": None if self.last_publish_at is None else _iso(self.last_publish_at),
            "store_error": self.store_error,
            "quarantined": list(self.quarantined),
        }


@dataclass
class _Draft:
    msg_id: str
    stream: str
    device: str
    kind: str
    klass: int
    topic: str
    created_at: float
    expires_at: float | None
    offline: bool
    body: bytes


class Outbox:
    """One daemon's durable queue. ``async with Outbox(path, cfg, topics) as outbox: ...``"""

    def __init__(
        self,
        path: Path,
        cfg: OutboxSection,
        topics: Topics,
        *,
        on_pressure: Callable[[bool, float], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.cfg = cfg
        self.topics = topics
        self.link_up = False
        """Set by the publisher; records appended while False are flagged historical."""
        self.last_publish_at: float | None = None
        self._on_pressure = on_pressure
        self._clock = clock
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[_Draft, asyncio.Future[Record]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._new_records = asyncio.Condition()
        self._changed = asyncio.Condition()
        self.last_id = 0
        """Id of the newest committed record (the publisher compares its cursor to it)."""
        # The fields below are owned by the worker thread; the loop only reads them.
        self._bytes = 0
        self._depth = 0
        self._oldest_created: float | None = None
        self._last_seq: dict[str, int] = {}
        self._drops: dict[str, int] = {}
        self._quarantined: list[str] = []
        self._store_error: str | None = None
        self._pressure = False
        self._log = structlog.get_logger().bind(component="outbox")
        self._store_state = StateLog(self._log, "outbox store")

    async def __aenter__(self) -> Outbox:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Start the worker; an unwritable store is reported and retried, not fatal."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        try:
            await self._run(self._ensure_db)
        except (sqlite3.Error, OSError) as exc:
            self._report_store_error(exc)

    async def close(self) -> None:
        """Wait for appends in progress (bounded by the caller's own shutdown timeout)."""
        if self._flusher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self._executor is not None:
            with contextlib.suppress(sqlite3.Error, OSError):
                await self._run(self._close_db)
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("outbox is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # ---- producer side -------------------------------------------------------------------

    async def append(
        self,
        device: str,
        kind: str,
        body: Mapping[str, Any] | bytes,
        *,
        stream: str | None = None,
        created_at: float | None = None,
    ) -> Record:
        """Store one message durably; return it with its ``msg_id`` and ``seq``."""
        topic = self.topics.topic(device, kind)
        payload = body if isinstance(body, bytes) else _compact_json(body)
        if len(payload) > self.cfg.max_bytes:
            raise OutboxError(
                f"{kind} message of {len(payload)} bytes can never fit in the outbox "
                f"(max_bytes = {self.cfg.max_bytes})"
            )
        created = self._clock() if created_at is None else created_at
        ttl = self.cfg.ttl.get(kind)
        draft = _Draft(
            msg_id=uuid.uuid4().hex,
            stream=stream or f"{device}/{kind}",
            device=device,
            kind=kind,
            klass=_CLASS_OF_KIND.get(kind, ROUTINE),
            topic=topic,
            created_at=created,
            expires_at=None if ttl is None else created + ttl,
            offline=not self.link_up,
            body=payload,
        )
        future: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._pending.append((draft, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_pending(), name="outbox-commit")
        return await future

    async def _flush_pending(self) -> None:
        """Commit everything pending, in batches; appends that arrive meanwhile join the next."""
        delay = 0.5
        while self._pending:
            if self.cfg.group_commit_ms:
                await asyncio.sleep(self.cfg.group_commit_ms / 1000)
            batch, self._pending = self._pending, []
            try:
                outcomes = await self._run(self._commit, [draft for draft, _ in batch])
            except (sqlite3.Error, OSError) as exc:
                self._report_store_error(exc)
                self._pending[:0] = batch  # keep order; nothing is discarded
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.5
            self._report_store_ok()
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, Record):
                    future.set_result(outcome)
                else:
                    future.set_exception(OutboxError(outcome))
            self._check_pressure()
            async with self._new_records:
                self._new_records.notify_all()

    def _report_store_error(self, exc: BaseException) -> None:
        self._store_error = f"{self.path}: {exc}"
        self._store_state.set("unavailable", level="error", error=self._store_error)

    def _report_store_ok(self) -> None:
        self._store_error = None
        if self._store_state.state is not None:
            self._store_state.set("available")

    def _check_pressure(self) -> None:
        fill = self._bytes / self.cfg.max_bytes
        high = fill >= self.cfg.warn_fraction
        low = fill < self.cfg.warn_fraction * 0.9  # hysteresis: no alert flapping
        if high and not self._pressure:
            self._pressure = True
            self._log.warning("outbox nearly full", fill=round(fill, 3))
            if self._on_pressure:
                self._on_pressure(True, fill)
        elif low and self._pressure:
            self._pressure = False
            self._log.info("outbox pressure relieved", fill=round(fill, 3))
            if self._on_pressure:
                self._on_pressure(False, fill)

    # ---- publisher side ------------------------------------------------------------------

    async def wait_for_records(self, after_id: int, timeout: float | None = None) -> bool:
        """Wait until a record newer than ``after_id`` is committed; False on timeout."""
        async with self._new_records:
            try:  # asyncio.timeout, not wait_for: in 3.11 that can drop a cancel (gh-86296)
                async with asyncio.timeout(timeout):
                    await self._new_records.wait_for(lambda: self.last_id > after_id)
            except TimeoutError:
                return False
        return True

    async def wait_empty(self, timeout: float | None = None) -> bool:
        """Wait until every record is acknowledged (or dropped); False on timeout."""
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: self._depth == 0)
            except TimeoutError:
                return False
        return True

    async def fetch(
        self, after_id: int, limit: int = 500, *, critical: bool | None = None
    ) -> list[Record]:
        """Unsent-or-unacked records after ``after_id`` in order; expired ones are dropped.

        ``critical`` True: alerts only; False: everything but alerts; None: all."""
        return await self._run(self._fetch, after_id, limit, critical)

    async def ack(self, ids: Sequence[int]) -> None:
        """Delete records whose PUBACK arrived."""
        if ids:
            await self._run(self._delete_acked, list(ids))
            self.last_publish_at = self._clock()
            async with self._changed:
                self._changed.notify_all()

    async def dead_letter(self, record: Record, reason: str) -> None:
        """Set aside a record the broker refuses for good (e.g. ACL): kept, counted, not resent."""
        await self._run(self._dead_letter, record, reason)
        self._log.error("record refused by the broker; kept as a dead letter", kind=record.kind,
                        msg_id=record.msg_id, reason=reason)

    async def sweep(self) -> None:
        """Drop expired records now (the fetch path also drops them)."""
        await self._run(self._drop_expired)

    async def oldest_unacked_seq(self) -> dict[str, int]:
        """Per stream, the lowest ``seq`` still stored (unsent or unacked); streams absent from
        the result have everything delivered. Read-only: for "delivered to the clinic" views."""
        return await self._run(self._oldest_unacked_seq)

    def last_seq(self, stream: str) -> int:
        """The newest committed ``seq`` of ``stream`` (0 if none): lets a producer resume."""
        return self._last_seq.get(stream, 0)

    def health(self) -> OutboxHealth:
        oldest = self._oldest_created
        return OutboxHealth(
            depth=self._depth,
            bytes=self._bytes,
            max_bytes=self.cfg.max_bytes,
            oldest_age_s=None if oldest is None else max(0.0, self._clock() - oldest),
            drops=dict(self._drops),
            last_publish_at=self.last_publish_at,
            store_error=self._store_error,
            quarantined=list(self._quarantined),
        )

    # ---- worker thread -------------------------------------------------------------------

    def _ensure_db(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = self._connect()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise  # cannot open or write: retried, never moved aside
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    side.rename(aside.with_name(aside.name + suffix))
            self._quarantined.append(str(aside))
            self._log.error("outbox database is corrupt; moved aside and started afresh",
                            path=str(self.path), kept_as=str(aside), error=str(exc))
            db = self._connect()
            self._count(db, "corrupt_store_quarantined", 1)
            db.commit()
        self._db = db
        self._load_state(db)
        return db

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            db.execute("PRAGMA journal_mode=WAL").fetchone()
            db.execute(f"PRAGMA synchronous={self.cfg.sync.upper()}")
            db.executescript(_SCHEMA)
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _load_state(self, db: sqlite3.Connection) -> None:
        depth, size, last_id = db.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0), coalesce(max(id), 0) FROM records"
        ).fetchone()
        self._depth, self._bytes = depth, size
        self._refresh_oldest(db)
        seq_row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        self.last_id = max(last_id, seq_row[0] if seq_row else 0)
        self._last_seq = dict(db.execute("SELECT stream, last_seq FROM streams").fetchall())
        self._drops.update(db.execute("SELECT name, value FROM counters").fetchall())

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _count(self, db: sqlite3.Connection, name: str, amount: int) -> None:
        self._drops[name] = self._drops.get(name, 0) + amount
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )

    def _commit(self, drafts: list[_Draft]) -> list[Record | str]:
        db = self._ensure_db()
        outcomes: list[Record | str] = []
        last_seq = dict(self._last_seq)
        state = (self._bytes, self._depth, dict(self._drops))
        db.execute("BEGIN IMMEDIATE")
        try:
            for draft in drafts:
                if not self._make_room(db, len(draft.body), draft.klass):
                    self._count(db, f"overflow:{draft.kind}", 1)
                    self._log.warning("outbox full: new record dropped", kind=draft.kind,
                                      stream=draft.stream)
                    outcomes.append(f"outbox full of higher-priority data: {draft.kind} dropped")
                    continue
                seq = last_seq.get(draft.stream, 0) + 1
                last_seq[draft.stream] = seq
                cursor = db.execute(
                    "INSERT INTO records (stream, seq, msg_id, device, kind, class, topic,"
                    " created_at, expires_at, offline, body) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (draft.stream, seq, draft.msg_id, draft.device, draft.kind, draft.klass,
                     draft.topic, draft.created_at, draft.expires_at, int(draft.offline),
                     draft.body),
                )
                record_id = cursor.lastrowid
                assert record_id is not None
                self._bytes += len(draft.body)
                self._depth += 1
                outcomes.append(Record(record_id, draft.stream, seq, draft.msg_id, draft.device,
                                       draft.kind, draft.topic, draft.created_at,
                                       draft.expires_at, draft.offline, draft.body))
            db.executemany(
                "INSERT INTO streams (stream, last_seq) VALUES (?, ?)"
                " ON CONFLICT(stream) DO UPDATE SET last_seq = excluded.last_seq",
                [(s, q) for s, q in last_seq.items() if self._last_seq.get(s) != q],
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._bytes, self._depth, self._drops = state
            raise
        self._last_seq = last_seq
        records = [o for o in outcomes if isinstance(o, Record)]
        if records:
            self.last_id = records[-1].id
            if self._oldest_created is None:
                self._oldest_created = records[0].created_at
        return outcomes

    def _make_room(self, db: sqlite3.Connection, size: int, klass: int) -> bool:
        """Evict stored records of class <= ``klass``, lowest class and oldest first."""
        excess = self._bytes + size - self.cfg.max_bytes
        if excess <= 0:
            return True
        victims: list[tuple[int, str, int]] = []
        freed = 0
        for evict_class in range(klass + 1):
            rows = db.execute(
                "SELECT id, kind, length(body) FROM records WHERE class = ? ORDER BY id",
                (evict_class,),
            )
            for row in rows:
                victims.append(row)
                freed += row[2]
                if freed >= excess:
                    break
            if freed >= excess:
                break
        if freed < excess:
            return False
        by_kind: dict[str, int] = {}
        for _, kind, _ in victims:
            by_kind[kind] = by_kind.get(kind, 0) + 1
        db.executemany("DELETE FROM records WHERE id = ?", [(v[0],) for v in victims])
        for kind, count in by_kind.items():
            self._count(db, f"overflow:{kind}", count)
        self._log.warning("outbox full: evicted oldest records", evicted=by_kind)
        self._bytes -= freed
        self._depth -= len(victims)
        self._refresh_oldest(db)
        return True

    def _refresh_oldest(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT created_at FROM records ORDER BY id LIMIT 1").fetchone()
        self._oldest_created = row[0] if row else None

    def _fetch(self, after_id: int, limit: int, critical: bool | None) -> list[Record]:
        db = self._ensure_db()
        self._drop_expired()
        which = {None: "", True: f" AND class = {CRITICAL}", False: f" AND class < {CRITICAL}"}
        rows = db.execute(
            "SELECT id, stream, seq, msg_id, device, kind, topic, created_at, expires_at,"
            f" offline, body FROM records WHERE id > ?{which[critical]} ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [Record(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], bool(r[9]), r[10])
                for r in rows]

    def _oldest_unacked_seq(self) -> dict[str, int]:
        rows = self._ensure_db().execute(
            "SELECT stream, MIN(seq) FROM records GROUP BY stream").fetchall()
        return {stream: seq for stream, seq in rows}

    def _drop_expired(self) -> None:
        db = self._ensure_db()
        now = self._clock()
        expired = db.execute(
            "SELECT id, kind, length(body) FROM records WHERE expires_at IS NOT NULL"
            " AND expires_at <= ?",
            (now,),
        ).fetchall()
        if not expired:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("DELETE FROM records WHERE id = ?", [(e[0],) for e in expired])
            by_kind: dict[str, int] = {}
            for _, kind, _ in expired:
                by_kind[kind] = by_kind.get(kind, 0) + 1
            for kind, count in by_kind.items():
                self._count(db, f"expired:{kind}", count)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self._bytes -= sum(e[2] for e in expired)
        self._depth -= len(expired)
        self._refresh_oldest(db)
        self._log.info("expired records dropped", dropped=by_kind)

    def _dead_letter(self, record: Record, reason: str) -> None:
        db = self._ensure_db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT OR REPLACE INTO dead_letters (id, msg_id, stream, seq, kind, topic,"
                " created_at, body, reason, refused_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (record.id, record.msg_id, record.stream, record.seq, record.kind, record.topic,
                 record.created_at, record.body, reason, self._clock()),
            )
            self._count(db, f"refused:{record.kind}", 1)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self._delete_acked([record.id])

    def _delete_acked(self, ids: list[int]) -> None:
        db = self._ensure_db()
        # A delete lost to a power cut only means a duplicate later: no fsync needed for it.
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._delete_rows(db, ids)
        finally:
            db.execute(f"PRAGMA synchronous={self.cfg.sync.upper()}")

    def _delete_rows(self, db: sqlite3.Connection, ids: list[int]) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            sizes = 0
            deleted = 0
            for chunk_start in range(0, len(ids), 500):
                chunk = ids[chunk_start : chunk_start + 500]
                marks = ",".join("?" * len(chunk))
                count, size = db.execute(
                    f"SELECT count(*), coalesce(sum(length(body)), 0) FROM records"
                    f" WHERE id IN ({marks})",
                    chunk,
                ).fetchone()
                db.execute(f"DELETE FROM records WHERE id IN ({marks})", chunk)
                sizes += size
                deleted += count
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self._bytes -= sizes
        self._depth -= deleted
        self._refresh_oldest(db)
