"""The slide scanner as a chaos/soak part (bench/parts.py): the microscope daemon as its own
process (``medge run microscope``), the GRBL stage controller as another (``medge sim grbl`` on a
fixed loopback port, so that it can be unplugged, stalled or made noisy), the virtual cameras in
the daemon rendering at the position the controller reports, and scan jobs submitted through the
MQTT job API of ``medge scan`` (:class:`medge.scancli.ScannerClient`), delivered to the shared
Orthanc, alternately by C-STORE and by STOW-RS.

Jobs are small (a 3 x 3 tile area of the 3.2 x 2.4 mm test slide, 320 x 240 px tiles, motion 20x
real time) so that a campaign runs many of them. The invariant (issue 11): every acknowledged
job ended in the PACS (all instances of its series, one series per job) or failed with a reason
and its tiles on disk; none lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from bench.parts import Check, DaemonProcess, Fault, Recovered, Shared, Sim
from medge.config import load
from medge.exitcodes import EXIT_UNAVAILABLE
from medge.runtime import outbox_path
from medge.scancli import CliError, ScannerClient, ScannerNodeConfig

REPO = Path(__file__).resolve().parent.parent
OBJECTIVES = REPO / "config" / "objectives.toml"
AREA_MM = [0.8, 0.8, 1.2, 1.1]
"""3 x 3 tiles at 20x over the test slide's tissue (as tests/test_microscope_e2e.py)."""
REALISTIC_SCAN_INTERVAL_S = 600.0
"""A slide every ten minutes at the realistic pace."""
MAX_OUTSTANDING = 2
"""Jobs queued or running before the next slide is loaded: a single-slide stage cannot hold
more, and a chaos rate far above the scanner's throughput would only grow the queue."""
TERMINAL = ("done", "failed", "cancelled")
DESTINATIONS = ("orthanc-dimse", "orthanc-stow")
REQUEST_TIMEOUT_S = 10.0
POLL_TIMEOUT_S = 3.0
TIME_SCALE = 20.0
"""Stage motion this many times faster than real time (the GRBL simulator's)."""


@dataclass
class Submitted:
    """A job the daemon acknowledged, and what the part last heard of it."""

    job: str
    accession: str
    destination: str
    summary: dict[str, Any] = field(default_factory=dict)
    verified: bool = False
    """Its series was found complete in the PACS and its working files were deleted."""


class ScannerPart:
    """The scanner under load and faults; see the module docstring."""

    name = "scanner"
    daemon = "microscope"

    def __init__(self) -> None:
        self.grbl = Sim("grbl", ("--time-scale", f"{TIME_SCALE:g}", "--backlash-um", "0"))
        self.jobs: dict[str, Submitted] = {}
        self.refused = 0
        """Submissions that got no acknowledgement (daemon down, broker down): not jobs."""
        self._attempts = 0
        self._advanced_at: dict[str, float] = {}
        """Job -> when a refresh last saw it move forward (not fail)."""
        self._shared: Shared | None = None
        self._process: DaemonProcess | None = None
        self._dir = Path()

    # -- processes ---------------------------------------------------------------------------

    @property
    def shared(self) -> Shared:
        assert self._shared is not None, "start() first"
        return self._shared

    @property
    def process(self) -> DaemonProcess:
        if self._process is None:
            raise RuntimeError("the scanner part is not started")
        return self._process

    @property
    def config(self) -> Path:
        return self._dir / "microscope.toml"

    @property
    def state_dir(self) -> Path:
        return self._dir / "state"

    @property
    def outbox_path(self) -> Path:
        return outbox_path(self.state_dir, "microscope")

    def start(self, shared: Shared) -> None:
        self._shared = shared
        self._dir = shared.work / "scanner"
        self._dir.mkdir(parents=True, exist_ok=True)
        self.grbl.start()
        self._write_configs()
        self._process = DaemonProcess("microscope", self.config, self._dir / "daemon.log")
        self._process.start()
        asyncio.run(self._until_answering(120.0))  # start() runs in a worker thread

    def _write_configs(self) -> None:
        pacs = self.shared.pacs
        password = self._dir / "pacs.password"
        password.write_text(pacs.password)
        password.chmod(0o600)
        (self._dir / "pacs.toml").write_text(f"""\
spool_dir = "spool"
[retry]
initial_s = 1.0
factor = 2.0
max_s = 5.0
[destinations.orthanc-dimse]
protocol = "dimse"
host = "127.0.0.1"
port = {pacs.dicom_port}
called_ae = "{pacs.aet}"
timeout_s = 10.0
[destinations.orthanc-stow]
protocol = "stow"
url = "{pacs.dicomweb_url}"
username = "{pacs.username}"
password_file = "pacs.password"
timeout_s = 10.0
""")
        self.config.write_text(f"""\
[node]
site = "chaos"
node = "scanner-01"
state_dir = "{self.state_dir}"
[mqtt]
port = {self.shared.broker.port}
reconnect_min = 0.5
reconnect_max = 2.0
[microscope]
objectives_file = "{OBJECTIVES}"
pacs_file = "pacs.toml"
delivery_wait_s = 5.0
disk_reserve_mb = 1.0
focus_points = 3
# an hour's soak finishes ~60 slides: past this many the daemon holds no more (its steady state)
recent_jobs = 20
[microscope.stage]
port = "{self.grbl.url}"
slide_origin_um = [-10000.0, -10000.0]
[microscope.camera]
width = 320
height = 240
overview_um_per_px = 20.0
[microscope.simulator]
slide = "test"
""")

    async def _until_answering(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while True:
                if self.process.pid is None:
                    raise RuntimeError(f"the microscope daemon exited: see {self.process.log}")
                with contextlib.suppress(CliError):
                    await self._request("list", timeout=3.0)
                    return
                await asyncio.sleep(0.5)

    def stop(self) -> None:
        if self._process is not None:
            with contextlib.suppress(Exception):
                self._process.stop(timeout=20.0)
        with contextlib.suppress(Exception):
            self.grbl.kill()

    def daemon_pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    # -- the job API -------------------------------------------------------------------------

    async def _request(self, op: str, timeout: float = REQUEST_TIMEOUT_S,
                       **args: Any) -> dict[str, Any]:
        """One request through the ``medge scan`` client; CliError when unanswered/refused
        (also when the broker goes away mid-request)."""
        cfg = load(self.config, ScannerNodeConfig)
        try:
            async with ScannerClient(cfg, timeout=timeout) as client:
                return await client.request(op, **args)
        except aiomqtt.MqttError as exc:
            raise CliError(f"broker lost during {op}: {exc}", EXIT_UNAVAILABLE) from None

    async def _refresh(self) -> bool:
        """Update every known job from the daemon's list; False if it did not answer."""
        try:  # a short timeout: a request lost in a broker restart is soon asked again
            reply = await self._request("list", timeout=POLL_TIMEOUT_S)
        except CliError:
            return False
        for summary in reply["jobs"]:
            known = self.jobs.get(summary["job"])
            if known is None:
                continue
            moved = any(a > b for a, b in zip(_advance(summary), _advance(known.summary),
                                              strict=True))
            if moved and summary.get("status") != "failed":
                self._advanced_at[known.job] = time.monotonic()
            known.summary = summary
        return True

    def _outstanding(self) -> int:
        return sum(1 for job in self.jobs.values() if job.summary.get("status") not in TERMINAL)

    async def _submit(self) -> bool:
        self._attempts += 1
        accession = f"CHAOS-{self._attempts:05d}"
        destination = DESTINATIONS[self._attempts % len(DESTINATIONS)]
        spec = {"barcode": f"SL-{self._attempts:05d}", "accession": accession,
                "patient": "P-CHAOS", "objective": "20x", "area_mm": AREA_MM,
                "pacs": destination, "jpeg_quality": 80}
        try:
            reply = await self._request("submit", job=spec)
        except CliError:
            self.refused += 1
            return False
        summary = reply["job"]
        self.jobs[summary["job"]] = Submitted(summary["job"], accession, destination, summary)
        return True

    async def load(self) -> None:
        """A slide every ``600 / rate`` s while at most ``MAX_OUTSTANDING`` wait; refused
        submissions are retried after a pause; delivered jobs' files are cleaned up."""
        interval = REALISTIC_SCAN_INTERVAL_S / self.shared.rate
        next_at = time.monotonic()
        while True:
            answering = await self._refresh()
            if answering:
                await asyncio.to_thread(self._clean_delivered)
            due = time.monotonic() >= next_at and self._outstanding() < MAX_OUTSTANDING
            if answering and due and await self._submit():
                next_at = time.monotonic() + interval
            await asyncio.sleep(min(2.0, interval))

    def _clean_delivered(self) -> None:
        """A job whose series is complete in the PACS keeps its state and report; its tiles
        and DICOM files go once checked against Orthanc, so an hour's soak stays small (the
        daemon's own retention, ``keep_delivered_days``, counts in days)."""
        for job in self.jobs.values():
            if job.verified or job.summary.get("delivery") != "delivered":
                continue
            try:
                problem = self._pacs_problem(job)
            except OSError:  # the PACS is down (a fault): look again later
                return
            if problem is None:
                job.verified = True
                for name in ("tiles", "dicom", "work"):
                    shutil.rmtree(self._job_dir(job) / name, ignore_errors=True)

    # -- faults ------------------------------------------------------------------------------

    def faults(self) -> Sequence[tuple[str, Fault]]:
        return [("SIGKILL scanner daemon", self._kill_daemon),
                ("stage unplug/replug", self._unplug_stage),
                ("stalled stage", self._stall_stage),
                ("corrupt+dropped GRBL bytes", self._noisy_stage),
                ("scanner disk nearly full", self._disk_full)]

    async def working(self, since: float) -> None:
        """A job moved forward after ``since`` (a tile, the end, a delivery), as the job API
        reports it: failing is not working."""
        while not any(at > since for at in self._advanced_at.values()):
            await self._refresh()
            await asyncio.sleep(0.5)

    def _recovered(self) -> Recovered:
        ended = time.monotonic()
        return lambda: self.working(ended)

    async def _until_acquiring(self, timeout: float = 120.0) -> None:
        """Faults aimed at a scan wait (bounded) for one to be acquiring tiles."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while True:
                    await self._refresh()
                    if any(j.summary.get("phase") == "acquire"
                           and j.summary.get("status") == "running" for j in self.jobs.values()):
                        return
                    await asyncio.sleep(0.5)

    async def _kill_daemon(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        await self._until_acquiring()
        self.process.restart()
        return self._recovered(), 0.0

    async def _unplug_stage(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        await self._until_acquiring()
        self.grbl.kill()
        await asyncio.sleep(args.settle)
        await asyncio.to_thread(self.grbl.start)
        return self._recovered(), args.settle

    async def _stall_stage(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        await self._until_acquiring()
        assert self.grbl.proc is not None
        os.kill(self.grbl.proc.pid, signal.SIGSTOP)
        await asyncio.sleep(args.settle)
        os.kill(self.grbl.proc.pid, signal.SIGCONT)
        return self._recovered(), args.settle

    async def _noisy_stage(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        await self._until_acquiring()
        self.grbl.kill()
        await asyncio.to_thread(self.grbl.start, "--corrupt-rate", "0.001", "--drop-rate",
                                "0.001", "--seed", "11")
        await asyncio.sleep(args.settle * 2)
        self.grbl.kill()
        await asyncio.to_thread(self.grbl.start)
        return self._recovered(), args.settle * 2

    async def _disk_full(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        """No file of the daemon may grow past 4 KiB (EFBIG, as on a full disk): tiles, job
        state, outbox."""
        await self._until_acquiring()
        pid = self.process.pid
        assert pid is not None
        limits = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (4096, limits[1]))
        await asyncio.sleep(args.settle)
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)
        return self._recovered(), args.settle

    # -- the end -----------------------------------------------------------------------------

    async def settle(self, timeout: float) -> None:
        """Until every acknowledged job is finished and every finished one left the spool."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not (await self._refresh() and all(
                        _at_rest(job.summary) for job in self.jobs.values())):
                    await asyncio.sleep(1.0)

    def _job_dir(self, job: Submitted) -> Path:
        return self.state_dir / "scans" / job.job

    def _pacs_problem(self, job: Submitted) -> str | None:
        """None if the PACS holds exactly one series for the job's accession with exactly the
        instances the daemon wrote; else what is wrong."""
        pacs = self.shared.pacs
        state = json.loads((self._job_dir(job) / "state.json").read_text())
        series_uid = state["plan_info"].get("series_uid")
        files = state["plan_info"].get("dicom_files", [])
        studies = pacs.rest("/tools/find", json.dumps(
            {"Level": "Study", "Query": {"AccessionNumber": job.accession}}).encode())
        series = [s for study in studies for s in pacs.rest(f"/studies/{study}")["Series"]]
        if len(series) != 1:
            return f"{len(series)} series in the PACS for accession {job.accession}"
        held = pacs.instance_uids(series_uid)
        if len(held) != len(files):
            return f"{len(held)} of {len(files)} instances of series {series_uid} in the PACS"
        if not job.verified:
            written = _sop_instance_uids(self._job_dir(job) / "dicom", files)
            if written != held:
                return f"series {series_uid}: the PACS holds other instances than written"
        return None

    def _tiles_problem(self, job: Submitted) -> str | None:
        """None if a failed job says why (the daemon's answer: a full disk may have kept its
        state file from being rewritten) and its tiles are on disk."""
        if not job.summary.get("message"):
            return "failed without a reason"
        state = json.loads((self._job_dir(job) / "state.json").read_text())
        tiles = self._job_dir(job) / "tiles"
        missing = [t["index"] for t in state.get("tiles", [])
                   if not (tiles / f"{t['index']:05d}.png").is_file()]
        on_disk = len(list(tiles.glob("*.png"))) if tiles.is_dir() else 0
        done = int(job.summary.get("tiles_done", 0))
        if missing or on_disk < done:
            return f"tiles missing: {missing[:10]}; {on_disk} on disk of {done}"
        return None

    async def check(self) -> list[Check]:
        answered = await self._refresh()
        statuses = {status: sum(1 for j in self.jobs.values()
                                if j.summary.get("status") == status)
                    for status in ("done", "failed", "cancelled")}
        unfinished = [j.job for j in self.jobs.values() if not _at_rest(j.summary)]
        in_pacs, problems, failed_ok = 0, [], 0
        for job in self.jobs.values():
            status = job.summary.get("status")
            if status == "done":
                problem = await asyncio.to_thread(self._pacs_problem, job)
                if problem is None:
                    in_pacs += 1
                else:
                    problems.append(f"{job.job}: {problem}")
            elif status in ("failed", "cancelled"):
                problem = self._tiles_problem(job)
                if problem is None:
                    failed_ok += 1
                else:
                    problems.append(f"{job.job}: {problem}")
        resumed = sum(1 for j in self.jobs.values() if j.summary.get("resumes", 0))
        retried = sum(1 for j in self.jobs.values()
                      if "after a retry" in str(j.summary.get("message", "")))
        reasons = sorted({_reason(j.summary.get("message", "")) for j in self.jobs.values()
                          if j.summary.get("status") == "failed"})
        return [
            Check(self.name, "daemon answers at the end", answered,
                  "job list read" if answered else "no answer to `list`"),
            Check(self.name, "no job lost", answered and not unfinished,
                  f"{len(self.jobs)} acknowledged ({self.refused} submissions unanswered, "
                  f"retried); {statuses}; not at rest: {unfinished[:5]}"),
            Check(self.name, "every scan in the PACS or failed with its tiles",
                  not problems and in_pacs + failed_ok == len(self.jobs),
                  f"{in_pacs} complete in the PACS (one series each), {failed_ok} failed/"
                  f"cancelled with reason and tiles; {resumed} resumed after a fault, "
                  f"{retried} delivered from the spool after the PACS was back"
                  + (f"; failures: {'; '.join(reasons)}" if reasons else "")
                  + (f"; PROBLEMS: {'; '.join(problems[:5])}" if problems else "")),
        ]


def _advance(summary: dict[str, Any]) -> tuple[int, int, int]:
    """How far a job got on the stage and beyond: tiles, finished, delivered — each only grows
    while the scanner works (overview, tissue and plan need neither the stage nor the PACS)."""
    return (int(summary.get("tiles_done", 0)), int(summary.get("status") == "done"),
            int(summary.get("delivery") == "delivered"))


def _at_rest(summary: dict[str, Any]) -> bool:
    """Finished, and if done, no longer waiting in the spool."""
    return summary.get("status") in TERMINAL and summary.get("delivery") != "spooled"


def _reason(message: str) -> str:
    """The kind of a failure message, without the job id and counts."""
    return message.split(":", 1)[0][:60]


def _sop_instance_uids(directory: Path, names: list[str]) -> set[str]:
    import pydicom

    return {str(pydicom.dcmread(directory / name, stop_before_pixels=True).SOPInstanceUID)
            for name in names}
