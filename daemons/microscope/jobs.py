"""Scan jobs: what a technician asks for, the phases a scan goes through, and its durable state.

A job's state (spec, plan, focus map, captured tiles with positions and checksums, per-phase
timings) is one JSON document written atomically (temporary file, fsync, rename, fsync of the
directory), so after a crash or a power loss the daemon finds either the previous or the new
state, never half of one, and resumes from the first tile that is not on disk.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

PHASES = ("overview", "tissue", "plan", "focus", "acquire", "stitch", "dicom", "deliver",
          "report")
"""In order; a resumed job re-enters at the phase it was in (acquisition at its first missing
tile)."""

Status = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"done", "failed", "cancelled"})

TEXT_FIELD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
"""Barcodes, accession numbers and pseudonymous IDs: they end up in file names and DICOM."""

JOB_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")


class JobError(ValueError):
    """A job request is invalid; ``field`` names the offending field for the reply."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True)
class JobSpec:
    """One slide to scan, as submitted. ``area_mm`` is (x0, y0, x1, y1) on the slide in mm."""

    barcode: str
    accession: str
    patient: str
    objective: str
    stain: str = "HE"
    area_mm: tuple[float, float, float, float] | None = None
    pacs: str = ""
    """Destination name in the daemon's PACS config; empty: no delivery."""
    folder: str = ""
    """Local folder (on the scanner box) that receives a copy of the DICOM files."""
    jpeg_quality: int = 90

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["area_mm"] = list(self.area_mm) if self.area_mm else None
        return body


STAINS = frozenset({"HE", "H", "E"})


def parse_spec(payload: Any, objectives: set[str], destinations: set[str]) -> JobSpec:
    """Check a submitted job field by field; raise :class:`JobError` naming the first bad one."""
    if not isinstance(payload, dict):
        raise JobError("job", "must be a JSON object")
    known = set(JobSpec.__dataclass_fields__)
    if unknown := sorted(set(payload) - known):
        raise JobError(unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
    texts: dict[str, str] = {}
    for name in ("barcode", "accession", "patient"):
        value = payload.get(name)
        if not isinstance(value, str) or not TEXT_FIELD.match(value):
            raise JobError(name, "required: 1-64 letters, digits, '.', '_' or '-'")
        texts[name] = value
    stain = payload.get("stain", "HE")
    if not isinstance(stain, str) or stain not in STAINS:  # a list or object is unhashable
        raise JobError("stain", f"{stain!r} is not one of {', '.join(sorted(STAINS))}")
    objective = payload.get("objective")
    if not isinstance(objective, str) or objective not in objectives:
        raise JobError("objective",
                       f"{objective!r} is not calibrated (known: {', '.join(sorted(objectives))})")
    quality = payload.get("jpeg_quality", 90)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise JobError("jpeg_quality", f"{quality!r} must be an integer 1..100")
    pacs = payload.get("pacs", "")
    if not isinstance(pacs, str) or (pacs and pacs not in destinations):
        known_pacs = ", ".join(sorted(destinations)) or "none configured"
        raise JobError("pacs", f"{pacs!r} is not a configured destination (known: {known_pacs})")
    folder = payload.get("folder", "")
    if not isinstance(folder, str) or (folder and not os.path.isabs(folder)):
        raise JobError("folder", f"{folder!r} must be an absolute path on the scanner")
    return JobSpec(barcode=texts["barcode"], accession=texts["accession"],
                   patient=texts["patient"], objective=str(objective), stain=str(stain),
                   area_mm=_parse_area(payload.get("area_mm")), pacs=pacs, folder=folder,
                   jpeg_quality=quality)


def _parse_area(raw: Any) -> tuple[float, float, float, float] | None:
    if raw is None:
        return None
    if (not isinstance(raw, list | tuple) or len(raw) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw)):
        raise JobError("area_mm", "must be four numbers x0, y0, x1, y1 in mm")
    x0, y0, x1, y1 = (float(v) for v in raw)
    if not all(math.isfinite(v) and v >= 0 for v in (x0, y0, x1, y1)):
        raise JobError("area_mm", "coordinates must be finite and >= 0 mm")
    if not (x1 > x0 and y1 > y0):
        raise JobError("area_mm", "needs x1 > x0 and y1 > y0")
    return (x0, y0, x1, y1)


@dataclass
class TileRecord:
    """One captured tile: where the stage was (µm, commanded and reported) and its checksum."""

    index: int
    x_um: float
    y_um: float
    z_um: float
    sha256: str


@dataclass
class JobState:
    id: str
    spec: JobSpec
    status: Status = "queued"
    phase: str = ""
    message: str = ""
    created_at: float = field(default_factory=time.time)
    plan: list[tuple[float, float]] = field(default_factory=list)
    """Tile top-left positions on the slide, µm, in acquisition (serpentine) order."""
    plan_info: dict[str, Any] = field(default_factory=dict)
    focus: dict[str, Any] = field(default_factory=dict)
    """Focus map: surface degree, measured points (tile positions) and their residuals."""
    tiles: dict[int, TileRecord] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent per phase (summed over resumes)."""
    resumes: int = 0
    finished_at: float = 0.0
    """Wall time it last finished (0: not yet): ``medge scan list`` shows the newest."""
    delivery: str = ""
    """none | delivered | spooled | failed (PACS); empty until the delivery phase."""
    files_removed_at: float = 0.0
    """Wall time its tiles and DICOM files were removed, the PACS holding the series (0: kept)."""
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def settled(self) -> bool:
        """Nothing will change it any more (unless a technician resumes it): finished and not
        waiting for the PACS."""
        return self.finished and self.delivery != "spooled"

    def first_missing_tile(self) -> int:
        return next((i for i in range(len(self.plan)) if i not in self.tiles), len(self.plan))

    def summary(self) -> dict[str, Any]:
        """What status and list show: small enough to publish after every tile."""
        return {"job": self.id, "status": self.status, "phase": self.phase,
                "message": self.message, "barcode": self.spec.barcode,
                "accession": self.spec.accession, "tiles_done": len(self.tiles),
                "tiles_total": len(self.plan), "delivery": self.delivery,
                "resumes": self.resumes, "created_at": self.created_at}

    def to_json(self) -> dict[str, Any]:
        body = {name: getattr(self, name) for name in self.__dataclass_fields__}
        body["spec"] = self.spec.to_json()
        body["tiles"] = [vars(self.tiles[i]) for i in sorted(self.tiles)]
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> JobState:
        spec_body = dict(body["spec"])
        area = spec_body.pop("area_mm", None)
        spec = JobSpec(**spec_body, area_mm=tuple(area) if area else None)
        tiles = {t["index"]: TileRecord(**t) for t in body.get("tiles", [])}
        fields = {k: v for k, v in body.items() if k not in ("spec", "tiles", "plan")}
        plan = [(float(x), float(y)) for x, y in body.get("plan", [])]
        return cls(spec=spec, tiles=tiles, plan=plan, **fields)


def new_job_id() -> str:
    """Sortable by submission time, unique without coordination."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


class StateCorrupt(ValueError):
    """A job's state file cannot be read; the job is reported, not silently dropped."""


SETTLED = "settled.json"
"""Beside ``state.json`` once a job is settled: its finish time and summary. A start reads these
~400 B instead of whole states (~300 KB for 1,500 tiles, 9 ms each: a busy lab's first year
took minutes to load, past systemd's start timeout)."""


@dataclass(frozen=True)
class EncodedState:
    job_id: str
    state: bytes
    settled: bytes | None
    """Finish time and summary, for a settled job."""
    finished_at: float


def _settled_file(state: JobState) -> bytes | None:
    if not state.settled:
        return None
    return json.dumps({"finished_at": state.finished_at, "summary": state.summary()}).encode()


class JobStore:
    """One directory per job under ``root``: ``state.json``, ``tiles/``, ``dicom/``, images."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._writing = threading.Lock()
        """Saves of one job come from several tasks (progress, requests) via worker threads;
        one at a time, each serialising the state as it is when its turn comes."""

    def directory(self, job_id: str) -> Path:
        if not JOB_ID.match(job_id):
            raise JobError("job", f"{job_id!r} is not a job id")
        return self.root / job_id

    def save(self, state: JobState, *, sync: bool = True) -> None:
        """Replace the job's state atomically. ``sync=False`` skips the fsyncs: a process crash
        still finds the new state, a power loss may find an older one (the tiles it does not
        list are simply captured again), and the stage is not held up by a disk busy with tile
        files."""
        self.write(self.encode(state), sync=sync)

    @staticmethod
    def encode(state: JobState) -> EncodedState:
        return EncodedState(state.id, json.dumps(state.to_json(), separators=(",", ":")).encode(),
                            _settled_file(state), state.finished_at)

    def write(self, encoded: EncodedState, *, sync: bool = True) -> None:
        """Write an encoded state (encode in the thread that owns the job, write anywhere)."""
        directory = self.directory(encoded.job_id)
        with self._writing:
            directory.mkdir(parents=True, exist_ok=True)
            if encoded.settled is None:  # first: a stale one would hide the change at a start
                (directory / SETTLED).unlink(missing_ok=True)
            write_atomically(directory / "state.json", encoded.state, sync)
            if encoded.settled is not None:
                self._write_settled(directory, encoded.settled, encoded.finished_at, sync)

    def settle(self, state: JobState) -> None:
        """Write the settled file of a job stored before there were such files (once)."""
        if (settled := _settled_file(state)) is not None:
            self._write_settled(self.directory(state.id), settled, state.finished_at, False)

    @staticmethod
    def _write_settled(directory: Path, data: bytes, finished_at: float, sync: bool) -> None:
        write_atomically(directory / SETTLED, data, sync)
        os.utime(directory / SETTLED, (finished_at, finished_at))  # a start sorts by it

    def settled_at(self, job_id: str) -> float | None:
        """When a settled job finished (its settled file's time, a stat, not a read); None:
        not settled."""
        try:
            return (self.directory(job_id) / SETTLED).stat().st_mtime
        except FileNotFoundError:
            return None

    def settled(self, job_id: str) -> tuple[float, dict[str, Any]] | None:
        """Finish time and summary of a settled job; None: not settled, or the file is
        unreadable (then the state file says)."""
        try:
            body = json.loads((self.directory(job_id) / SETTLED).read_bytes())
            return float(body["finished_at"]), dict(body["summary"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def load(self, job_id: str) -> JobState:
        path = self.directory(job_id) / "state.json"
        try:
            return JobState.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            raise JobError("job", f"no job {job_id}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise StateCorrupt(f"{path}: unreadable job state: {exc}") from exc

    def ids(self) -> list[str]:
        """Every stored job, oldest first (ids sort by submission time). Loaded one at a time
        by the caller: a lab's whole history never has to fit in memory at once."""
        return [directory.name for directory in sorted(self.root.iterdir())
                if JOB_ID.match(directory.name) and (directory / "state.json").exists()]


@dataclass
class StoredJobs:
    """What a start needs from the store."""

    live: list[JobState] = field(default_factory=list)
    """Jobs that can still change (queued, running, spooled), whole, oldest first."""
    recent: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    """Finish time and summary of the newest settled jobs."""
    unreadable: list[str] = field(default_factory=list)


def load_for_start(store: JobStore, recent_jobs: int) -> StoredJobs:
    """Live jobs whole; of the settled ones only the ``recent_jobs`` that finished last, from
    their settled files (the others are not read at all), so a start takes as long after years
    of slides as after a week. A job stored before settled files existed gets one."""
    found = StoredJobs()
    settled: list[tuple[float, str]] = []
    for job_id in store.ids():
        if (finished_at := store.settled_at(job_id)) is not None:
            settled.append((finished_at, job_id))
            continue
        try:
            job = store.load(job_id)
        except StateCorrupt as exc:
            found.unreadable.append(str(exc))
            continue
        if job.settled:
            store.settle(job)
            settled.append((job.finished_at, job_id))
        else:
            found.live.append(job)
    for _, job_id in heapq.nlargest(recent_jobs, settled):
        if (summary := store.settled(job_id)) is not None:
            found.recent[job_id] = summary
    return found


REMOVABLE_AFTER_DELIVERY = ("tiles", "dicom", "work")
"""What a delivered job no longer needs on the scanner; its state, report and the overview and
label images (small) stay, so ``status`` and ``report`` still answer."""


def remove_delivered_files(store: JobStore, finished_before: float,
                           busy: Collection[str]) -> list[JobState]:
    """Remove the tiles and DICOM files of every job that is done, delivered (the PACS confirmed
    every instance) and finished before ``finished_before`` (wall time); ``busy`` jobs may
    still change and are left alone. Failed and cancelled jobs keep their tiles for a resume,
    spooled ones their files for the retry. Returns the jobs changed."""
    changed = []
    for job_id in store.ids():
        directory = store.directory(job_id)
        if job_id in busy or not any((directory / name).exists()
                                     for name in REMOVABLE_AFTER_DELIVERY):
            continue
        settled = store.settled(job_id)  # small: read the whole state only to change it
        if settled is None or settled[0] > finished_before \
                or (settled[1]["status"], settled[1]["delivery"]) != ("done", "delivered"):
            continue
        try:
            job = store.load(job_id)
        except StateCorrupt:
            continue  # reported at start; its files are evidence, not clutter
        job.files_removed_at = time.time()
        job.message = "finished; tiles and DICOM files removed from the scanner (the series " \
                      "is in the PACS)"
        try:
            store.save(job)  # first: a crash mid-removal leaves a job that says so
            recorded = True
        except OSError:  # a full disk, which is what the removal is for: record it after
            recorded = False
        for name in REMOVABLE_AFTER_DELIVERY:
            shutil.rmtree(directory / name, ignore_errors=True)
        if not recorded:
            store.save(job)
        changed.append(job)
    return changed


def write_atomically(path: Path, data: bytes, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new content, whole;
    with ``sync`` also a power loss. A failed write leaves the old content and nothing else."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:  # a full disk: no partial file left behind by every failed save
        temporary.unlink(missing_ok=True)
        raise
    if not sync:
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
