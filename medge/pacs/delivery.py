"""Sending spooled jobs: instance by instance over one connection per attempt, confirming each
in the manifest, with exponential backoff after transient failures. Permanent failures mark the
job ``failed`` (data kept) and raise, so the operator sees them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from medge.pacs.base import PacsError, PacsSender, PermanentPacsError, TransientPacsError
from medge.pacs.config import Destination, RetryPolicy
from medge.pacs.cstore import CStoreSender
from medge.pacs.spool import Spool, SpoolJob
from medge.pacs.stow import StowSender

log = structlog.get_logger("medge.pacs")

SenderFactory = Callable[[str, Destination], PacsSender]


def make_sender(name: str, destination: Destination) -> PacsSender:
    if destination.protocol == "dimse":
        return CStoreSender(name, destination)
    return StowSender(name, destination)


@dataclass(frozen=True)
class Progress:
    job_id: str
    destination: str
    confirmed: int
    total: int
    instance: str
    """File name of the instance just confirmed."""


class SpoolDelivery:
    def __init__(
        self,
        spool: Spool,
        destinations: Mapping[str, Destination],
        retry: RetryPolicy,
        *,
        sender_factory: SenderFactory = make_sender,
        on_progress: Callable[[Progress], None] | None = None,
        on_failure: Callable[[SpoolJob, PacsError], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.destinations = destinations
        self.retry = retry
        self.sender_factory = sender_factory
        self.on_progress = on_progress
        self.on_failure = on_failure
        self.clock = clock
        """Wall time: the due times live in the spool and must mean the same after a restart."""
        self._wake = asyncio.Event()

    def wait_s(self, job: SpoolJob) -> float:
        """Seconds until ``job`` is due. Never more than the longest backoff: a due time further
        away than that was computed before the wall clock stepped back (NTP fixing a wrong
        RTC), and waiting for it would hold a slide back for as long as the step."""
        ahead = job.next_attempt_at - self.clock()
        return 0.0 if ahead > self.retry.max_s else max(0.0, ahead)

    async def attempt(self, job: SpoolJob) -> bool:
        """One delivery attempt. True: every instance confirmed and the job removed; False: a
        transient failure, retry after ``job.next_attempt_at``. Raises PermanentPacsError."""
        destination = self.destinations.get(job.destination)
        try:
            if destination is None:
                raise PermanentPacsError(f"{job.destination}: destination not in the config")
            await self._send_pending(job, self.sender_factory(job.destination, destination))
        except TransientPacsError as exc:
            job.failures += 1
            job.last_error = str(exc)
            job.next_attempt_at = self.clock() + self.retry.delay(job.failures)
            self.spool.save(job)
            log.warning("pacs_delivery_retry", job=job.job_id, error=str(exc),
                        failures=job.failures, retry_in_s=self.retry.delay(job.failures))
            self._report_failure(job, exc)
            return False
        except PermanentPacsError as exc:
            job.state = "failed"
            job.last_error = str(exc)
            self.spool.save(job)
            log.error("pacs_delivery_failed", job=job.job_id, error=str(exc),
                      kept=str(job.directory))
            self._report_failure(job, exc)
            raise
        self.spool.remove(job)
        log.info("pacs_delivered", job=job.job_id, destination=job.destination,
                 instances=len(job.entries))
        return True

    def _report_failure(self, job: SpoolJob, error: PacsError) -> None:
        if self.on_failure is not None:
            self.on_failure(job, error)

    async def _send_pending(self, job: SpoolJob, sender: PacsSender) -> None:
        pending = job.pending
        for entry in pending:
            if not (job.directory / entry.file).is_file():
                raise PermanentPacsError(f"{job.directory / entry.file}: spooled file is missing")
        total = len(job.entries)
        async with sender:
            await sender.open([job.ref(entry) for entry in pending])
            for entry in pending:
                await sender.store(job.ref(entry))
                entry.confirmed = True
                job.failures = 0
                self.spool.save(job)
                if self.on_progress is not None:
                    done = total - len(job.pending)
                    self.on_progress(Progress(job.job_id, job.destination, done, total, entry.file))

    async def deliver(self, job: SpoolJob) -> None:
        """Attempt until delivered, waiting out the backoff between attempts (for the CLI and
        tests; the daemon uses :meth:`run`). Raises PermanentPacsError."""
        delivered = await self.attempt(job)
        while not delivered:
            await asyncio.sleep(self.wait_s(job))
            delivered = await self.attempt(job)

    def wake(self) -> None:
        """A job was queued: look at the spool now instead of at the next due time."""
        self._wake.set()

    async def run(self, stop: asyncio.Event, idle_s: float = 60.0) -> None:
        """Daemon loop: attempt every due pending job, then sleep until the next one is due, a
        wake-up, or ``stop``. Jobs survive restarts because their state is in the spool."""
        while not stop.is_set():
            self._wake.clear()
            jobs = [job for job in self.spool.jobs() if job.state == "pending"]
            for job in jobs:
                if self.wait_s(job) == 0.0 and not stop.is_set():
                    try:
                        await self.attempt(job)
                    except PermanentPacsError:
                        continue  # logged and kept; other jobs go on
            pending = [job for job in self.spool.jobs() if job.state == "pending"]
            await _wait_any(stop, self._wake,
                            min((self.wait_s(job) for job in pending), default=idle_s))


async def _wait_any(first: asyncio.Event, second: asyncio.Event, timeout: float) -> None:
    waiters = {asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())}
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
