"""The durable PACS spool: one directory per (series, destination) holding hard links (or
copies) of the instance files and a JSON manifest that is replaced atomically after every change.

The manifest records which instances the PACS has confirmed, the consecutive failed attempts and
when to try next, so a restarted process resumes where it stopped; a job's directory is removed
only once every instance is confirmed. Layout and states: docs/pacs.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from medge.pacs.base import InstanceRef

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
INCOMING_PREFIX = ".incoming-"
JobState = Literal["pending", "failed"]


class SpoolError(Exception):
    """The spool cannot accept or read something; the message names the file and the reason."""


@dataclass
class SpoolEntry:
    file: str
    """File name inside the job directory (``<SOPInstanceUID>.dcm``)."""
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    confirmed: bool = False


@dataclass
class SpoolJob:
    directory: Path
    destination: str
    series_instance_uid: str
    entries: list[SpoolEntry]
    state: JobState = "pending"
    failures: int = 0
    """Consecutive failed attempts (reset by progress), drives the backoff."""
    next_attempt_at: float = 0.0
    """Unix time before which the job is not retried."""
    last_error: str = ""
    created_at: float = field(default_factory=time.time)

    @property
    def job_id(self) -> str:
        return self.directory.name

    @property
    def pending(self) -> list[SpoolEntry]:
        return [entry for entry in self.entries if not entry.confirmed]

    def ref(self, entry: SpoolEntry) -> InstanceRef:
        return InstanceRef(self.directory / entry.file, entry.sop_class_uid,
                           entry.sop_instance_uid, entry.transfer_syntax_uid)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        del data["directory"]
        data["version"] = MANIFEST_VERSION
        return data


def job_id_for(series_instance_uid: str, destination: str) -> str:
    """Stable id: re-queueing the same series for the same PACS lands in the same job."""
    return hashlib.sha256(f"{destination}\n{series_instance_uid}".encode()).hexdigest()[:20]


def _read_header(path: Path) -> tuple[str, SpoolEntry]:
    try:
        ds = dcmread(path, stop_before_pixels=True)
        entry = SpoolEntry(
            file=f"{ds.SOPInstanceUID}.dcm",
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        )
        return str(ds.SeriesInstanceUID), entry
    except (InvalidDicomError, OSError, AttributeError, KeyError, ValueError) as exc:
        raise SpoolError(f"{path}: not a DICOM instance the spool can send: {exc}") from exc


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no space; across file systems fall back to a copy."""
    try:
        os.link(source, target)
    except FileExistsError:
        return
    except OSError:
        shutil.copy2(source, target)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def enqueue(self, files: Iterable[Path], destination: str) -> list[SpoolJob]:
        """Queue ``files`` for ``destination``: one job per series. Re-queueing instances that
        are already queued is a no-op for them; a failed job goes back to pending."""
        by_series: dict[str, list[tuple[Path, SpoolEntry]]] = {}
        for path in files:
            series, entry = _read_header(Path(path))
            by_series.setdefault(series, []).append((Path(path), entry))
        if not by_series:
            raise SpoolError("nothing to queue: no files given")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return [self._enqueue_series(series, destination, items)
                    for series, items in by_series.items()]
        except OSError as exc:
            raise SpoolError(f"{self.directory}: cannot write to the spool: {exc}") from exc

    def _enqueue_series(self, series: str, destination: str,
                        items: list[tuple[Path, SpoolEntry]]) -> SpoolJob:
        final = self.directory / job_id_for(series, destination)
        existing = self.load(final) if (final / MANIFEST).exists() else None
        if existing is None:
            staging = self.directory / f"{INCOMING_PREFIX}{uuid.uuid4().hex}"
            staging.mkdir()
            job = SpoolJob(staging, destination, series, [])
        else:
            job = existing
        known = {entry.sop_instance_uid for entry in job.entries}
        for source, entry in items:
            if entry.sop_instance_uid in known:
                continue
            _link_or_copy(source, job.directory / entry.file)
            job.entries.append(entry)
            known.add(entry.sop_instance_uid)
        job.state, job.failures, job.next_attempt_at, job.last_error = "pending", 0, 0.0, ""
        self.save(job)
        if existing is None:
            os.replace(job.directory, final)  # the job appears whole or not at all
            _fsync_directory(self.directory)
            job.directory = final
        return job

    def save(self, job: SpoolJob) -> None:
        """Replace the manifest atomically (write, fsync, rename, fsync the directory)."""
        temporary = job.directory / f".{MANIFEST}.{uuid.uuid4().hex}"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(job.to_json(), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, job.directory / MANIFEST)
        _fsync_directory(job.directory)

    def load(self, directory: Path) -> SpoolJob:
        path = directory / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != MANIFEST_VERSION:
                raise SpoolError(f"{path}: manifest version {data.get('version')!r} unsupported")
            entries = [SpoolEntry(**entry) for entry in data["entries"]]
            return SpoolJob(
                directory=directory, destination=str(data["destination"]),
                series_instance_uid=str(data["series_instance_uid"]), entries=entries,
                state=data["state"], failures=int(data["failures"]),
                next_attempt_at=float(data["next_attempt_at"]),
                last_error=str(data["last_error"]), created_at=float(data["created_at"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SpoolError(f"{path}: unreadable spool manifest: {exc}") from exc

    def jobs(self) -> list[SpoolJob]:
        """Every queued job, oldest first; leftovers of an interrupted enqueue are removed."""
        if not self.directory.is_dir():
            return []
        found = []
        for child in sorted(self.directory.iterdir()):
            if child.name.startswith(INCOMING_PREFIX):
                shutil.rmtree(child, ignore_errors=True)
            elif child.is_dir() and (child / MANIFEST).exists():
                found.append(self.load(child))
        return sorted(found, key=lambda job: job.created_at)

    def remove(self, job: SpoolJob) -> None:
        """Drop a fully confirmed job (refuses one with unconfirmed instances)."""
        if job.pending:
            raise SpoolError(f"{job.directory}: {len(job.pending)} instance(s) not yet confirmed")
        with contextlib.suppress(FileNotFoundError):
            (job.directory / MANIFEST).unlink()  # a crash mid-removal leaves no job behind
        shutil.rmtree(job.directory, ignore_errors=True)
