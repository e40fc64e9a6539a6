"""The slide-scanner daemon: ``medge run microscope --config config/microscope.toml``.

Owns the stage, the cameras and the job queue, and runs one scan at a time through the phases
of :data:`daemons.microscope.jobs.PHASES`. Technicians talk to it over MQTT 5 request/response
on ``…/microscope/cmd`` (Response Topic + Correlation Data), so every workstation that reaches
the broker sees the same queue. Progress goes out as ``state`` (retained, after every tile) and
``job`` (durable, through the outbox, at every phase change). docs/microscope.md has the topics,
payloads, phases and failure states.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import itertools
import json
import math
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import cv2
import numpy as np
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemons.microscope import report as reports
from daemons.microscope import scan
from daemons.microscope.autofocus import (
    AutofocusSettings,
    FocusFailed,
    grey_thumbnail,
    laplacian_variance,
)
from daemons.microscope.focusmap import build_focus_map, fit_surface
from daemons.microscope.jobs import (
    PHASES,
    JobError,
    JobSpec,
    JobState,
    JobStore,
    StateCorrupt,
    TileRecord,
    load_for_start,
    new_job_id,
    parse_spec,
    remove_delivered_files,
    write_atomically,
)
from daemons.microscope.optics import Objective
from daemons.microscope.rig import (
    CameraSection,
    Rig,
    SimulatorSection,
    StageSection,
    build_rig,
    load_objectives,
)
from daemons.microscope.wsi.model import RgbImage, SlideMetadata
from drivers.camera import CameraError, discover_cameras
from drivers.grbl import rapid_move_s
from drivers.grbl_protocol import GrblReset
from drivers.stage import XYZ, PositionLostError, StageDisconnected, StageError
from medge.config import ConfigError, bounds, load
from medge.memory import release_free_memory
from medge.mqtt import LinkDown, PublishRefused
from medge.runtime import Runtime
from medge.service import Service
from medge.settings import DaemonConfig

DAEMON = "microscope"
log = structlog.get_logger().bind(component=DAEMON)
MB = 1024 * 1024
MAX_STAGE_RECOVERIES = 2
STATE_SYNC_S = 2.0
PNG_RATIO = 0.8
"""Losslessly compressed tile size / raw size, for the disk estimate (H&E compresses poorly)."""
FLAT_FRAME_SHARPNESS = 1e-5
"""Exposure-normalised Laplacian variance below which a tile is flagged as featureless."""
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""No space, quota exceeded, file size limit: a write failed for want of disk."""
TIDY_EVERY_S = 3600.0
"""An idle scanner still removes the files of scans that came of age (``_tidy``)."""


@dataclass(frozen=True)
class ScanSection:
    objectives_file: Path
    """Calibration per objective (config/objectives.toml)."""
    pacs_file: Path | None = None
    """PACS destinations and spool (medge.pacs.config.PacsConfig); none: no delivery."""
    jobs_dir: Path | None = None
    """Default: node.state_dir / "scans"."""
    overlap: float = field(default=0.1, metadata=bounds(min=0.02, max=0.5))
    margin_um: float = field(default=100.0, metadata=bounds(min=0, max=5000))
    focus_points: int = field(default=5, metadata=bounds(min=1, max=50))
    focus_range_um: float = field(default=40.0, metadata=bounds(min=1, max=2000))
    focus_min_contrast: float = field(default=1.3, metadata=bounds(min=1.0, max=100))
    """Sharpest / blurriest frame of the coarse sweep below this: blank focus."""
    buffer_tiles: int = field(default=4, metadata=bounds(min=1, max=256))
    """Frames that may wait for storage before the stage waits: the memory bound."""
    disk_reserve_mb: float = field(default=500.0, metadata=bounds(min=0))
    disk_check_every: int = field(default=20, metadata=bounds(min=1))
    delivery_wait_s: float = field(default=60.0, metadata=bounds(min=0, max=3600))
    """How long the deliver phase waits for the PACS before reporting the job as spooled."""
    recent_jobs: int = field(default=200, metadata=bounds(min=1, max=100_000))
    """Finished jobs ``medge scan list`` shows (a summary each in memory); older ones stay on
    disk and answer ``status``, ``report`` and ``resume`` by id."""
    keep_delivered_days: float = field(default=7.0, metadata=bounds(min=0, max=3650))
    """Days a scan's tiles and DICOM files stay on the scanner once the PACS confirmed every
    instance (counted from the scan's end); then they go, or the disk fills and scanning stops.
    Failed, cancelled and spooled jobs keep everything."""
    stage: StageSection = field(default_factory=StageSection)
    camera: CameraSection = field(default_factory=CameraSection)
    simulator: SimulatorSection = field(default_factory=SimulatorSection)

    def validate(self) -> None:
        try:
            load_objectives(self.objectives_file)
        except ConfigError as exc:
            raise ValueError(f"objectives_file: {exc}") from None
        if self.pacs_file is not None:
            from medge.pacs.config import PacsConfig

            try:
                load(self.pacs_file, PacsConfig)
            except ConfigError as exc:
                raise ValueError(f"pacs_file: {exc}") from None


@dataclass(frozen=True)
class MicroscopeConfig(DaemonConfig):
    microscope: ScanSection = field(
        default_factory=lambda: ScanSection(objectives_file=Path("objectives.toml")))


CONFIG = MicroscopeConfig


class Cancelled(Exception):
    """The technician cancelled the job (distinct from the daemon stopping)."""


@dataclass
class Progress:
    """Rate and ETA of the acquisition, from tiles captured in this run."""

    started: float = field(default_factory=time.monotonic)
    done_at_start: int = 0

    def rate(self, done: int) -> float:
        elapsed = time.monotonic() - self.started
        return (done - self.done_at_start) / elapsed if elapsed > 0 else 0.0


class Microscope:
    """Queue, scans and requests. One job runs at a time; the rest wait in submission order."""

    def __init__(self, cfg: MicroscopeConfig, rt: Runtime) -> None:
        section = cfg.microscope
        self.cfg = section
        self.rt = rt
        self.objectives: dict[str, Objective] = load_objectives(section.objectives_file)
        self.store = JobStore(section.jobs_dir or cfg.node.state_dir / "scans")
        self.rig: Rig = build_rig(section.stage, section.camera, section.simulator,
                                  next(iter(self.objectives.values())))
        self.jobs: dict[str, JobState] = {}
        """Jobs that can still change: queued, running, or waiting for the PACS (spooled)."""
        self.recent: dict[str, tuple[float, dict[str, Any]]] = {}
        """Finish time and summary of the ``recent_jobs`` last finished jobs. A finished job's
        full state (tiles, plan, report: ~80 KB a slide) lives on disk only, so a daemon that
        scans for years holds no more than this."""
        self.current: JobState | None = None
        self._cancel: set[str] = set()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._stage_lock = asyncio.Lock()
        self._delivered: dict[str, asyncio.Event] = {}
        self._progress = Progress()
        self._synced_at = 0.0
        self._levels: list[Any] = []
        """The pyramid of the job in the stitch -> DICOM hand-over (on disk, not in memory)."""
        self._writing = asyncio.Lock()
        self.pacs: Any = None
        self.delivery: Any = None
        if section.pacs_file is not None:
            self._setup_pacs(section.pacs_file)

    def _setup_pacs(self, path: Path) -> None:
        from medge.pacs.config import PacsConfig
        from medge.pacs.delivery import SpoolDelivery
        from medge.pacs.spool import Spool

        self.pacs = load(path, PacsConfig)
        self.delivery = SpoolDelivery(Spool(self.pacs.spool_dir), self.pacs.destinations,
                                      self.pacs.retry, on_progress=self._on_delivery_progress)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load_jobs)
        await self.rig.open()
        self.rt.link.subscribe(self.rt.topics.topic(DAEMON, "cmd"), self._on_request)
        self._worker = asyncio.create_task(self._work(), name="microscope-jobs")
        if self.delivery is not None:
            self._spawn(self.delivery.run(self._stop, idle_s=5.0), "pacs-delivery")

    async def stop(self) -> None:
        self._stop.set()
        tasks = [t for t in (self._worker, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.rig.close()

    def _load_jobs(self) -> None:
        stored = load_for_start(self.store, self.cfg.recent_jobs)
        for error in stored.unreadable:
            log.error("job state unreadable; left on disk", error=error)
        self.recent = stored.recent
        for job in stored.live:
            if job.status == "running":  # the daemon died mid-scan: carry on where it was
                job.status = "queued"
                job.resumes += 1
                job.message = "resuming after a restart"
                self.store.save(job)
            self.jobs[job.id] = job

    def _retire(self, job: JobState) -> None:
        """Keep only a summary of a job nothing will change any more (delivery included)."""
        if not job.settled:
            return
        self.jobs.pop(job.id, None)
        self.recent[job.id] = (job.finished_at, job.summary())
        if len(self.recent) > self.cfg.recent_jobs:
            del self.recent[min(self.recent, key=lambda job_id: self.recent[job_id][0])]

    def _spawn(self, coroutine: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the queue -------------------------------------------------------------------------

    def _next_job(self) -> JobState | None:
        queued = [job for job in self.jobs.values() if job.status == "queued"]
        return min(queued, key=lambda job: job.created_at, default=None)

    async def _work(self) -> None:
        await self._tidy()
        while True:
            job = self._next_job()
            if job is None:
                self._wake.clear()
                try:
                    async with asyncio.timeout(TIDY_EVERY_S):
                        await self._wake.wait()
                except TimeoutError:  # idle: delivered scans may have come of age meanwhile
                    await self._tidy()
                continue
            self.current = job
            try:
                await self._run(job)
            finally:
                self.current = None
            await self._tidy()

    async def _tidy(self) -> None:
        """Between jobs: remove the files of scans delivered ``keep_delivered_days`` ago, and
        give the heap a slide's tiles freed (~100 MiB at the peak) back to the OS now, not at
        the next peak."""
        finished_before = time.time() - self.cfg.keep_delivered_days * 86400
        try:
            removed = await asyncio.to_thread(remove_delivered_files, self.store,
                                              finished_before, set(self.jobs))
        except OSError as exc:  # the queue goes on; the next tidy tries again
            log.error("removing delivered scans failed", error=str(exc))
            removed = []
        for job in removed:
            log.info("tiles and DICOM files removed after delivery", job=job.id)
            if job.id in self.recent:
                self.recent[job.id] = (job.finished_at, job.summary())
        await asyncio.to_thread(release_free_memory)

    async def _run(self, job: JobState) -> None:
        job.status = "running"
        job.message = ""
        try:
            await self._save(job, durable=True)
            start = PHASES.index(job.phase) if job.phase else 0
            for phase in PHASES[start:]:
                job.phase = phase
                await self._save(job, durable=True)
                began = time.monotonic()
                async with self._stage_lock:
                    await self._run_phase(job, phase)
                job.timings[phase] = job.timings.get(phase, 0.0) + time.monotonic() - began
            job.status = "done"
            job.message = "spooled: the PACS is unreachable, the series will be resent " \
                          "automatically" if job.delivery == "spooled" else "finished"
        except Cancelled:
            job.status, job.message = "cancelled", "cancelled by the technician; tiles kept"
            await self._stop_stage()
        except (StageError, CameraError, scan.ScanError, OSError, ValueError) as exc:
            job.status, job.message = "failed", failure_message(job, exc)
            log.error("scan failed", job=job.id, phase=job.phase, error=str(exc))
            await self._stop_stage()
        except Exception as exc:  # a bug must fail one job, not stop the queue
            log.exception("scan failed unexpectedly", job=job.id, phase=job.phase)
            job.status = "failed"
            job.message = f"internal error in {job.phase}: {exc!r}; see the daemon log"
            await self._stop_stage()
        job.finished_at = time.time()
        try:
            await self._save(job, durable=True)
        except OSError as exc:  # a full disk: the queue goes on; the file keeps the last state
            log.error("job state not saved", job=job.id, error=str(exc))
            await self.rt.publish_now(DAEMON, "state", self.progress(job), retain=True)
            return  # in memory it is the only full record of the job: keep it there
        self._retire(job)

    async def _run_phase(self, job: JobState, phase: str) -> None:
        """Run one phase. A controller that rebooted or was re-plugged (USB reset: position
        lost, no alarm) is re-homed and the phase goes on from the first missing tile, up to
        ``MAX_STAGE_RECOVERIES`` times per phase; an alarm stops the job for a technician."""
        recoveries = 0
        while True:
            try:
                await getattr(self, f"_phase_{phase}")(job)
                return
            except StageError as exc:
                stage = self.rig.stage
                reset = (isinstance(exc, PositionLostError | GrblReset | StageDisconnected)
                         or stage.position_lost)  # e.g. "in Alarm state" seen before the banner
                if not reset or stage.alarm is not None or recoveries >= MAX_STAGE_RECOVERIES:
                    raise  # an alarm (limit switch, crash) needs a technician
                recoveries += 1
                job.plan_info["stage_recoveries"] = job.plan_info.get("stage_recoveries", 0) + 1
                job.message = f"stage reset during {phase} ({exc}): re-homing and continuing"
                log.warning("stage lost its position; re-homing", job=job.id, error=str(exc))
                await self._save(job, durable=True)
                await self._ensure_homed()

    async def _stop_stage(self) -> None:
        with contextlib.suppress(StageError, asyncio.TimeoutError):
            async with asyncio.timeout(10):
                await self.rig.stage.stop()

    def _check_cancel(self, job: JobState) -> None:
        if job.id in self._cancel:
            self._cancel.discard(job.id)
            raise Cancelled

    async def _save(self, job: JobState, *, durable: bool = False) -> None:
        """Persist; publish live progress; at phase changes also a durable ``job`` record.
        Per-tile saves reach the disk platter at most ``STATE_SYNC_S`` apart."""
        now = time.monotonic()
        sync = durable or now - self._synced_at >= STATE_SYNC_S
        if sync:
            self._synced_at = now
        encoded = self.store.encode(job)  # here: the event loop is the only writer of jobs
        async with self._writing:  # one write at a time, in the order the states were taken
            await asyncio.to_thread(functools.partial(self.store.write, encoded, sync=sync))
        body = self.progress(job)
        await self.rt.publish_now(DAEMON, "state", body, retain=True)
        if durable:
            await self.rt.emit(DAEMON, "job", body)

    def progress(self, job: JobState) -> dict[str, Any]:
        body = job.summary()
        body["at"] = time.time()  # lets a follower drop a retained state older than its reply
        if job.phase == "acquire" and job.status == "running":
            rate = self._progress.rate(len(job.tiles))
            remaining = len(job.plan) - len(job.tiles)
            body["rate_tiles_s"] = round(rate, 3)
            body["eta_s"] = round(remaining / rate, 1) if rate > 0 else None
        return body

    # -- phases ----------------------------------------------------------------------------

    def _dir(self, job: JobState) -> Path:
        return self.store.directory(job.id)

    def _objective(self, job: JobState) -> Objective:
        return self.objectives[job.spec.objective]

    def _geometry(self, job: JobState) -> scan.Geometry:
        return scan.Geometry(self._objective(job).um_per_px, self.cfg.camera.width,
                             self.cfg.camera.height, self.cfg.overlap)

    async def _phase_overview(self, job: JobState) -> None:
        overview = await self.rig.overview.capture()
        label_px = round(self.rig.label_width_um / self.cfg.camera.overview_um_per_px)
        directory = self._dir(job)
        await asyncio.to_thread(save_png, directory / "overview.png", overview)
        if label_px > 0:
            await asyncio.to_thread(save_png, directory / "label.png", overview[:, :label_px])

    async def _phase_tissue(self, job: JobState) -> None:
        overview = read_png(self._dir(job) / "overview.png")
        label_px = round(self.rig.label_width_um / self.cfg.camera.overview_um_per_px)
        mask = await asyncio.to_thread(scan.detect_tissue, overview, label_px)
        if not mask.any():
            raise scan.ScanError("no tissue detected on the overview (slide not detected?): "
                                 "check the slide is on the stage, then `medge scan resume`")
        await asyncio.to_thread(save_png, self._dir(job) / "tissue.png",
                                np.repeat(mask[..., None] * np.uint8(255), 3, axis=2))
        job.plan_info["tissue_fraction"] = round(float(mask.mean()), 5)

    async def _phase_plan(self, job: JobState) -> None:
        mask = read_png(self._dir(job) / "tissue.png")[..., 0] > 0
        job.plan = self._plan(job.spec, mask)
        if not job.plan:
            raise scan.ScanError("the scan area holds no tissue: widen --area or omit it")
        job.plan_info.update(self.estimate(job.spec, job.plan))
        self._check_disk(job.plan_info["disk_mb"])

    def _plan(self, spec: JobSpec, mask: scan.Mask) -> list[tuple[float, float]]:
        area = tuple(v * 1000 for v in spec.area_mm) if spec.area_mm else None
        return scan.plan_tiles(mask, self.cfg.camera.overview_um_per_px,
                               scan.Geometry(self.objectives[spec.objective].um_per_px,
                                             self.cfg.camera.width, self.cfg.camera.height,
                                             self.cfg.overlap),
                               self.cfg.margin_um, area)  # type: ignore[arg-type]

    async def _ensure_homed(self) -> None:
        stage = self.rig.stage
        try:
            await stage.wait_connected(timeout=30)
        except TimeoutError:
            raise StageDisconnected(f"{stage.url}: the stage controller has not answered for "
                                    "30 s (USB cable, power)") from None
        if stage.position_lost:
            log.info("homing before the scan (position unknown)")
            await stage.home()

    def _autofocus_settings(self, objective: Objective) -> AutofocusSettings:
        """Steps scaled to the objective's depth of field; the first window spans
        ±``focus_range_um`` (further windows follow a peak beyond it)."""
        return AutofocusSettings.for_objective(objective, range_um=2 * self.cfg.focus_range_um,
                                               min_peak_ratio=self.cfg.focus_min_contrast)

    async def _phase_focus(self, job: JobState) -> None:
        """Autofocus at tiles spread over the plan (tile positions: field top-left, slide µm)
        and fit the focus surface (daemons/microscope/focusmap.py)."""
        self.rig.use(self._objective(job))
        await self._ensure_homed()
        objective = self._objective(job)
        candidates = [job.plan[i] for i in scan.focus_points(job.plan, self.cfg.focus_points)]
        try:
            result = await build_focus_map(self._motion(), candidates,
                                           self.cfg.stage.focus_guess_z_um,
                                           self._autofocus_settings(objective))
        except FocusFailed:
            raise scan.ScanError(
                f"blank focus: no sharpness peak at any of {len(candidates)} focus points within"
                f" ±{self.cfg.focus_range_um:.0f} µm of z={self.cfg.stage.focus_guess_z_um:.0f}"
                " µm and beyond; check the slide is seated and the scan area covers tissue"
            ) from None
        surface = result.surface
        job.focus = {"degree": surface.degree,
                     "points": [[round(float(v), 3) for v in p] for p in surface.points],
                     "residuals_um": [round(float(r), 3) for r in surface.residuals_um],
                     "outliers": [i for i, inlier in enumerate(surface.inliers) if not inlier],
                     "rms_residual_um": round(surface.rms_residual_um, 3),
                     "failed": [[p.x_um, p.y_um, p.reason] for p in result.points
                                if p.z_um is None],
                     "frames": result.frames, "tolerance_um": objective.focus_tolerance_um}

    def _motion(self) -> scan.Motion:
        origin = self.cfg.stage.slide_origin_um
        return scan.Motion(self.rig.stage, self.rig.camera, (origin[0], origin[1]))

    async def _phase_acquire(self, job: JobState) -> None:
        self.rig.use(self._objective(job), acquiring=True)
        await self._ensure_homed()
        tiles_dir = self._dir(job) / "tiles"
        tiles_dir.mkdir(exist_ok=True)
        if bad := await asyncio.to_thread(scan.verify_tiles, job, tiles_dir):
            log.warning("tiles missing or damaged on disk; re-capturing", tiles=bad)
        # Refitting the stored points gives the focus phase's surface again (the fit is
        # deterministic), so a resumed job focuses exactly as before.
        surface = fit_surface([tuple(p) for p in job.focus["points"]],
                              degree=job.focus["degree"])

        def focus_z(x: float, y: float) -> float:
            return float(surface.predict(x, y))

        self._progress = Progress(done_at_start=len(job.tiles))

        async def store(index: int, frame: RgbImage, where: tuple[float, float, float]) -> None:
            digest = await asyncio.to_thread(scan.save_tile, scan.tile_path(tiles_dir, index),
                                             frame)
            job.tiles[index] = TileRecord(index, *where, sha256=digest)
            if laplacian_variance(grey_thumbnail(frame)) < FLAT_FRAME_SHARPNESS:
                job.plan_info.setdefault("flagged", []).append(index)
            if len(job.tiles) % self.cfg.disk_check_every == 0:
                self._check_disk(0.0)
            await self._save(job)
            self._check_cancel(job)

        await scan.acquire(self._motion(), job, focus_z, self.cfg.buffer_tiles, store)

    async def _phase_stitch(self, job: JobState) -> None:
        """Register the overlaps, place and compose (daemons/microscope/wsi/pipeline.py); the
        pyramid stays on disk in ``work/`` for the DICOM phase."""
        self._levels = await asyncio.to_thread(self._stitch, job)

    def _stitch(self, job: JobState) -> list[Any]:
        from daemons.microscope.wsi.pipeline import build_pyramid

        tiles_dir = self._dir(job) / "tiles"
        records = [job.tiles[i] for i in sorted(job.tiles)]
        scan.write_tiles_folder(tiles_dir, job.plan, records, self._geometry(job))
        work = self._dir(job) / "work"
        shutil.rmtree(work, ignore_errors=True)
        result = build_pyramid(tiles_dir, work)
        report = result.report
        job.plan_info["stitching"] = {
            "placement": "registration", "pairs": len(report.pairs),
            "rejected_pairs": report.rejected, "outlier_pairs": report.outlier_pairs,
            "residual_px": report.residual_rms_px, "max_residual_px": report.residual_max_px,
            "tiles_placed_by_stage_only": report.flagged_tiles,
            "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()}}
        return list(result.levels)

    async def _phase_dicom(self, job: JobState) -> None:
        if not self._levels:  # resumed after a restart: the pyramid is rebuilt from the tiles
            await self._phase_stitch(job)
        await asyncio.to_thread(self._write_dicom, job, self._levels)
        self._levels = []

    def _write_dicom(self, job: JobState, levels: list[Any]) -> None:
        from daemons.microscope.wsi.dicom_writer import WriterOptions, write_series

        work = self._dir(job) / "work"
        objective = self._objective(job)
        spec = job.spec
        metadata = SlideMetadata(
            patient_id=spec.patient, accession_number=spec.accession, barcode=spec.barcode,
            stain=spec.stain, specimen_id=spec.barcode, container_id=spec.barcode,
            objective_magnification=objective.magnification,
            numerical_aperture=objective.numerical_aperture, label_text=spec.barcode,
            study_instance_uid=job.plan_info.get("study_uid"),
            series_instance_uid=job.plan_info.get("series_uid"))
        label_path = self._dir(job) / "label.png"
        out = self._dir(job) / "dicom"
        shutil.rmtree(out, ignore_errors=True)
        written = write_series(
            levels, metadata, out, WriterOptions(jpeg_quality=spec.jpeg_quality),
            label_image=read_png(label_path) if label_path.exists() else None,
            overview_image=read_png(self._dir(job) / "overview.png"))
        job.plan_info["study_uid"] = written.study_instance_uid
        job.plan_info["series_uid"] = written.series_instance_uid
        job.plan_info["dicom_files"] = [p.name for p in written.paths]
        shutil.rmtree(work, ignore_errors=True)

    async def _phase_deliver(self, job: JobState) -> None:
        files = sorted((self._dir(job) / "dicom").glob("*.dcm"))
        if job.spec.folder:
            target = Path(job.spec.folder) / job.spec.barcode
            target.mkdir(parents=True, exist_ok=True)
            for path in files:
                shutil.copy2(path, target / path.name)
        if not job.spec.pacs:
            job.delivery = "none"
            return
        if self.delivery is None:
            raise scan.ScanError("no PACS is configured on this scanner (microscope.pacs_file)")
        spool_jobs = self.delivery.spool.enqueue(files, job.spec.pacs)
        waits = []
        for spooled in spool_jobs:
            event = self._delivered.setdefault(spooled.job_id, asyncio.Event())
            job.plan_info.setdefault("spool_jobs", []).append(spooled.job_id)
            waits.append(event.wait())
        self.delivery.wake()
        try:
            async with asyncio.timeout(self.cfg.delivery_wait_s):
                await asyncio.gather(*waits)
            job.delivery = "delivered"
        except TimeoutError:
            job.delivery = "spooled"

    def _on_delivery_progress(self, progress: Any) -> None:
        if progress.confirmed != progress.total:
            return
        self._delivered.setdefault(progress.job_id, asyncio.Event()).set()
        for job in self.jobs.values():  # a job that finished as "spooled" is now delivered
            if job.delivery == "spooled" and progress.job_id in job.plan_info.get("spool_jobs",
                                                                                   []):
                job.delivery = "delivered"
                job.message = "finished; delivered to the PACS after a retry"
                self._spawn(self._save_and_retire(job), "job-delivered")

    async def _save_and_retire(self, job: JobState) -> None:
        await self._save(job, durable=True)
        self._retire(job)

    async def _phase_report(self, job: JobState) -> None:
        validation = await asyncio.to_thread(reports.validation_summary, self._dir(job) / "dicom")
        job.report = reports.build(job, validation, job.plan_info.get("stitching", {}))
        job.report["status"] = "done"
        write_atomically(self._dir(job) / "report.json",
                         json.dumps(job.report, indent=2).encode())

    # -- estimates and checks --------------------------------------------------------------

    def estimate(self, spec: JobSpec, plan: list[tuple[float, float]]) -> dict[str, Any]:
        """Time and disk before anything moves: motion along the planned path at the
        controller's rates, exposures, the focus sweeps; tiles, mosaic and DICOM on disk."""
        objective = self.objectives[spec.objective]
        settings = self.rig.stage.settings
        rates = XYZ(*(settings.get(110 + i, 600.0) for i in range(3)))
        accels = XYZ(*(settings.get(120 + i, 50.0) for i in range(3)))
        exposure_s = self.cfg.camera.exposure_ms / 1000
        motion_s = sum(rapid_move_s(XYZ((b[0] - a[0]) / 1000, (b[1] - a[1]) / 1000, 0.0),
                                    rates, accels) for a, b in itertools.pairwise(plan))
        autofocus = self._autofocus_settings(objective)
        # One coarse window, a fine sweep of three, the tissue check and the final approach.
        sweep = autofocus.range_um / autofocus.coarse_step_um + 1 + 5
        z_step_s = rapid_move_s(XYZ(0.0, 0.0, autofocus.coarse_step_um / 1000), rates, accels)
        focus_s = min(len(plan), self.cfg.focus_points) * sweep * (z_step_s + exposure_s)
        raw = self.cfg.camera.width * self.cfg.camera.height * 3
        geometry = scan.Geometry(objective.um_per_px, self.cfg.camera.width,
                                 self.cfg.camera.height, self.cfg.overlap)
        step_x, step_y = geometry.step_um
        mosaic = len(plan) * step_x * step_y / objective.um_per_px ** 2 * 3 * 4 / 3
        disk = len(plan) * raw * PNG_RATIO + mosaic + mosaic / 8
        return {"tiles": len(plan), "estimate_s": round(motion_s + focus_s
                                                         + len(plan) * exposure_s, 1),
                "physical_motion_s": round(motion_s, 2), "disk_mb": round(disk / MB, 1),
                "field_um": list(geometry.field_um)}

    def _check_disk(self, needed_mb: float) -> None:
        free_mb = shutil.disk_usage(self.store.root).free / MB
        if free_mb - needed_mb < self.cfg.disk_reserve_mb:
            raise scan.ScanError(
                f"disk nearly full: {free_mb:.0f} MB free on {self.store.root}, the scan needs"
                f" {needed_mb:.0f} MB plus a {self.cfg.disk_reserve_mb:.0f} MB reserve; free "
                "space (old scans already in the PACS), then `medge scan resume`")

    # -- requests --------------------------------------------------------------------------

    async def _on_request(self, message: aiomqtt.Message) -> None:
        """Answer in a task: a dry run renders the overview, the link must keep reading."""
        self._spawn(self._answer(message), "microscope-request")

    async def _answer(self, message: aiomqtt.Message) -> None:
        properties = message.properties
        topic = getattr(properties, "ResponseTopic", None)
        correlation = getattr(properties, "CorrelationData", None)
        try:
            request = json.loads(bytes(message.payload))
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise JobError("op", "a request is a JSON object with an \"op\"")
            handler = self._handlers().get(request["op"])
            if handler is None:
                raise JobError("op", f"unknown operation {request['op']!r} (known: "
                                     f"{', '.join(sorted(self._handlers()))})")
            reply: dict[str, Any] = {"ok": True, **await handler(request)}
        except JobError as exc:
            reply = {"ok": False, "error": str(exc), "field": exc.field, "kind": "invalid"}
        except StateCorrupt as exc:  # a ValueError, but the daemon's file, not the request
            reply = {"ok": False, "error": str(exc), "kind": "failed"}
        except (ValueError, TypeError) as exc:
            reply = {"ok": False, "error": f"malformed request: {exc}", "kind": "invalid"}
        except StageError as exc:
            reply = {"ok": False, "error": f"stage: {exc}; run `medge stage home`",
                     "kind": "stage"}
        except (CameraError, scan.ScanError) as exc:
            reply = {"ok": False, "error": str(exc), "kind": "failed"}
        except TimeoutError:  # waiting for the stage link (camera timeouts are CameraErrors)
            reply = {"ok": False, "error": "the stage controller is not connected; check its "
                     "USB cable and power, then `medge stage home`", "kind": "stage"}
        except OSError as exc:
            reply = {"ok": False, "error": str(exc), "kind": "failed"}
        except Exception as exc:  # answer anyway: the technician must not wait for nothing
            log.exception("request failed unexpectedly")
            reply = {"ok": False, "error": f"internal error: {exc!r}; see the daemon log",
                     "kind": "failed"}
        if topic is None:
            log.warning("request without a response topic; not answered")
            return
        reply_properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if correlation is not None:
            reply_properties.CorrelationData = correlation
        try:
            await self.rt.link.publish(topic, json.dumps(reply).encode(), qos=1,
                                       properties=reply_properties, timeout=10.0)
        except (LinkDown, PublishRefused) as exc:
            log.warning("reply not delivered", topic=topic, error=str(exc))

    def _handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]]:
        return {"submit": self._submit, "status": self._status, "list": self._list,
                "cancel": self._cancel_job, "resume": self._resume, "report": self._report,
                "stage.home": self._stage_home, "stage.jog": self._stage_jog,
                "stage.where": self._stage_where, "camera.list": self._camera_list,
                "camera.snapshot": self._camera_snapshot}

    async def _job(self, request: dict[str, Any]) -> JobState:
        """A job that can change, from memory; a finished one, from its state file."""
        job_id = request.get("job")
        if not isinstance(job_id, str):
            raise JobError("job", "required: the job id")
        if job_id in self.jobs:
            return self.jobs[job_id]
        try:
            stored = await asyncio.to_thread(self.store.load, job_id)
        except JobError:
            raise JobError("job", f"no job {job_id} (see `medge scan list`)") from None
        return self.jobs.get(job_id, stored)  # resumed by another request while reading

    async def _submit(self, request: dict[str, Any]) -> dict[str, Any]:
        destinations = set(self.pacs.destinations) if self.pacs is not None else set()
        spec = parse_spec(request.get("job"), set(self.objectives), destinations)
        if request.get("dry_run"):
            return {"dry_run": await self._dry_run(spec)}
        job = JobState(new_job_id(), spec)
        self.jobs[job.id] = job
        await self._save(job, durable=True)
        self._wake.set()
        return {"job": job.summary()}

    async def _dry_run(self, spec: JobSpec) -> dict[str, Any]:
        """Overview, tissue and plan with the overview camera only: nothing moves."""
        overview = await self.rig.overview.capture()
        label_px = round(self.rig.label_width_um / self.cfg.camera.overview_um_per_px)
        mask = await asyncio.to_thread(scan.detect_tissue, overview, label_px)
        plan = self._plan(spec, mask)
        result = self.estimate(spec, plan)
        xs, ys = [p[0] for p in plan], [p[1] for p in plan]
        field_w, field_h = result["field_um"]
        result["area_mm"] = ([min(xs) / 1000, min(ys) / 1000, (max(xs) + field_w) / 1000,
                              (max(ys) + field_h) / 1000] if plan else None)
        result["rows"] = len(set(ys))
        result["columns"] = len(set(xs))
        return result

    async def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("job") is None:
            active = self.current or self._next_job()
            if active is None:
                newest = max(self._summaries(), key=lambda s: s["created_at"], default=None)
                return {"job": {**newest, "at": time.time()} if newest else None}
            return {"job": self.progress(active)}
        return {"job": self.progress(await self._job(request))}

    def _summaries(self) -> list[dict[str, Any]]:
        return [*(summary for _, summary in self.recent.values()),
                *(job.summary() for job in self.jobs.values())]

    async def _list(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"jobs": sorted(self._summaries(), key=lambda s: s["created_at"])}

    async def _cancel_job(self, request: dict[str, Any]) -> dict[str, Any]:
        job = await self._job(request)
        if job.finished:
            raise JobError("job", f"job {job.id} is already {job.status}")
        if job is self.current:
            self._cancel.add(job.id)
            return {"job": job.summary(), "note": "cancelling after the current tile"}
        job.status, job.message = "cancelled", "cancelled before it started"
        job.finished_at = time.time()
        await self._save_and_retire(job)
        return {"job": job.summary()}

    async def _resume(self, request: dict[str, Any]) -> dict[str, Any]:
        job = await self._job(request)
        if job.status not in ("failed", "cancelled"):
            raise JobError("job", f"job {job.id} is {job.status}; only a failed or cancelled "
                                  "job can be resumed")
        job.status, job.message = "queued", "resume requested"
        job.resumes += 1
        self.recent.pop(job.id, None)
        self.jobs[job.id] = job
        await self._save(job, durable=True)
        self._wake.set()
        return {"job": job.summary()}

    async def _report(self, request: dict[str, Any]) -> dict[str, Any]:
        job = await self._job(request)
        if not job.report:
            raise JobError("job", f"job {job.id} has no report yet (it is {job.status}"
                                  f"{', in ' + job.phase if job.phase else ''})")
        return {"report": {**job.report, "delivery": job.delivery or "none"}}

    def _stage_free(self) -> None:
        if self.current is not None:
            raise JobError("stage", f"the stage is busy with job {self.current.id}; "
                                    "wait or `medge scan cancel` it")

    async def _stage_home(self, request: dict[str, Any]) -> dict[str, Any]:
        self._stage_free()
        async with self._stage_lock:
            await self.rig.stage.wait_connected(timeout=30)
            await self.rig.stage.home()
        return await self._stage_where(request)

    async def _stage_jog(self, request: dict[str, Any]) -> dict[str, Any]:
        self._stage_free()
        deltas = [request.get(axis, 0.0) for axis in ("dx", "dy", "dz")]
        if not all(isinstance(d, int | float) and math.isfinite(d) for d in deltas):
            raise JobError("dx", "jog distances must be finite numbers of µm")
        async with self._stage_lock:
            await self.rig.stage.move_by(*(float(d) for d in deltas))
        return await self._stage_where(request)

    async def _stage_where(self, request: dict[str, Any]) -> dict[str, Any]:
        stage = self.rig.stage
        await stage.wait_connected(timeout=10)
        position = stage.position_um
        origin = self.cfg.stage.slide_origin_um
        return {"stage_um": list(position), "slide_mm": [(position.x - origin[0]) / 1000,
                                                         (position.y - origin[1]) / 1000],
                "position_lost": stage.position_lost,
                "alarm": str(stage.alarm) if stage.alarm else None}

    async def _camera_list(self, request: dict[str, Any]) -> dict[str, Any]:
        found = await asyncio.to_thread(discover_cameras)
        cameras: list[dict[str, Any]] = [
            {"name": c.product or c.usb_id, "usb_id": c.usb_id, "serial": c.serial,
             "video": list(c.video_devices)} for c in found]
        for camera in (self.rig.camera, self.rig.overview):
            cameras.append({"name": camera.name, "role": "tiles" if camera is self.rig.camera
                            else "overview", "resolution": list(camera.settings.resolution),
                            "open": camera.is_open})
        return {"cameras": cameras}

    async def _camera_snapshot(self, request: dict[str, Any]) -> dict[str, Any]:
        camera = self.rig.overview if request.get("overview") else self.rig.camera
        frame = await camera.capture()
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        if not ok:
            raise scan.ScanError("snapshot could not be encoded")
        return {"png_base64": base64.b64encode(encoded.tobytes()).decode(),
                "width": frame.shape[1], "height": frame.shape[0]}


def failure_message(job: JobState, error: BaseException) -> str:
    """One sentence the technician can act on; captured tiles are always kept."""
    kept = f"{len(job.tiles)} of {len(job.plan)} tiles kept" if job.plan else "nothing captured"
    if isinstance(error, StageError):
        return (f"stage alarm or stage error during {job.phase}: {error}; run `medge stage "
                f"home`, then `medge scan resume {job.id}` ({kept})")
    if isinstance(error, CameraError):
        return (f"camera lost during {job.phase}: {error}; reconnect it, then `medge scan "
                f"resume {job.id}` ({kept})")
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return (f"disk full during {job.phase}: {error.strerror or error}; free space (old "
                f"scans already in the PACS), then `medge scan resume {job.id}` ({kept})")
    return f"{job.phase}: {error} ({kept})"


def save_png(path: Path, image: RgbImage) -> None:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise scan.ScanError(f"{path}: PNG encoding failed")
    write_atomically(path, encoded.tobytes())


def read_png(path: Path) -> RgbImage:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise scan.ScanError(f"{path}: missing or unreadable; resume the job to redo it")
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.uint8)


async def main(cfg: MicroscopeConfig, service: Service) -> None:
    async with Runtime(cfg, DAEMON) as rt:
        microscope = Microscope(cfg, rt)
        await microscope.start()
        service.ready(f"{len(microscope.jobs)} jobs to run or deliver")
        try:
            await service.stopping.wait()
        finally:
            await microscope.stop()
