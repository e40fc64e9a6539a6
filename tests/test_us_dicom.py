"""DICOM Ultrasound Multi-frame: dciodvfy 0 errors, frame times, the private pose sequence, bad
input refused by name, and delivery through the durable spool to a real Orthanc."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemons.manipulator import us_dicom
from daemons.manipulator.ultrasound import (
    DELIVERED,
    UltrasoundSection,
    mark_delivered,
    remove_delivered,
)
from daemons.manipulator.us_dicom import Exam, FrameRecord, ImageGeometry, UsDicomError
from firmware_sim.ultrasound import ImageGeometry as SimGeometry
from firmware_sim.ultrasound import Phantom, render_bmode
from medge.config import Secret
from medge.localbroker import Mosquitto
from medge.pacs.config import Destination, RetryPolicy
from medge.pacs.delivery import Progress, SpoolDelivery
from medge.pacs.spool import Spool
from tests.fixtures.orthanc import Orthanc
from tests.teleop_rig import rig, wait_for

ROWS, COLUMNS = 120, 160
EXAM = Exam("PSEUDO-7", "ACC-42", "Doe^Jane")


def sweep_recording(frames: int = 6) -> tuple[list[bytes], list[FrameRecord], list[np.ndarray]]:
    """Frames of the phantom along x, irregular capture times (one skipped slot)."""
    images, jpegs, records = [], [], []
    at = 100.0
    for index in range(frames):
        tip = (-0.01 + index * 0.004, 0.001, -0.2235)
        image = render_bmode(Phantom(), SimGeometry(COLUMNS, ROWS), tip, (0.0, 0.0, -1.0), 4.0)
        images.append(image)
        jpegs.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
        records.append(FrameRecord(at, tip, (0.0, 0.05 * index), 4.0 + index if index else None))
        at += 2 / 30 if index == 2 else 1 / 30
    return jpegs, records, images


def write(tmp_path: Path) -> tuple[Path, list[FrameRecord], list[np.ndarray]]:
    jpegs, records, images = sweep_recording()
    ds = us_dicom.build_dataset(EXAM, jpegs, records, ImageGeometry(ROWS, COLUMNS, 0.5))
    return us_dicom.write_instance(ds, tmp_path / "out"), records, images


def test_streamed_cine_is_the_same_instance(tmp_path: Path) -> None:
    """``write_cine`` (frames streamed into the file: what the daemon writes) gives the same
    encapsulated pixel data as ``build_dataset`` + ``write_instance``, odd-length frame too."""
    jpegs, records, _ = sweep_recording()
    jpegs[1] += b"" if len(jpegs[1]) % 2 else b"\0"  # after the EOI marker: still a JPEG
    geometry = ImageGeometry(ROWS, COLUMNS, 0.5)
    built = us_dicom.write_instance(us_dicom.build_dataset(EXAM, jpegs, records, geometry),
                                    tmp_path / "built")
    streamed = us_dicom.write_cine(EXAM, jpegs, records, geometry, tmp_path / "streamed")
    assert us_dicom.validate(streamed) == []
    a, b = us_dicom.load(built), us_dicom.load(streamed)
    assert a.PixelData == b.PixelData and np.array_equal(a.pixel_array, b.pixel_array)
    assert us_dicom.read_pose_sequence(b) == us_dicom.read_pose_sequence(a)
    assert not list(streamed.parent.glob("*.partial"))


def test_instance_is_valid_for_dciodvfy(tmp_path: Path) -> None:
    path, _, _ = write(tmp_path)
    assert us_dicom.validate(path) == []


def test_frame_times_pose_and_pixels_round_trip(tmp_path: Path) -> None:
    path, records, images = write(tmp_path)
    ds = us_dicom.load(path)
    assert ds.SOPClassUID == us_dicom.US_MULTIFRAME_STORAGE and ds.Modality == "US"
    assert (ds.PatientID, ds.AccessionNumber, str(ds.PatientName)) == \
        ("PSEUDO-7", "ACC-42", "Doe^Jane")
    assert int(ds.NumberOfFrames) == len(records)
    assert ds.FrameIncrementPointer == us_dicom.FRAME_TIME_VECTOR_TAG
    expected = [0.0] + [(b.captured_at - a.captured_at) * 1000 for a, b in
                        itertools.pairwise(records)]
    assert [float(v) for v in ds.FrameTimeVector] == pytest.approx(expected, abs=0.01)
    assert float(ds.FrameTimeVector[3]) == pytest.approx(2000 / 30, abs=0.01)  # skipped slot
    back = us_dicom.read_pose_sequence(ds)
    assert len(back) == len(records)
    for original, read in zip(records, back, strict=True):
        assert read.tip_m == pytest.approx(original.tip_m, abs=1e-6)
        assert read.tilt_rad == pytest.approx(original.tilt_rad, abs=1e-6)
        assert read.captured_at == pytest.approx(original.captured_at - records[0].captured_at,
                                                 abs=1e-5)
    assert back[0].force_n is None and back[1].force_n == pytest.approx(5.0)
    pixels = ds.pixel_array
    assert pixels.shape == (len(images), ROWS, COLUMNS)
    for decoded, original in zip(pixels, images, strict=True):
        assert np.abs(decoded.astype(int) - original).mean() < 4  # JPEG q95 error
    region = ds.SequenceOfUltrasoundRegions[0]
    assert float(region.PhysicalDeltaX) == pytest.approx(0.05)  # cm per pixel


@pytest.mark.parametrize(("jpegs", "records", "message"), [
    ([], [], "no frames"),
    ([b"x"], [], "1 frames but 0"),
    ([b"x", b"y"], [FrameRecord(2.0, (0, 0, 0), (0, 0), 1.0),
                    FrameRecord(1.0, (0, 0, 0), (0, 0), 1.0)], "backwards"),
])
def test_bad_recordings_are_refused_by_name(
        jpegs: list[bytes], records: list[FrameRecord], message: str) -> None:
    with pytest.raises(UsDicomError, match=message):
        us_dicom.build_dataset(EXAM, jpegs, records, ImageGeometry(ROWS, COLUMNS, 0.5))


def test_nan_force_never_reaches_a_number(tmp_path: Path) -> None:
    path, _, _ = write(tmp_path)
    forces = [r.force_n for r in us_dicom.read_pose_sequence(us_dicom.load(path))]
    assert forces[0] is None and all(f is not None and math.isfinite(f) for f in forces[1:])


@pytest.mark.parametrize("protocol", ["dimse", "stow"])
async def test_recording_reaches_orthanc_through_the_spool(
        orthanc: Orthanc, tmp_path: Path, protocol: str) -> None:
    path, _, _ = write(tmp_path)
    ds = us_dicom.load(path)
    if protocol == "dimse":
        destination = Destination("dimse", host="127.0.0.1", port=orthanc.dicom_port,
                                  called_ae=orthanc.aet, calling_ae="MEDGE-US", timeout_s=10)
    else:
        password = tmp_path / "stow.password"
        password.write_text(orthanc.password + "\n")
        password.chmod(0o600)
        destination = Destination("stow", url=orthanc.dicomweb_url, username=orthanc.username,
                                  password_file=Secret.read(password), timeout_s=10)
    spool = Spool(tmp_path / "spool")
    [job] = spool.enqueue([path], "pacs")
    delivery = SpoolDelivery(spool, {"pacs": destination}, RetryPolicy(initial_s=0.05))
    await asyncio.wait_for(delivery.deliver(job), 60)
    assert orthanc.instance_uids(str(ds.SeriesInstanceUID)) == {str(ds.SOPInstanceUID)}
    assert spool.jobs() == []


async def test_daemon_recording_is_delivered_to_orthanc_through_its_spool(
        broker: Mosquitto, orthanc: Orthanc, tmp_path: Path) -> None:
    """``[manipulator.ultrasound] pacs_file``: record on the simulated robot, stop, and the
    daemon's own spool delivers the instance (C-STORE)."""
    pacs = tmp_path / "pacs.toml"
    pacs.write_text(f'spool_dir = "spool"\n[retry]\ninitial_s = 0.05\n'
                    f'[destinations.pacs]\nprotocol = "dimse"\nhost = "127.0.0.1"\n'
                    f'port = {orthanc.dicom_port}\ncalled_ae = "{orthanc.aet}"\n'
                    f'calling_ae = "MEDGE-US"\ntimeout_s = 10.0\n')
    section = UltrasoundSection(resolution=(160, 120), live_rate_hz=0.0, pacs_file=pacs,
                                pacs_destination="pacs", patient_id="PSEUDO-9")
    async with rig(broker.port, tmp_path / "state", ultrasound=section) as r:
        svc = r.daemon.ultrasound
        assert svc is not None
        svc.start_recording("manual")
        recording = svc.recording
        assert recording is not None
        await wait_for(lambda: len(recording.frames) >= 5)
        path = await svc.stop_recording()
        ds = us_dicom.load(path)
        await wait_for(lambda: orthanc.instance_uids(str(ds.SeriesInstanceUID))
                       == {str(ds.SOPInstanceUID)}, 60)
        await wait_for(lambda: not list((tmp_path / "spool").iterdir()), 30)
    assert ds.PatientID == "PSEUDO-9"
    assert not path.exists() and (path.parent / DELIVERED / path.name).exists()


def test_delivered_recordings_go_after_their_keep_time_and_undelivered_ones_stay(
        tmp_path: Path) -> None:
    """Nothing removed recordings the PACS held: the box's disk filled and recording stopped."""
    for name in ("a.dcm", "b.dcm", "c.dcm"):
        (tmp_path / name).write_bytes(b"DICM")
    mark_delivered(tmp_path, Progress("job-a", "pacs", 1, 1, "a.dcm"))
    mark_delivered(tmp_path, Progress("job-b", "pacs", 1, 1, "b.dcm"))
    mark_delivered(tmp_path, Progress("job-c", "pacs", 0, 1, "c.dcm"))  # not yet confirmed
    mark_delivered(tmp_path, Progress("job-a", "pacs", 1, 1, "a.dcm"))  # again: no harm
    delivered = tmp_path / DELIVERED
    assert sorted(p.name for p in delivered.iterdir()) == ["a.dcm", "b.dcm"]
    os.utime(delivered / "a.dcm", (1000.0, 1000.0))  # confirmed long ago
    assert remove_delivered(tmp_path, delivered_before=2000.0) == [delivered / "a.dcm"]
    assert sorted(p.name for p in delivered.iterdir()) == ["b.dcm"]
    assert (tmp_path / "c.dcm").exists()
