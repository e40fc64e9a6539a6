"""PACS delivery: the durable spool and the retry logic with scripted senders, then C-STORE and
STOW-RS against a real Orthanc (fixture in tests/fixtures/orthanc.py)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from daemons.microscope.wsi.dicom_writer import WriterOptions, WrittenSeries, write_series
from daemons.microscope.wsi.model import SlideMetadata
from medge.config import ConfigError, Secret, from_mapping, load
from medge.pacs.base import (
    InstanceRef,
    PacsError,
    PacsSender,
    PermanentPacsError,
    TransientPacsError,
    run_blocking,
)
from medge.pacs.config import Destination, PacsConfig, RetryPolicy
from medge.pacs.delivery import Progress, SpoolDelivery
from medge.pacs.spool import MANIFEST, Spool, SpoolError, SpoolJob, job_id_for
from medge.pacs.stow import StowSender
from tests.fixtures.orthanc import Orthanc, require_orthanc
from tests.fixtures.wsi_pyramid import pyramid, synthetic_slide

FAST_RETRY = RetryPolicy(initial_s=0.05, factor=2.0, max_s=0.5)
DELIVERY_TIMEOUT_S = 120.0
REPO = Path(__file__).resolve().parents[1]


def new_series(directory: Path, seed: int = 0, size: tuple[int, int] = (600, 400)) -> WrittenSeries:
    """A small slide (3 levels + label + overview at the default size) with fresh UIDs."""
    metadata = SlideMetadata(patient_id="PSEUDO-7", accession_number="ACC-7", barcode=f"BC-{seed}")
    levels = pyramid(synthetic_slide(*size, seed=seed), tile_size=256, spacing_um=0.5)
    return write_series(levels, metadata, directory)


class ScriptedSender(PacsSender):
    """Confirms instances until ``fail_after`` stores, then raises ``error`` once per attempt."""

    def __init__(self, log: list[str], fail_after: int | None = None,
                 error: PacsError | None = None) -> None:
        super().__init__("scripted")
        self.log = log
        self.fail_after = fail_after
        self.error = error or TransientPacsError("scripted: PACS down")
        self.stored = 0

    async def _do_open(self, instances: list[InstanceRef]) -> None:
        self.log.append(f"open {len(instances)}")

    async def _do_store(self, instance: InstanceRef) -> None:
        if self.fail_after is not None and self.stored >= self.fail_after:
            raise self.error
        assert instance.path.is_file()
        self.stored += 1
        self.log.append(instance.sop_instance_uid)

    async def _do_close(self) -> None:
        self.log.append("close")


def delivery(spool: Spool, *senders: ScriptedSender, **kwargs: object) -> SpoolDelivery:
    """A delivery that hands out the given senders in order, one per attempt."""
    queue = list(senders)
    destination = Destination("dimse", host="127.0.0.1", called_ae="PACS")
    return SpoolDelivery(spool, {"lab": destination}, FAST_RETRY,
                         sender_factory=lambda name, dest: queue.pop(0), **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> WrittenSeries:
    return new_series(tmp_path_factory.mktemp("series"))


# ---- configuration ------------------------------------------------------------------------------


def secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def test_example_config_loads(tmp_path: Path) -> None:
    example = REPO / "config" / "orthanc" / "pacs.example.toml"
    text = example.read_text()
    secret(tmp_path / "pacs.password", "pw")
    (tmp_path / "pacs.toml").write_text(text)
    config = load(tmp_path / "pacs.toml", PacsConfig)
    assert config.destination("lab-dimse").called_ae == "ORTHANC"
    stow = config.destination("lab-dicomweb")
    assert stow.protocol == "stow" and stow.password_file is not None
    assert stow.password_file.value == "pw"
    with pytest.raises(KeyError, match="unknown PACS destination 'nope'"):
        config.destination("nope")


@pytest.mark.parametrize(
    ("destination", "reason"),
    [
        ({"protocol": "dimse", "called_ae": "PACS"}, "needs host"),
        ({"protocol": "dimse", "host": "h", "called_ae": "WAY-TOO-LONG-AE-TITLE"}, "AE title"),
        ({"protocol": "dimse", "host": "h", "called_ae": "A\\B"}, "AE title"),
        ({"protocol": "dimse", "host": "h", "called_ae": "P", "port": 0}, "at least 1"),
        ({"protocol": "stow", "url": "ftp://x"}, "needs url"),
        ({"protocol": "stow", "url": "http://x", "username": "u"}, "go together"),
        ({"protocol": "smtp"}, "must be one of"),
    ],
)
def test_bad_destinations_name_key_and_reason(destination: dict[str, object], reason: str) -> None:
    data = {"spool_dir": "/tmp/s", "destinations": {"lab": destination}}
    with pytest.raises(ConfigError, match=reason) as caught:
        from_mapping(data, PacsConfig, source="pacs.toml")
    assert str(caught.value).startswith("pacs.toml: destinations.lab")


def test_password_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("pw")
    password.chmod(0o644)
    data = {"spool_dir": str(tmp_path), "destinations": {"web": {
        "protocol": "stow", "url": "http://x", "username": "u", "password_file": str(password)}}}
    with pytest.raises(ConfigError, match="chmod 600"):
        from_mapping(data, PacsConfig)


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_s=2.0, factor=3.0, max_s=50.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [2.0, 6.0, 18.0, 50.0, 50.0]


# ---- the spool ----------------------------------------------------------------------------------


def test_enqueue_links_files_and_writes_a_manifest(series: WrittenSeries, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    [job] = spool.enqueue(series.paths, "lab")
    assert job.job_id == job_id_for(series.series_instance_uid, "lab")
    assert len(job.entries) == len(series.paths) == 5
    assert {e.file for e in job.entries} == {f"{i.sop_instance_uid}.dcm" for i in series.instances}
    first = job.entries[0]
    assert os.path.samefile(job.directory / first.file, series.paths[0])  # a hard link
    manifest = json.loads((job.directory / MANIFEST).read_text())
    assert manifest["state"] == "pending" and manifest["destination"] == "lab"
    assert [job.job_id] == [j.job_id for j in Spool(tmp_path / "spool").jobs()]


def test_enqueue_is_idempotent_and_revives_a_failed_job(
    series: WrittenSeries, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    [job] = spool.enqueue(series.paths[:2], "lab")
    job.state, job.last_error = "failed", "x"
    spool.save(job)
    [again] = spool.enqueue(series.paths, "lab")
    assert again.job_id == job.job_id
    assert len(again.entries) == 5 and again.state == "pending"
    [other] = spool.enqueue(series.paths, "other-pacs")
    assert other.job_id != job.job_id
    assert len(spool.jobs()) == 2


def test_enqueue_rejects_what_it_cannot_send(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 300)
    spool = Spool(tmp_path / "spool")
    with pytest.raises(SpoolError, match=r"junk\.dcm: not a DICOM instance"):
        spool.enqueue([junk], "lab")
    with pytest.raises(SpoolError, match=r"missing\.dcm"):
        spool.enqueue([tmp_path / "missing.dcm"], "lab")
    with pytest.raises(SpoolError, match="no files"):
        spool.enqueue([], "lab")
    assert spool.jobs() == []


def test_interrupted_enqueue_leaves_nothing_and_bad_manifest_is_named(
    series: WrittenSeries, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    [job] = spool.enqueue(series.paths, "lab")
    leftover = spool.directory / ".incoming-deadbeef"
    leftover.mkdir()
    assert [j.job_id for j in spool.jobs()] == [job.job_id]
    assert not leftover.exists()
    (job.directory / MANIFEST).write_text("{not json")
    with pytest.raises(SpoolError, match=f"{job.job_id}/manifest.json: unreadable"):
        spool.jobs()


async def test_transient_failure_backs_off_and_a_restart_resumes(
    series: WrittenSeries, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    [job] = spool.enqueue(series.paths, "lab")
    first_log: list[str] = []
    assert not await delivery(spool, ScriptedSender(first_log, fail_after=2)).attempt(job)
    assert first_log[-1] == "close"  # the connection is closed on failure too
    sent_before = [uid for uid in first_log if uid.startswith("1.")]
    assert len(sent_before) == 2

    # "restart": new objects reading the same directory
    [resumed] = Spool(tmp_path / "spool").jobs()
    assert resumed.failures == 1 and "PACS down" in resumed.last_error
    assert resumed.next_attempt_at > 0
    assert len(resumed.pending) == 3
    second_log: list[str] = []
    progress: list[Progress] = []
    restarted = delivery(Spool(tmp_path / "spool"), ScriptedSender(second_log),
                         on_progress=progress.append)
    assert await restarted.attempt(resumed)
    sent_after = [uid for uid in second_log if uid.startswith("1.")]
    assert second_log[0] == "open 3"
    assert sorted(sent_before + sent_after) == sorted(e.sop_instance_uid for e in job.entries)
    assert [(p.confirmed, p.total) for p in progress] == [(3, 5), (4, 5), (5, 5)]
    assert spool.jobs() == [] and not job.directory.exists()


async def test_deliver_retries_until_the_pacs_answers(
    series: WrittenSeries, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    [job] = spool.enqueue(series.paths, "lab")
    log: list[str] = []
    failures: list[str] = []
    senders = [ScriptedSender(log, fail_after=0) for _ in range(3)] + [ScriptedSender(log)]
    runner = delivery(spool, *senders, on_failure=lambda j, e: failures.append(str(e)))
    await asyncio.wait_for(runner.deliver(job), DELIVERY_TIMEOUT_S)
    assert len(failures) == 3
    assert spool.jobs() == []


async def test_a_wall_clock_stepped_back_does_not_hold_a_retry_for_the_step(
    series: WrittenSeries, tmp_path: Path
) -> None:
    """Due times are wall time (they outlive a restart); a clock stepped back an hour after a
    failure must cost at most the longest backoff, not the hour (found planning bench/chaos's
    host clock fault)."""
    spool = Spool(tmp_path / "spool")
    [job] = spool.enqueue(series.paths, "lab")
    now = [1_800_000_000.0]
    log: list[str] = []
    delivered = asyncio.Event()
    runner = delivery(spool, ScriptedSender(log, fail_after=0), ScriptedSender(log),
                      clock=lambda: now[0],
                      on_progress=lambda p: delivered.set() if p.confirmed == p.total else None)
    assert not await runner.attempt(job)
    assert runner.wait_s(job) == pytest.approx(FAST_RETRY.delay(1))
    now[0] -= 3600.0  # NTP steps the clock back an hour
    assert runner.wait_s(job) == 0.0
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(stop, idle_s=60.0))
    try:
        await asyncio.wait_for(delivered.wait(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    assert spool.jobs() == []


async def test_permanent_failure_keeps_the_data_and_stops_retrying(
    series: WrittenSeries, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    [job] = spool.enqueue(series.paths, "lab")
    refused = PermanentPacsError("scripted: SOP class refused")
    runner = delivery(spool, ScriptedSender([], fail_after=1, error=refused))
    with pytest.raises(PermanentPacsError, match="SOP class refused"):
        await runner.deliver(job)
    [kept] = spool.jobs()
    assert kept.state == "failed" and "SOP class refused" in kept.last_error
    assert all((kept.directory / e.file).is_file() for e in kept.entries)
    assert len(kept.pending) == 4


async def test_unknown_destination_and_vanished_file_are_permanent(
    series: WrittenSeries, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    [job] = spool.enqueue(series.paths, "elsewhere")
    with pytest.raises(PermanentPacsError, match="elsewhere: destination not in the config"):
        await delivery(spool).attempt(job)
    [job] = spool.enqueue(series.paths, "lab")
    (job.directory / job.entries[1].file).unlink()
    with pytest.raises(PermanentPacsError, match="spooled file is missing"):
        await delivery(spool, ScriptedSender([])).attempt(job)


async def test_daemon_loop_delivers_queued_jobs_and_stops(
    series: WrittenSeries, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.enqueue(series.paths, "lab")
    delivered = asyncio.Event()
    log: list[str] = []

    def on_progress(progress: Progress) -> None:
        if progress.confirmed == progress.total:
            delivered.set()

    runner = delivery(spool, ScriptedSender(log, fail_after=0), ScriptedSender(log),
                      on_progress=on_progress)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop, idle_s=30.0))
    await asyncio.wait_for(delivered.wait(), DELIVERY_TIMEOUT_S)
    stop.set()
    await asyncio.wait_for(task, DELIVERY_TIMEOUT_S)
    assert spool.jobs() == []


async def test_run_blocking_joins_its_thread_even_when_cancelled() -> None:
    release = threading.Event()
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def blocking() -> int:
        loop.call_soon_threadsafe(started.set)
        release.wait(30)
        return 7

    task = asyncio.create_task(run_blocking(blocking, "test-blocking"))
    await started.wait()
    task.cancel()
    loop.call_later(0.05, release.set)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not [t for t in threading.enumerate() if t.name == "test-blocking"]
    assert await run_blocking(lambda: 5, "test-blocking") == 5


# ---- against a real Orthanc ---------------------------------------------------------------------


def dimse(orthanc: Orthanc, called_ae: str | None = None) -> Destination:
    return Destination("dimse", host="127.0.0.1", port=orthanc.dicom_port,
                       called_ae=called_ae or orthanc.aet, calling_ae="MEDGE-TEST", timeout_s=10)


def stow(orthanc: Orthanc, tmp_path: Path, password: str | None = None) -> Destination:
    file = secret(tmp_path / "stow.password", password or orthanc.password)
    return Destination("stow", url=orthanc.dicomweb_url, username=orthanc.username,
                       password_file=Secret.read(file), timeout_s=10)


async def deliver_to(destination: Destination, paths: list[Path], spool_dir: Path,
                     **kwargs: object) -> SpoolJob:
    spool = Spool(spool_dir)
    [job] = spool.enqueue(paths, "pacs")
    runner = SpoolDelivery(spool, {"pacs": destination}, FAST_RETRY, **kwargs)  # type: ignore[arg-type]
    await asyncio.wait_for(runner.deliver(job), DELIVERY_TIMEOUT_S)
    return job


def test_orthanc_fixture_requires_auth(orthanc: Orthanc) -> None:
    assert orthanc.status("/statistics", auth=False) == 401
    assert orthanc.status("/statistics", auth=True) == 200
    assert {"dicom-web", "wsi"} <= set(orthanc.rest("/plugins"))


@pytest.mark.parametrize("protocol", ["dimse", "stow"])
async def test_series_lands_in_orthanc_and_resending_is_idempotent(
    orthanc: Orthanc, tmp_path: Path, protocol: str
) -> None:
    written = new_series(tmp_path / "slide", seed=11)
    destination = dimse(orthanc) if protocol == "dimse" else stow(orthanc, tmp_path)
    expected = {i.sop_instance_uid for i in written.instances}
    job = await deliver_to(destination, written.paths, tmp_path / "spool")
    assert not job.directory.exists()
    assert orthanc.instance_uids(written.series_instance_uid) == expected
    await deliver_to(destination, written.paths, tmp_path / "spool")
    assert orthanc.instance_uids(written.series_instance_uid) == expected


async def test_orthanc_wsi_plugin_reports_the_pyramid(orthanc: Orthanc, tmp_path: Path) -> None:
    # larger than the 600x300 label: Orthanc WSI 1.1 takes LABEL/OVERVIEW instances for levels
    # and fails on one as wide as the base level (docs/pacs.md)
    written = new_series(tmp_path / "slide", seed=12, size=(1500, 1000))
    await deliver_to(dimse(orthanc), written.paths, tmp_path / "spool")
    series_id = orthanc.series_id(written.series_instance_uid)
    pyramid_info = orthanc.rest(f"/wsi/pyramids/{series_id}")
    sizes = [tuple(size) for size in pyramid_info["Sizes"]]
    levels = [(1500, 1000), (750, 500), (375, 250), (188, 125)]
    assert [size for size in sizes if size in levels] == levels
    assert pyramid_info["TilesCount"][sizes.index((1500, 1000))] == [6, 4]
    assert (pyramid_info["TotalWidth"], pyramid_info["TotalHeight"]) == (1500, 1000)


async def test_wrong_called_ae_title_is_a_permanent_error_and_keeps_the_data(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    written = new_series(tmp_path / "slide", seed=13)
    with pytest.raises(PermanentPacsError, match="called AE title not recognised"):
        await deliver_to(dimse(orthanc, called_ae="NOT-THE-PACS"), written.paths,
                         tmp_path / "spool")
    [kept] = Spool(tmp_path / "spool").jobs()
    assert kept.state == "failed" and len(kept.pending) == len(written.paths)
    assert orthanc.instance_uids(written.series_instance_uid) == set()


async def test_wrong_stow_password_is_a_permanent_auth_error(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    written = new_series(tmp_path / "slide", seed=14)
    with pytest.raises(PermanentPacsError, match="authentication refused"):
        await deliver_to(stow(orthanc, tmp_path, password="wrong"), written.paths,
                         tmp_path / "spool")
    [kept] = Spool(tmp_path / "spool").jobs()
    assert kept.state == "failed"


@pytest.mark.parametrize("protocol", ["dimse", "stow"])
async def test_pacs_down_is_retried_and_delivered_when_it_returns(
    fresh_orthanc: Orthanc, tmp_path: Path, protocol: str
) -> None:
    written = new_series(tmp_path / "slide", seed=15)
    destination = dimse(fresh_orthanc) if protocol == "dimse" else stow(fresh_orthanc, tmp_path)
    fresh_orthanc.stop()
    failed_once = asyncio.Event()
    failures: list[str] = []

    def on_failure(job: SpoolJob, error: PacsError) -> None:
        failures.append(str(error))
        failed_once.set()

    sending = asyncio.create_task(
        deliver_to(destination, written.paths, tmp_path / "spool", on_failure=on_failure)
    )
    try:
        await asyncio.wait_for(failed_once.wait(), DELIVERY_TIMEOUT_S)
        fresh_orthanc.start()  # blocks the loop for a moment: the retry simply comes later
        await asyncio.wait_for(sending, DELIVERY_TIMEOUT_S)
    finally:
        if not sending.done():
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
    expected_error = "cannot associate" if protocol == "dimse" else "STOW-RS to"
    assert failures and all(expected_error in failure for failure in failures)
    assert fresh_orthanc.instance_uids(written.series_instance_uid) == {
        i.sop_instance_uid for i in written.instances
    }
    assert Spool(tmp_path / "spool").jobs() == []


async def test_transfer_syntax_the_pacs_refuses_is_a_permanent_error(tmp_path: Path) -> None:
    """A PACS that accepts only Explicit VR Little Endian refuses the JPEG context: permanent
    error, data kept; the lossless variant of a slide still goes through."""
    require_orthanc()
    pacs = Orthanc(tmp_path / "orthanc",
                   extra_config={"AcceptedTransferSyntaxes": ["1.2.840.10008.1.2.1"]})
    pacs.start()
    try:
        jpeg = new_series(tmp_path / "jpeg", seed=16)
        refused = r"refused SOP class .* with 1\.2\.840\.10008\.1\.2\.4\.50"
        with pytest.raises(PermanentPacsError, match=refused):
            await deliver_to(dimse(pacs), jpeg.paths, tmp_path / "spool")
        [kept] = Spool(tmp_path / "spool").jobs()
        assert kept.state == "failed" and len(kept.pending) == len(jpeg.paths)
        metadata = SlideMetadata(patient_id="P", accession_number="A", barcode="B")
        lossless = write_series(pyramid(synthetic_slide(300, 200), tile_size=128), metadata,
                                tmp_path / "raw", WriterOptions(compression="none"))
        await deliver_to(dimse(pacs), lossless.paths, tmp_path / "spool-raw")
        assert len(pacs.instance_uids(lossless.series_instance_uid)) == len(lossless.paths)
    finally:
        pacs.stop()


# ---- STOW-RS response handling against a scripted HTTP server -----------------------------------


@dataclass
class StowServer:
    """Answers each POST with the next scripted (status, body); records what it received."""

    responses: list[tuple[int, bytes]]
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0


@pytest.fixture
def stow_server() -> Iterator[StowServer]:
    script = StowServer([])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            script.requests.append((dict(self.headers), body))
            status, payload = script.responses.pop(0)
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            """Quiet."""

    server = HTTPServer(("127.0.0.1", 0), Handler)
    script.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="stow-test-server")
    thread.start()
    try:
        yield script
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def stow_result(referenced: list[str], failed: list[tuple[str, int]] | None = None) -> bytes:
    result: dict[str, object] = {
        "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]}}
                                             for uid in referenced]},
        "00081198": {"vr": "SQ"} if not failed else {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [code]}}
            for uid, code in failed]},
    }
    return json.dumps(result).encode()


@pytest.fixture
def instance(series: WrittenSeries) -> InstanceRef:
    first = series.instances[0]
    return InstanceRef(first.path, "1.2.840.10008.5.1.4.1.1.77.1.6", first.sop_instance_uid,
                       "1.2.840.10008.1.2.4.50")


def bearer_sender(port: int, tmp_path: Path) -> StowSender:
    token = Secret.read(secret(tmp_path / "token", "tok-123"))
    return StowSender("web", Destination("stow", url=f"http://127.0.0.1:{port}/dicom-web",
                                         token_file=token, timeout_s=10))


async def test_stow_sends_multipart_with_bearer_token(
    stow_server: StowServer, instance: InstanceRef, tmp_path: Path
) -> None:
    stow_server.responses.append((200, stow_result([instance.sop_instance_uid])))
    await bearer_sender(stow_server.port, tmp_path).store(instance)
    headers, body = stow_server.requests[0]
    assert headers["Authorization"] == "Bearer tok-123"
    assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    boundary = headers["Content-Type"].split("boundary=")[1]
    part = body.split(f"--{boundary}\r\n".encode())[1].split(b"\r\n\r\n", 1)[1]
    assert part[:-len(f"\r\n--{boundary}--\r\n")] == instance.path.read_bytes()


@pytest.mark.parametrize(
    ("status", "payload", "error", "message"),
    [
        (503, b"", TransientPacsError, "HTTP 503"),
        (401, b"", PermanentPacsError, "authentication refused"),
        (400, b"bad", PermanentPacsError, "HTTP 400"),
        (200, b"<html>", PermanentPacsError, "not JSON"),
        (200, stow_result([]), PermanentPacsError, "not confirmed"),
        (409, stow_result([], [("X", 0xC000)]), PermanentPacsError, "FailureReason 49152"),
        (202, stow_result([], [("X", 0xA700)]), TransientPacsError, "FailureReason 42752"),
    ],
)
async def test_stow_response_handling(
    stow_server: StowServer, instance: InstanceRef, tmp_path: Path,
    status: int, payload: bytes, error: type[PacsError], message: str,
) -> None:
    stow_server.responses.append((status, payload))
    with pytest.raises(error, match=message):
        await bearer_sender(stow_server.port, tmp_path).store(instance)
