"""A recording as a DICOM Ultrasound Multi-frame Image (cine loop), and its way to the PACS.

One instance per recording: SOP class Ultrasound Multi-frame Image Storage, JPEG baseline
frames (the JPEGs the capture loop already encoded are encapsulated as they are, never
re-encoded), MONOCHROME2 (B-mode is grayscale; a JPEG of one component decodes to it).

Frame timing: the capture timestamps are irregular (a grabber can skip a frame), so the Cine
module carries a **Frame Time Vector** (0018,1065) — the first value 0, then the milliseconds
since the previous frame — named by the Frame Increment Pointer (Frame Time (0018,1063) is then
not allowed), plus the Cine Rate (mean frames per second) for viewers that only read that.

Per-frame probe pose and contact force: no standard US attribute holds a robot-held probe's
pose per frame (the Enhanced US Volume's transducer position sequences belong to another IOD,
and the US Region Calibration module describes pixel spacing, not pose), so they go into a
private sequence, documented in docs/ultrasound.md:

* private creator ``MEDGE US PROBE 1`` in group 0x0071 (block 0x10 → elements 0x0071,10xx);
* (0071,1001) SQ **Probe Pose Sequence**, one item per frame, in frame order, each with
  (0071,1002) FD tip position x\\y\\z in mm, robot base frame (the frame the registered patient
  surface is given in); (0071,1003) FD tilt a\\tilt b in degrees (probe axis
  = Rx(a)·Ry(b)·(0,0,-1)); (0071,1004) FD contact force in N (NaN when the sensor had no
  reading); (0071,1005) FD capture time in ms from the first frame.

The pixel spacing is also given in a standard US Region Calibration region (physical units cm),
so measurements work in any viewer.
"""

from __future__ import annotations

import datetime
import itertools
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from daemons.microscope.wsi.dicom_validate import Finding, run_dciodvfy

US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
PRIVATE_GROUP = 0x0071
PRIVATE_CREATOR = "MEDGE US PROBE 1"
POSE_SEQUENCE, TIP_MM, TILT_DEG, FORCE_N, TIME_MS = 0x01, 0x02, 0x03, 0x04, 0x05
FRAME_TIME_VECTOR_TAG = 0x00181065
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's prefix for generated UIDs
MAX_FRAMES = 10_000
ITEM_HEADER = 8
"""An item's tag and length, before its bytes."""


class UsDicomError(ValueError):
    """A recording cannot become a valid instance (names what is wrong)."""


@dataclass(frozen=True)
class Exam:
    """Patient and study of the exam (pseudonymous IDs are fine)."""

    patient_id: str
    accession_number: str
    patient_name: str = ""
    study_description: str = "Robotic ultrasound"
    study_instance_uid: str | None = None
    """Set it to put several recordings into one study; generated otherwise."""
    series_description: str = ""


@dataclass(frozen=True)
class FrameRecord:
    """What is known about one frame besides its pixels."""

    captured_at: float
    """Seconds, monotonic clock of the capture."""
    tip_m: tuple[float, float, float]
    tilt_rad: tuple[float, float]
    force_n: float | None


@dataclass(frozen=True)
class ImageGeometry:
    rows: int
    columns: int
    pixel_spacing_mm: float
    """Square pixels of the image area: imaging depth / rows."""


def frame_time_vector_ms(records: Sequence[FrameRecord]) -> list[float]:
    """0, then ms since the previous frame (PS3.3 C.7.6.5.1.2)."""
    return [0.0] + [round((b.captured_at - a.captured_at) * 1000.0, 3)
                    for a, b in itertools.pairwise(records)]


def build_dataset(exam: Exam, jpeg_frames: Sequence[bytes], records: Sequence[FrameRecord],
                  geometry: ImageGeometry, *, when: datetime.datetime | None = None,
                  series_number: int = 1) -> Dataset:
    """The US multi-frame instance (with its file meta), ready for ``save_as``."""
    ds = _without_pixels(exam, jpeg_frames, records, geometry, when, series_number)
    ds.PixelData = encapsulate(list(jpeg_frames))
    ds["PixelData"].VR = "OB"
    return ds


def write_cine(exam: Exam, jpeg_frames: Sequence[bytes], records: Sequence[FrameRecord],
               geometry: ImageGeometry, directory: Path, *,
               when: datetime.datetime | None = None, series_number: int = 1) -> Path:
    """The instance of :func:`build_dataset`, written atomically with its frames streamed into
    the file one by one. The daemon writes this way: a single copy of the whole cine (``b''.join``
    in ``encapsulate``, then in ``save_as``) holds the GIL, and the control loop with it, for
    130-160 ms per 100 s of 800x600 frames — past the servos' 0.1 s bus watchdog."""
    ds = _without_pixels(exam, jpeg_frames, records, geometry, when, series_number)
    return _write_atomically(ds, directory, lambda file: _append_pixel_data(file, jpeg_frames))


def _append_pixel_data(file: BinaryIO, frames: Sequence[bytes]) -> None:
    """(7FE0,0010) OB of undefined length, encapsulated (PS3.5 A.4): the Basic Offset Table,
    one item per frame (padded to an even length), the sequence delimiter. It is the last
    element of the data set, so it goes after everything ``save_as`` wrote."""
    lengths = [len(frame) + len(frame) % 2 for frame in frames]
    offsets = itertools.accumulate((ITEM_HEADER + n for n in lengths[:-1]), initial=0)
    file.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
    file.write(struct.pack(f"<HHI{len(frames)}I", 0xFFFE, 0xE000, 4 * len(frames), *offsets))
    for frame, length in zip(frames, lengths, strict=True):
        file.write(struct.pack("<HHI", 0xFFFE, 0xE000, length))
        file.write(frame)
        if length != len(frame):
            file.write(b"\0")
    file.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


def _without_pixels(exam: Exam, jpeg_frames: Sequence[bytes], records: Sequence[FrameRecord],
                    geometry: ImageGeometry, when: datetime.datetime | None,
                    series_number: int) -> Dataset:
    if not jpeg_frames:
        raise UsDicomError("recording has no frames")
    if len(jpeg_frames) != len(records):
        raise UsDicomError(f"{len(jpeg_frames)} frames but {len(records)} frame records")
    if len(jpeg_frames) > MAX_FRAMES:
        raise UsDicomError(f"{len(jpeg_frames)} frames exceed the limit of {MAX_FRAMES}")
    times = frame_time_vector_ms(records)
    if any(t < 0 for t in times):
        raise UsDicomError("frame capture times go backwards")
    when = when or datetime.datetime.now(datetime.UTC)
    date, time_of_day = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = US_MULTIFRAME_STORAGE
    ds.SOPInstanceUID = generate_uid(UID_PREFIX)
    ds.PatientName = exam.patient_name
    ds.PatientID = exam.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = exam.study_instance_uid or generate_uid(UID_PREFIX)
    ds.StudyDate, ds.StudyTime = date, time_of_day
    ds.ReferringPhysicianName = ""
    ds.StudyID = exam.accession_number[:16]
    ds.AccessionNumber = exam.accession_number
    ds.StudyDescription = exam.study_description
    ds.Modality = "US"
    ds.SeriesInstanceUID = generate_uid(UID_PREFIX)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = exam.series_description
    ds.Laterality = ""  # Type 2C: an abdominal exam of no paired body part
    ds.Manufacturer = "medge"
    ds.ManufacturerModelName = "medge robotic ultrasound"
    ds.SoftwareVersions = "medge"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time_of_day
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    raw = geometry.rows * geometry.columns * len(jpeg_frames)
    ds.LossyImageCompressionRatio = round(raw / sum(len(f) for f in jpeg_frames), 2)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = geometry.rows, geometry.columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = len(jpeg_frames)
    ds.FrameIncrementPointer = FRAME_TIME_VECTOR_TAG
    ds.FrameTimeVector = times
    duration_ms = sum(times)
    mean_ms = duration_ms / (len(times) - 1) if len(times) > 1 else 0.0
    ds.CineRate = round(1000.0 / mean_ms) if mean_ms > 0 else 0
    ds.ActualFrameDuration = round(mean_ms)
    ds.SequenceOfUltrasoundRegions = DicomSequence([_region(geometry)])
    _add_pose_sequence(ds, records)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta = meta
    return ds


def _region(geometry: ImageGeometry) -> Dataset:
    """One B-mode tissue region over the whole image (US Region Calibration module)."""
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1 = geometry.columns - 1
    region.RegionLocationMaxY1 = geometry.rows - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = geometry.pixel_spacing_mm / 10.0
    return region


def _add_pose_sequence(ds: Dataset, records: Sequence[FrameRecord]) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    start = records[0].captured_at
    items = []
    for record in records:
        item = Dataset()
        item_block = item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        item_block.add_new(TIP_MM, "FD", [round(c * 1000.0, 4) for c in record.tip_m])
        item_block.add_new(TILT_DEG, "FD", [round(math.degrees(a), 6) for a in record.tilt_rad])
        item_block.add_new(FORCE_N, "FD", math.nan if record.force_n is None
                           else round(record.force_n, 4))
        item_block.add_new(TIME_MS, "FD", round((record.captured_at - start) * 1000.0, 3))
        items.append(item)
    block.add_new(POSE_SEQUENCE, "SQ", DicomSequence(items))


def read_pose_sequence(ds: Dataset) -> list[FrameRecord]:
    """The per-frame records back from an instance (``captured_at`` relative to frame 1)."""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    records = []
    for item in block[POSE_SEQUENCE].value:
        item_block = item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        tip = [float(v) / 1000.0 for v in item_block[TIP_MM].value]
        tilt = [math.radians(float(v)) for v in item_block[TILT_DEG].value]
        force = float(item_block[FORCE_N].value)
        records.append(FrameRecord(float(item_block[TIME_MS].value) / 1000.0,
                                   (tip[0], tip[1], tip[2]), (tilt[0], tilt[1]),
                                   None if math.isnan(force) else force))
    return records


def write_instance(ds: Dataset, directory: Path) -> Path:
    """Write atomically as ``{SOPInstanceUID}.dcm`` (a half-written file is never spooled)."""
    return _write_atomically(ds, directory, None)


def _write_atomically(ds: Dataset, directory: Path,
                      append: Callable[[BinaryIO], None] | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    partial = path.with_name(path.name + ".partial")
    ds.save_as(partial, enforce_file_format=True)
    if append is not None:
        with partial.open("ab") as file:
            append(file)
    partial.replace(path)
    return path


def validate(path: Path) -> list[Finding]:
    """dciodvfy's errors for one instance (warnings dropped); raises ValidatorMissing."""
    return [finding for finding in run_dciodvfy(path) if finding.fatal]


def load(path: Path) -> Dataset:
    return pydicom.dcmread(path)
