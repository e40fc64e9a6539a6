"""The scanner end to end: a real mosquitto, the daemon as a child process on the simulated rig
(GRBL simulator + virtual slide camera, in the daemon), the ``medge`` CLI, and a real Orthanc.

Scans are kept small (a 3.2 x 2.4 mm test slide, 320 x 240 px tiles, a few tiles) and motion
runs faster than real time, so the whole file takes well under a minute or two."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from bench.parts import DaemonProcess, Sim
from medge import cli
from medge.config import load
from medge.localpacs import Orthanc
from medge.scancli import CliError, ScannerClient, ScannerNodeConfig
from tests.fixtures.broker import Mosquitto
from tests.fixtures.orthanc import require_orthanc
from tests.helpers import daemon_config

OBJECTIVES = Path(__file__).parents[1] / "config" / "objectives.toml"
AREA = "0.8,0.8,1.2,1.1"
"""3 x 3 tiles at 20x over the test slide's tissue."""
JOB_TIMEOUT_S = 120.0


class Scanner:
    """One daemon process and the CLI pointed at it."""

    def __init__(self, workdir: Path, broker: Mosquitto, pacs: Orthanc | None = None,
                 disk_reserve_mb: float = 1.0, stage_port: str = "sim",
                 recent_jobs: int = 200, keep_delivered_days: float = 7.0,
                 **simulator: Any) -> None:
        self.workdir = workdir
        self.config = workdir / "microscope.toml"
        self.log = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        pacs_line = ""
        if pacs is not None:
            (workdir / "pacs.toml").write_text(
                'spool_dir = "spool"\n[retry]\ninitial_s = 0.3\nfactor = 1.0\nmax_s = 0.3\n'
                f'[destinations.lab]\nprotocol = "dimse"\nhost = "127.0.0.1"\n'
                f'port = {pacs.dicom_port}\ncalled_ae = "{pacs.aet}"\ntimeout_s = 10.0\n')
            pacs_line = 'pacs_file = "pacs.toml"\ndelivery_wait_s = 5.0\n'
        sim = "".join(f"{key} = {value}\n"
                      for key, value in {"time_scale": 20.0, **simulator}.items())
        self.config.write_text(f"""
[node]
site = "lab"
node = "scanner-01"
state_dir = "{workdir / 'state'}"
[mqtt]
port = {broker.port}
reconnect_min = 0.05
reconnect_max = 0.5
[microscope]
objectives_file = "{OBJECTIVES}"
{pacs_line}disk_reserve_mb = {disk_reserve_mb}
recent_jobs = {recent_jobs}
keep_delivered_days = {keep_delivered_days}
focus_points = 3
[microscope.stage]
port = "{stage_port}"
slide_origin_um = [-10000.0, -10000.0]
[microscope.camera]
width = 320
height = 240
overview_um_per_px = 20.0
[microscope.simulator]
slide = "test"
{sim}""")

    def start(self) -> None:
        """The daemon logs into a pipe, as under journald: a disk-full fault hits its own files,
        not its log."""
        daemon = DaemonProcess("microscope", self.config, self.log)
        daemon.start()
        self.proc = daemon.proc
        asyncio.run(self._wait_ready())

    async def _wait_ready(self) -> None:
        async with asyncio.timeout(60):
            while True:
                assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
                try:
                    async with ScannerClient(self.node_config(), timeout=2.0) as client:
                        await client.request("list")
                        return
                except Exception:
                    await asyncio.sleep(0.2)

    def node_config(self) -> ScannerNodeConfig:
        return load(self.config, ScannerNodeConfig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = cli.main([*args, "--config", str(self.config)])
        out, err = capsys.readouterr()
        return status, out, err

    def submit(self, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
        status, out, err = self.cli(capsys, "scan", "start", "--barcode", "S-1", "--accession",
                                    "A-1", "--patient", "P-1", "--objective", "20x", "--area",
                                    AREA, "--json", *extra)
        assert status == 0, err
        return str(json.loads(out)["job"])

    def wait_for(self, job: str, predicate: Callable[[dict[str, Any]], bool],
                 timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        """The first published state of ``job`` that satisfies ``predicate``."""
        async def watch() -> dict[str, Any]:
            async with ScannerClient(self.node_config(), timeout=10.0) as client:
                await client.follow()
                state: dict[str, Any] = (await client.request("status", job=job))["job"]
                async with asyncio.timeout(timeout):
                    while not predicate(state):
                        update = await client.states.get()
                        if update.get("job") == job and update["at"] >= state["at"]:
                            state = update
                return state
        return asyncio.run(watch())

    def state_file(self, job: str) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(
            (self.workdir / "state" / "scans" / job / "state.json").read_text())
        return document


def finished(state: dict[str, Any]) -> bool:
    return state["status"] in ("done", "failed", "cancelled")


@pytest.fixture
def scanners(tmp_path: Path, broker: Mosquitto) -> Iterator[Callable[..., Scanner]]:
    made: list[Scanner] = []

    def make(name: str = "a", pacs: Orthanc | None = None, **options: Any) -> Scanner:
        directory = tmp_path / name
        directory.mkdir()
        scanner = Scanner(directory, broker, pacs, **options)
        scanner.start()
        made.append(scanner)
        return scanner

    yield make
    for scanner in made:
        scanner.stop()


def test_a_scan_lands_in_orthanc_and_passes_the_validators(
        scanners: Callable[..., Scanner], orthanc: Orthanc,
        capsys: pytest.CaptureFixture[str]) -> None:
    scanner = scanners(pacs=orthanc)
    status, out, _ = scanner.cli(capsys, "scan", "start", "--barcode", "S-1", "--accession",
                                 "A-1", "--patient", "P-1", "--objective", "20x", "--area",
                                 AREA, "--dry-run")
    assert status == 0 and "tiles: 9 (3 columns x 3 rows" in out and "nothing has moved" in out
    job = scanner.submit(capsys, "--pacs", "lab")
    final = scanner.wait_for(job, lambda s: finished(s) and s["delivery"] != "spooled")
    assert final["status"] == "done", final["message"]
    assert final["delivery"] == "delivered" and final["tiles_done"] == 9
    state = scanner.state_file(job)
    series = state["plan_info"]["series_uid"]
    files = sorted((scanner.workdir / "state" / "scans" / job / "dicom").glob("*.dcm"))
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert orthanc.instance_uids(series) == sent
    status, out, _ = scanner.cli(capsys, "scan", "status", job, "--follow", "--json")
    assert status == 0 and json.loads(out.splitlines()[-1])["status"] == "done"
    status, out, _ = scanner.cli(capsys, "scan", "report", job)
    assert status == 0, out
    assert "9 planned, 9 captured" in out and "validation: passed" in out
    assert "delivery: delivered" in out
    report = state["report"]
    assert report["validation"]["ok"] is True
    assert report["focus"]["max_abs_residual_um"] < 5.0
    assert set(report["timings_s"]) >= {"focus", "acquire", "stitch", "dicom", "deliver"}


def test_a_delivered_scan_leaves_the_scanner_after_its_keep_time(
        scanners: Callable[..., Scanner], orthanc: Orthanc,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing removed the files of delivered scans: a scanner's disk filled with tiles and
    DICOM copies the PACS already held, and then scanning stopped."""
    scanner = scanners(pacs=orthanc, keep_delivered_days=0)
    job = scanner.submit(capsys, "--pacs", "lab")
    assert scanner.wait_for(job, finished)["delivery"] == "delivered"
    later = scanner.submit(capsys)  # the worker tidies up before it takes the next job
    scanner.wait_for(later, lambda s: s["status"] == "running")
    assert scanner.cli(capsys, "scan", "cancel", later)[0] == 0
    directory = scanner.workdir / "state" / "scans" / job
    kept = {p.name for p in directory.iterdir()}
    assert kept.isdisjoint({"tiles", "dicom", "work"}), kept
    assert {"state.json", "report.json", "overview.png"} <= kept, kept
    status, out, _ = scanner.cli(capsys, "scan", "status", job, "--json")
    assert status == 0 and "removed from the scanner" in json.loads(out)["message"]
    status, out, _ = scanner.cli(capsys, "scan", "report", job)
    assert status == 0 and "9 planned, 9 captured" in out and "delivery: delivered" in out
    assert scanner.wait_for(later, finished)["status"] == "cancelled"
    assert (scanner.workdir / "state" / "scans" / later / "tiles").exists()


def test_invalid_jobs_and_a_missing_daemon_get_one_clear_sentence(
        scanners: Callable[..., Scanner], capsys: pytest.CaptureFixture[str]) -> None:
    scanner = scanners()
    status, _, err = scanner.cli(capsys, "scan", "start", "--barcode", "S 1", "--accession", "A",
                                 "--patient", "P", "--objective", "20x")
    assert status == 2 and "barcode" in err
    status, _, err = scanner.cli(capsys, "scan", "start", "--barcode", "S1", "--accession", "A",
                                 "--patient", "P", "--objective", "63x")
    assert status == 2 and "objective" in err and "20x" in err
    status, _, err = scanner.cli(capsys, "scan", "start", "--barcode", "S1", "--accession", "A",
                                 "--patient", "P", "--objective", "20x", "--pacs", "lab")
    assert status == 2 and "pacs" in err
    status, _, err = scanner.cli(capsys, "scan", "report", "20260101-000000-abcdef")
    assert status == 2 and "no job" in err
    scanner.stop()
    status, _, err = scanner.cli(capsys, "scan", "list", "--timeout", "1")
    assert status == 3 and "is it running" in err and "medge run microscope" in err


async def test_a_lost_broker_ends_a_request_and_a_follow_with_one_clear_sentence(
        broker: Mosquitto, tmp_path: Path) -> None:
    """Seen in bench/chaos (broker restarts under the scanner part's job client): a request
    then raised a raw MqttCodeError and `scan start --wait` / `status --follow` waited for a
    state forever."""
    async with ScannerClient(daemon_config(tmp_path, broker.port), timeout=60.0) as client:
        await client.follow()
        following = asyncio.create_task(client.next_state())
        # no daemon answers; on the wire or not yet when the broker goes, the answer is the same
        in_flight = asyncio.create_task(client.request("list"))
        broker.stop()
        for waiting in (following, in_flight):
            with pytest.raises(CliError, match="lost the connection to the MQTT broker"):
                await asyncio.wait_for(waiting, 10)  # not the 60 s request timeout
        with pytest.raises(CliError, match="medge scan status"):
            await client.request("list")


def test_cancel_mid_scan_keeps_the_tiles(scanners: Callable[..., Scanner],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    scanner = scanners(time_scale=1.0)
    job = scanner.submit(capsys)
    scanner.wait_for(job, lambda s: s["phase"] == "acquire" and s["tiles_done"] >= 1)
    status, _out, err = scanner.cli(capsys, "scan", "cancel", job)
    assert status == 0, err
    final = scanner.wait_for(job, finished)
    assert final["status"] == "cancelled" and 1 <= final["tiles_done"] < 9
    tiles = list((scanner.workdir / "state" / "scans" / job / "tiles").glob("*.png"))
    assert len(tiles) == final["tiles_done"]
    status, _, err = scanner.cli(capsys, "scan", "cancel", job)
    assert status == 2 and "already cancelled" in err
    status, _, _ = scanner.cli(capsys, "scan", "resume", job)
    assert status == 0
    assert scanner.wait_for(job, finished)["status"] == "done"


def test_finished_jobs_leave_memory_but_answer_by_id_from_disk(
        scanners: Callable[..., Scanner], capsys: pytest.CaptureFixture[str]) -> None:
    """The soak found the daemon keeping every job's full state for ever (~80 KB a slide):
    now only ``recent_jobs`` summaries stay listed; status, report and resume of an older job
    read its state file, before and after a restart."""
    scanner = scanners(recent_jobs=1, time_scale=1.0)
    running, second, third = (scanner.submit(capsys) for _ in range(3))
    for job in (second, third):  # queued behind the first: cancelled at once, then finished
        assert scanner.cli(capsys, "scan", "cancel", job)[0] == 0

    def listed() -> list[str]:
        status, out, err = scanner.cli(capsys, "scan", "list", "--json")
        assert status == 0, err
        return [j["job"] for j in json.loads(out)]

    assert listed() == [running, third]  # the second fell out of the newest 1 finished
    status, out, _ = scanner.cli(capsys, "scan", "status", second, "--json")
    assert status == 0 and json.loads(out)["status"] == "cancelled"
    status, _, err = scanner.cli(capsys, "scan", "report", second)
    assert status == 2 and "no report yet" in err and "cancelled" in err
    assert scanner.cli(capsys, "scan", "cancel", running)[0] == 0
    assert scanner.wait_for(running, finished)["status"] == "cancelled"
    assert scanner.cli(capsys, "scan", "resume", second)[0] == 0
    assert scanner.wait_for(second, finished)["status"] == "done"
    assert listed() == [second]
    scanner.stop()
    scanner.start()
    assert listed() == [second]
    status, out, _ = scanner.cli(capsys, "scan", "report", second)
    assert status == 0 and "9 planned, 9 captured" in out
    status, out, _ = scanner.cli(capsys, "scan", "status", running, "--json")
    assert status == 0 and json.loads(out)["tiles_done"] < 9


def test_sigkill_mid_acquisition_resumes_and_matches_an_uninterrupted_scan(
        scanners: Callable[..., Scanner], capsys: pytest.CaptureFixture[str]) -> None:
    noiseless = {"read_noise": 0.0, "full_well": 0.0}  # frames compared pixel by pixel below
    reference = scanners("reference", **noiseless)
    ref_job = reference.submit(capsys)
    assert reference.wait_for(ref_job, finished)["status"] == "done"
    reference.stop()

    scanner = scanners("killed", time_scale=1.0, **noiseless)
    job = scanner.submit(capsys)
    scanner.wait_for(job, lambda s: s["phase"] == "acquire" and s["tiles_done"] >= 2)
    scanner.stop(signal.SIGKILL)
    before = scanner.state_file(job)
    assert before["status"] == "running" and 2 <= len(before["tiles"]) < 9
    scanner.start()  # re-homes (the simulated controller rebooted with the daemon) and goes on
    final = scanner.wait_for(job, finished)
    assert final["status"] == "done", final["message"]
    assert final["resumes"] == 1

    after = scanner.state_file(job)
    kept = {t["index"]: t["sha256"] for t in before["tiles"]}
    assert {t["index"]: t["sha256"] for t in after["tiles"] if t["index"] in kept} == kept
    expected = reference.state_file(ref_job)
    assert len(after["tiles"]) == len(expected["tiles"]) == 9
    for resumed, uninterrupted in zip(after["tiles"], expected["tiles"], strict=True):
        for axis in ("x_um", "y_um", "z_um"):
            assert resumed[axis] == pytest.approx(uninterrupted[axis], abs=2.0)
    for tile in after["tiles"]:  # the same pixels: same place, same focus
        name = f"{tile['index']:05d}.png"
        ours = scanner.workdir / "state" / "scans" / job / "tiles" / name
        theirs = reference.workdir / "state" / "scans" / ref_job / "tiles" / name
        assert _mean_abs_difference(ours, theirs) < 3.0, name


def _mean_abs_difference(first: Path, second: Path) -> float:
    import cv2
    import numpy as np

    a = cv2.imread(str(first)).astype(np.float32)
    b = cv2.imread(str(second)).astype(np.float32)
    return float(np.abs(a - b).mean())


def test_a_stage_alarm_mid_scan_fails_clearly_then_home_and_resume_finish(
        scanners: Callable[..., Scanner], capsys: pytest.CaptureFixture[str]) -> None:
    # Faults count acquisition frames: the limit alarm comes with the third tile.
    scanner = scanners(fault_alarm_after_captures=3)
    job = scanner.submit(capsys)
    final = scanner.wait_for(job, finished)
    assert final["status"] == "failed"
    assert final["message"].startswith("stage alarm or stage error during acquire")
    assert "medge stage home" in final["message"] and f"medge scan resume {job}" in final["message"]
    assert final["tiles_done"] == 3  # every frame taken before the alarm is kept
    status, out, err = scanner.cli(capsys, "stage", "home")
    assert status == 0, err
    assert "alarm" not in out and "POSITION LOST" not in out
    status, _, err = scanner.cli(capsys, "scan", "resume", job)
    assert status == 0, err
    final = scanner.wait_for(job, finished)
    assert final["status"] == "done" and final["tiles_done"] == 9


def test_a_controller_reboot_mid_scan_is_rehomed_and_the_scan_goes_on(
        scanners: Callable[..., Scanner], capsys: pytest.CaptureFixture[str]) -> None:
    """A USB reset or brown-out reboots the controller: position lost, no alarm."""
    scanner = scanners(fault_reset_after_captures=3)
    job = scanner.submit(capsys)
    final = scanner.wait_for(job, finished)
    assert final["status"] == "done", final["message"]
    state = scanner.state_file(job)
    assert state["plan_info"]["stage_recoveries"] == 1
    assert len(state["tiles"]) == 9


def test_a_stage_controller_of_its_own_unplugged_mid_scan_is_rehomed_and_the_scan_goes_on(
        scanners: Callable[..., Scanner], capsys: pytest.CaptureFixture[str]) -> None:
    """The controller as its own process (``medge sim grbl``, as a real board on USB), the
    simulated cameras rendering where it reports: killed mid-scan and back on the same port."""
    grbl = Sim("grbl", ("--backlash-um", "0"))
    grbl.start()
    try:
        scanner = scanners(stage_port=grbl.url)
        job = scanner.submit(capsys)
        scanner.wait_for(job, lambda s: s["phase"] == "acquire" and s["tiles_done"] >= 2)
        grbl.kill()
        grbl.start()
        final = scanner.wait_for(job, finished)
        assert final["status"] == "done", final["message"]
        state = scanner.state_file(job)
        assert state["plan_info"]["stage_recoveries"] == 1 and len(state["tiles"]) == 9
        assert state["report"]["validation"]["ok"] is True
    finally:
        grbl.kill()


def test_a_lost_camera_fails_the_job_with_what_to_do(
        scanners: Callable[..., Scanner], capsys: pytest.CaptureFixture[str]) -> None:
    scanner = scanners(fault_camera_lost_after_captures=2)
    status, out, _ = scanner.cli(capsys, "scan", "start", "--barcode", "S-1", "--accession",
                                 "A-1", "--patient", "P-1", "--objective", "20x", "--area",
                                 AREA, "--wait", "--json")
    assert status == 1  # --wait: the job's outcome is the exit status
    lines = [json.loads(line) for line in out.splitlines()]
    final = lines[-1]
    phases = [line["phase"] for line in lines]
    assert phases.index("focus") < phases.index("acquire")
    assert [line["tiles_done"] for line in lines] == sorted(line["tiles_done"] for line in lines)
    assert final["status"] == "failed" and "camera lost" in final["message"]
    assert final["tiles_done"] == 2 and "2 of 9 tiles kept" in final["message"]


def test_pacs_down_during_delivery_spools_then_delivers(
        scanners: Callable[..., Scanner], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    require_orthanc()
    pacs = Orthanc(tmp_path / "orthanc")
    pacs.start()
    try:
        scanner = scanners(pacs=pacs)
        pacs.stop()
        job = scanner.submit(capsys, "--pacs", "lab")
        final = scanner.wait_for(job, finished)
        assert final["status"] == "done" and final["delivery"] == "spooled"
        assert "spooled" in final["message"]
        pacs.start()
        delivered = scanner.wait_for(job, lambda s: s["delivery"] == "delivered")
        state = scanner.state_file(job)
        assert len(pacs.instance_uids(state["plan_info"]["series_uid"])) == len(
            state["plan_info"]["dicom_files"]) >= 3  # at least a level, label and overview
        assert delivered["status"] == "done"
    finally:
        pacs.stop()


def test_blank_focus_fails_clearly_and_the_stage_and_camera_commands_work(
        scanners: Callable[..., Scanner], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    scanner = scanners(focal_plane_z_um=-4000.0)  # 1 mm above where focus is searched
    job = scanner.submit(capsys)
    final = scanner.wait_for(job, finished)
    assert final["status"] == "failed" and "blank focus" in final["message"]
    status, out, err = scanner.cli(capsys, "stage", "jog", "--dx", "250", "--dz", "-20")
    assert status == 0, err
    status, out, _ = scanner.cli(capsys, "stage", "where", "--json")
    before = json.loads(out)["stage_um"]
    status, out, err = scanner.cli(capsys, "stage", "jog", "--dx", "-100", "--dy", "50")
    assert status == 0, err
    after = json.loads(scanner.cli(capsys, "stage", "where", "--json")[1])["stage_um"]
    assert after == pytest.approx([before[0] - 100, before[1] + 50, before[2]], abs=1.0)
    snapshot = tmp_path / "frame.png"
    status, out, err = scanner.cli(capsys, "camera", "snapshot", str(snapshot))
    assert status == 0, err
    assert snapshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "320x240" in out
    status, out, err = scanner.cli(capsys, "camera", "list")
    assert status == 0 and "tiles" in out and "overview" in out


def test_a_disk_full_mid_scan_fails_the_job_clearly_and_the_queue_goes_on(
        scanners: Callable[..., Scanner], capsys: pytest.CaptureFixture[str]) -> None:
    """No file of the daemon may grow past 1 KiB (RLIMIT_FSIZE: EFBIG, as ENOSPC on a full
    disk): neither tiles nor the job's state file can be written."""
    scanner = scanners(time_scale=1.0)
    job = scanner.submit(capsys)
    scanner.wait_for(job, lambda s: s["phase"] == "acquire" and s["tiles_done"] >= 1)
    assert scanner.proc is not None
    pid = scanner.proc.pid
    limits = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1024, limits[1]))
    try:
        final = scanner.wait_for(job, finished)
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)
    assert final["status"] == "failed"
    assert final["message"].startswith("disk full during acquire")
    assert f"medge scan resume {job}" in final["message"]
    tiles = scanner.workdir / "state" / "scans" / job / "tiles"
    assert len(list(tiles.glob("*.png"))) >= final["tiles_done"] >= 1
    second = scanner.submit(capsys)  # the queue goes on once there is room again
    assert scanner.wait_for(second, finished)["status"] == "done"
    status, _, err = scanner.cli(capsys, "scan", "resume", job)
    assert status == 0, err
    resumed = scanner.wait_for(job, finished)
    assert resumed["status"] == "done" and resumed["tiles_done"] == 9


def test_a_nearly_full_disk_refuses_the_scan_before_moving(
        scanners: Callable[..., Scanner], capsys: pytest.CaptureFixture[str]) -> None:
    scanner = scanners(disk_reserve_mb=1e9)
    job = scanner.submit(capsys)
    final = scanner.wait_for(job, finished)
    assert final["status"] == "failed" and "disk nearly full" in final["message"]
    assert final["phase"] == "plan" and final["tiles_done"] == 0
