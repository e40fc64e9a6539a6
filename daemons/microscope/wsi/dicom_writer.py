"""DICOM VL Whole Slide Microscopy Image writer: one TILED_FULL instance per pyramid level, plus
LABEL and OVERVIEW instances, all in one series (see docs/dicom-wsi.md).

Frames are encoded one at a time and spilled to a scratch file next to the output, so memory holds
one tile at a time whatever the slide size; the header is written once the compressed sizes (offset
table, compression ratio) are known, then the frames are copied after it. The attribute set is the
one that gives 0 errors in dciodvfy (dicom3tools) and opens in OpenSlide 4.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

import cv2
import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from daemons.microscope.wsi.model import PyramidLevel, RgbImage, SlideMetadata

VL_WSI_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.6")
"""SOP Class UID of VL Whole Slide Microscopy Image Storage."""

Compression = Literal["jpeg", "none"]

_PIXEL_DATA_TAG = (0x7FE0, 0x0010)
_ITEM_TAG = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER_TAG = (0xFFFE, 0xE0DD)
_MAX_ITEM_LENGTH = 0xFFFFFFFE
"""Largest even 32-bit length: beyond it the Basic Offset Table cannot address a frame."""


class DicomWriteError(Exception):
    """The slide could not be written; the message names the instance and the reason."""


@dataclass(frozen=True)
class Equipment:
    """Enhanced General Equipment module (all Type 1 in the WSI IOD)."""

    manufacturer: str = "medge"
    model_name: str = "medge slide scanner"
    device_serial_number: str = "unknown"
    software_versions: str = "medge"


@dataclass(frozen=True)
class WriterOptions:
    """How the series is encoded. ``compression="none"`` is the lossless research variant
    (Explicit VR Little Endian, native RGB)."""

    compression: Compression = "jpeg"
    jpeg_quality: int = 90
    equipment: Equipment = field(default_factory=Equipment)
    series_number: int = 1
    overview_max_side: int = 1024
    """Longest side of an OVERVIEW made from the pyramid when no macro photo is given."""

    def __post_init__(self) -> None:
        if self.compression not in ("jpeg", "none"):
            raise ValueError(f"compression must be 'jpeg' or 'none', got {self.compression!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class WrittenInstance:
    path: Path
    sop_instance_uid: str
    kind: str
    """``level-N``, ``label`` or ``overview``."""
    frames: int
    pixel_bytes: int
    """Bytes of (encoded) pixel data written."""


@dataclass(frozen=True)
class WrittenSeries:
    study_instance_uid: str
    series_instance_uid: str
    instances: tuple[WrittenInstance, ...]

    @property
    def paths(self) -> list[Path]:
        return [instance.path for instance in self.instances]


class _FrameCodec(Protocol):
    transfer_syntax: UID
    photometric: str
    encapsulated: bool

    def encode(self, tile: RgbImage) -> bytes: ...


class _JpegBaseline:
    """8-bit baseline JPEG with 4:2:2 chroma, hence YBR_FULL_422 (PS3.5 §8.2.1)."""

    transfer_syntax = JPEGBaseline8Bit
    photometric = "YBR_FULL_422"
    encapsulated = True

    def __init__(self, quality: int) -> None:
        self._params = [
            cv2.IMWRITE_JPEG_QUALITY, quality,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
        ]

    def encode(self, tile: RgbImage) -> bytes:
        ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(tile[:, :, ::-1]), self._params)
        if not ok:
            raise DicomWriteError("OpenCV failed to encode a JPEG frame")
        return bytes(encoded.tobytes())


class _NativeRgb:
    transfer_syntax = ExplicitVRLittleEndian
    photometric = "RGB"
    encapsulated = False

    def encode(self, tile: RgbImage) -> bytes:
        return bytes(np.ascontiguousarray(tile).tobytes())


def _codec(options: WriterOptions) -> _FrameCodec:
    return _JpegBaseline(options.jpeg_quality) if options.compression == "jpeg" else _NativeRgb()


def srgb_icc_profile() -> bytes:
    """The sRGB profile shipped with medge (made by LittleCMS via Pillow's ImageCms)."""
    return (resources.files("daemons.microscope.wsi") / "srgb.icc").read_bytes()


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


STAIN_CODES: dict[str, list[tuple[str, str]]] = {
    "HE": [("12710003", "hematoxylin stain"), ("36879007", "water soluble eosin stain")],
    "H": [("12710003", "hematoxylin stain")],
    "E": [("36879007", "water soluble eosin stain")],
}
"""SNOMED CT codes of the stains the scanner jobs use (TID 8004 "Using substance")."""


@dataclass(frozen=True)
class _SeriesIdentity:
    """UIDs and times shared by every instance of one slide, so the series is consistent and a
    re-write with the same metadata UIDs produces the same instance UIDs (idempotent re-send)."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    specimen_uid: str
    dimension_organization_uid: str
    when: dt.datetime

    @classmethod
    def for_slide(cls, metadata: SlideMetadata) -> _SeriesIdentity:
        study = metadata.study_instance_uid or generate_uid()
        series = metadata.series_instance_uid or generate_uid()
        return cls(
            study_uid=study,
            series_uid=series,
            frame_of_reference_uid=generate_uid(entropy_srcs=[series, "frame-of-reference"]),
            specimen_uid=generate_uid(entropy_srcs=[series, "specimen"]),
            dimension_organization_uid=generate_uid(entropy_srcs=[series, "dimensions"]),
            when=dt.datetime.now(dt.UTC),
        )

    def instance_uid(self, kind: str) -> str:
        return str(generate_uid(entropy_srcs=[self.series_uid, "instance", kind]))


def _common_dataset(
    metadata: SlideMetadata, ident: _SeriesIdentity, options: WriterOptions
) -> Dataset:
    """Patient, study, series, frame of reference, equipment, specimen, optical path, label."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = VL_WSI_STORAGE
    date = ident.when.strftime("%Y%m%d")
    time = ident.when.strftime("%H%M%S")
    ds.PatientName = metadata.patient_name
    ds.PatientID = metadata.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = ident.study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = metadata.accession_number[:16]
    ds.AccessionNumber = metadata.accession_number
    ds.StudyDescription = metadata.study_description
    ds.Modality = "SM"
    ds.SeriesInstanceUID = ident.series_uid
    ds.SeriesNumber = options.series_number
    ds.FrameOfReferenceUID = ident.frame_of_reference_uid
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    equipment = options.equipment
    ds.Manufacturer = equipment.manufacturer
    ds.ManufacturerModelName = equipment.model_name
    ds.DeviceSerialNumber = equipment.device_serial_number
    ds.SoftwareVersions = equipment.software_versions
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDateTime = ident.when.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionContextSequence = DicomSequence([])
    _add_specimen(ds, metadata, ident)
    _add_optical_path(ds, metadata)
    ds.BarcodeValue = metadata.barcode
    ds.LabelText = metadata.label_text or metadata.barcode
    return ds


def _add_specimen(ds: Dataset, metadata: SlideMetadata, ident: _SeriesIdentity) -> None:
    ds.ContainerIdentifier = metadata.container_id or metadata.barcode
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence([])
    ds.ContainerTypeCodeSequence = DicomSequence(
        [code_item("433466003", "SCT", "Microscope slide")]
    )
    specimen = Dataset()
    specimen_id = metadata.specimen_id or metadata.accession_number or metadata.barcode
    specimen.SpecimenIdentifier = specimen_id
    specimen.SpecimenUID = ident.specimen_uid
    specimen.IssuerOfTheSpecimenIdentifierSequence = DicomSequence([])
    steps = _staining_steps(specimen_id, metadata.stain)
    specimen.SpecimenPreparationSequence = DicomSequence(steps)
    ds.SpecimenDescriptionSequence = DicomSequence([specimen])


def _staining_steps(specimen_id: str, stain: str) -> list[Dataset]:
    """One TID 8001 preparation step of type "Staining" listing the stain substances."""
    substances = STAIN_CODES.get(stain.upper())
    if not substances:
        return []

    def content(value_type: str, concept: Dataset) -> Dataset:
        item = Dataset()
        item.ValueType = value_type
        item.ConceptNameCodeSequence = DicomSequence([concept])
        return item

    identifier = content("TEXT", code_item("121041", "DCM", "Specimen Identifier"))
    identifier.TextValue = specimen_id
    processing = content("CODE", code_item("111701", "DCM", "Processing type"))
    processing.ConceptCodeSequence = DicomSequence([code_item("127790008", "SCT", "Staining")])
    items = [identifier, processing]
    for code, meaning in substances:
        substance = content("CODE", code_item("424361007", "SCT", "Using substance"))
        substance.ConceptCodeSequence = DicomSequence([code_item(code, "SCT", meaning)])
        items.append(substance)
    step = Dataset()
    step.SpecimenPreparationStepContentItemSequence = DicomSequence(items)
    return [step]


def _add_optical_path(ds: Dataset, metadata: SlideMetadata) -> None:
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.IlluminationTypeCodeSequence = DicomSequence(
        [code_item("111744", "DCM", "Brightfield illumination")]
    )
    path.IlluminationColorCodeSequence = DicomSequence(
        [code_item("414298005", "SCT", "Full Spectrum")]
    )
    path.ICCProfile = srgb_icc_profile()
    path.ColorSpace = "SRGB"
    path.ObjectiveLensPower = metadata.objective_magnification
    path.ObjectiveLensNumericalAperture = metadata.numerical_aperture
    ds.NumberOfOpticalPaths = 1
    ds.OpticalPathSequence = DicomSequence([path])


@dataclass(frozen=True)
class _ImageGeometry:
    """What the Whole Slide Microscopy Image module needs about one instance's pixels."""

    width: int
    height: int
    tile_size_rows: int
    tile_size_columns: int
    pixel_spacing_mm: float
    image_type: tuple[str, str, str, str]

    @property
    def frames(self) -> int:
        return math.ceil(self.width / self.tile_size_columns) * math.ceil(
            self.height / self.tile_size_rows
        )


def _add_image(ds: Dataset, geometry: _ImageGeometry, codec: _FrameCodec,
               ident: _SeriesIdentity, base_extent_mm: tuple[float, float]) -> None:
    kind = geometry.image_type[2]
    ds.ImageType = list(geometry.image_type)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = codec.photometric
    ds.PlanarConfiguration = 0
    ds.Rows = geometry.tile_size_rows
    ds.Columns = geometry.tile_size_columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = geometry.frames
    ds.TotalPixelMatrixColumns = geometry.width
    ds.TotalPixelMatrixRows = geometry.height
    ds.TotalPixelMatrixFocalPlanes = 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 0.0
    origin.YOffsetInSlideCoordinateSystem = 0.0
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.ImagedVolumeWidth = _ds_value(base_extent_mm[0])
    ds.ImagedVolumeHeight = _ds_value(base_extent_mm[1])
    ds.ImagedVolumeDepth = 1.0
    ds.VolumetricProperties = "VOLUME"
    ds.SpecimenLabelInImage = "YES" if kind in ("LABEL", "OVERVIEW") else "NO"
    ds.BurnedInAnnotation = "YES" if kind == "LABEL" else "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.DimensionOrganizationType = "TILED_FULL"
    organization = Dataset()
    organization.DimensionOrganizationUID = ident.dimension_organization_uid
    ds.DimensionOrganizationSequence = DicomSequence([organization])
    measures = Dataset()
    spacing = _ds_value(geometry.pixel_spacing_mm)
    measures.PixelSpacing = [spacing, spacing]
    measures.SliceThickness = 0.001
    frame_type = Dataset()
    frame_type.FrameType = list(geometry.image_type)
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = DicomSequence([frame_type])
    shared.OpticalPathIdentificationSequence = DicomSequence([optical])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])


def _ds_value(value: float) -> float:
    """Round to what fits a 16-character DS without losing meaningful precision."""
    return float(f"{value:.10g}")


class _FrameSpill:
    """Encoded frames appended to a scratch file; remembers their lengths (padded even)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lengths: list[int] = []
        self._file: BinaryIO = open(path, "w+b")  # noqa: SIM115 - closed by close()

    def add(self, frame: bytes) -> None:
        if len(frame) % 2:
            frame += b"\x00"
        if len(frame) > _MAX_ITEM_LENGTH:
            raise DicomWriteError(f"one encoded frame is {len(frame)} bytes, too large")
        self._file.write(frame)
        self.lengths.append(len(frame))

    def copy_to(self, out: BinaryIO, *, as_items: bool) -> None:
        self._file.flush()
        self._file.seek(0)
        if not as_items:
            shutil.copyfileobj(self._file, out, 1 << 20)
            return
        for length in self.lengths:
            out.write(struct.pack("<HHI", *_ITEM_TAG, length))
            out.write(self._file.read(length))

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _write_instance(ds: Dataset, frames: Iterable[RgbImage], codec: _FrameCodec,
                    path: Path, kind: str, raw_frame_bytes: int) -> WrittenInstance:
    """Encode frames to a spill file, then write header + pixel data to ``path`` atomically."""
    partial = path.with_name(path.name + ".partial")
    spill = _FrameSpill(path.with_name(path.name + ".frames"))
    try:
        for frame in frames:
            spill.add(codec.encode(frame))
        if len(spill.lengths) != ds.NumberOfFrames:
            raise DicomWriteError(
                f"{path.name}: level yielded {len(spill.lengths)} tiles,"
                f" expected {ds.NumberOfFrames} for a TILED_FULL grid"
            )
        pixel_bytes = sum(spill.lengths)
        if codec.encapsulated:
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = _ds_value(round(raw_frame_bytes / pixel_bytes, 2))
            ds.LossyImageCompressionMethod = "ISO_10918_1"
            offsets = _offsets(spill.lengths)
            use_extended = offsets[-1] + spill.lengths[-1] + 8 * len(offsets) > _MAX_ITEM_LENGTH
            if use_extended:
                ds.ExtendedOffsetTable = struct.pack(f"<{len(offsets)}Q", *offsets)
                ds.ExtendedOffsetTableLengths = struct.pack(
                    f"<{len(offsets)}Q", *spill.lengths
                )
        else:
            ds.LossyImageCompression = "00"
            if pixel_bytes > _MAX_ITEM_LENGTH:
                raise DicomWriteError(
                    f"{path.name}: {pixel_bytes} bytes of native pixel data exceed the 4 GiB"
                    " limit of one uncompressed instance; use more pyramid levels or JPEG"
                )
        ds.file_meta = _file_meta(ds, codec.transfer_syntax)
        with open(partial, "wb") as out:
            dcmwrite(out, ds, enforce_file_format=True)
            if codec.encapsulated:
                out.write(struct.pack("<HH2sHI", *_PIXEL_DATA_TAG, b"OB", 0, 0xFFFFFFFF))
                table = b"" if use_extended else struct.pack(f"<{len(offsets)}I", *offsets)
                out.write(struct.pack("<HHI", *_ITEM_TAG, len(table)) + table)
                spill.copy_to(out, as_items=True)
                out.write(struct.pack("<HHI", *_SEQUENCE_DELIMITER_TAG, 0))
            else:
                out.write(struct.pack("<HH2sHI", *_PIXEL_DATA_TAG, b"OB", 0, pixel_bytes))
                spill.copy_to(out, as_items=False)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except OSError as exc:
        raise DicomWriteError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        spill.close()
        partial.unlink(missing_ok=True)
    return WrittenInstance(path, str(ds.SOPInstanceUID), kind, len(spill.lengths), pixel_bytes)


def _offsets(lengths: Sequence[int]) -> list[int]:
    """Offsets of each frame item from the first one (8-byte item header included)."""
    offsets, position = [], 0
    for length in lengths:
        offsets.append(position)
        position += 8 + length
    return offsets


def _file_meta(ds: Dataset, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def thumbnail_size(level: PyramidLevel, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(level.width, level.height))
    return max(1, round(level.width * scale)), max(1, round(level.height * scale))


def thumbnail(level: PyramidLevel, max_side: int) -> RgbImage:
    """A downscaled copy of a level, built tile by tile so the level is never held whole."""
    scale = min(1.0, max_side / max(level.width, level.height))
    out_w, out_h = thumbnail_size(level, max_side)
    canvas = np.full((out_h, out_w, 3), 255, dtype=np.uint8)
    columns = math.ceil(level.width / level.tile_size)
    size = level.tile_size
    for index, tile in enumerate(level.tiles()):
        row, col = divmod(index, columns)
        x0, y0 = col * size, row * size
        x1, y1 = min(x0 + size, level.width), min(y0 + size, level.height)
        tx0, ty0 = round(x0 * scale), round(y0 * scale)
        tx1, ty1 = max(tx0 + 1, round(x1 * scale)), max(ty0 + 1, round(y1 * scale))
        tx1, ty1 = min(tx1, out_w), min(ty1, out_h)
        if tx1 <= tx0 or ty1 <= ty0:
            continue
        canvas[ty0:ty1, tx0:tx1] = cv2.resize(
            tile[: y1 - y0, : x1 - x0], (tx1 - tx0, ty1 - ty0), interpolation=cv2.INTER_AREA
        )
    return canvas


def render_label(metadata: SlideMetadata, size: tuple[int, int] = (300, 600)) -> RgbImage:
    """A label picture with the label text and barcode, for scanners without a label camera."""
    image = np.full((size[0], size[1], 3), 255, dtype=np.uint8)
    lines = [line for line in (metadata.label_text or "").splitlines() if line]
    lines.append(metadata.barcode)
    for number, line in enumerate(lines[:6]):
        cv2.putText(image, line.encode("ascii", "replace").decode(), (20, 60 + 45 * number),
                    cv2.FONT_HERSHEY_SIMPLEX, 1.2, (0, 0, 0), 2, cv2.LINE_AA)
    return image


def _check_levels(levels: Sequence[PyramidLevel]) -> None:
    if not levels:
        raise DicomWriteError("no pyramid levels to write")
    for number, level in enumerate(levels):
        where = f"level {number}"
        if level.width < 1 or level.height < 1:
            raise DicomWriteError(f"{where}: empty size {level.width}x{level.height}")
        if level.tile_size < 16 or level.tile_size % 2:
            raise DicomWriteError(f"{where}: tile size {level.tile_size} must be even and >= 16")
        if not (math.isfinite(level.pixel_spacing_um) and level.pixel_spacing_um > 0):
            raise DicomWriteError(f"{where}: pixel spacing {level.pixel_spacing_um} µm is invalid")


def _checked_tiles(level: PyramidLevel, where: str) -> Iterator[RgbImage]:
    shape = (level.tile_size, level.tile_size, 3)
    for tile in level.tiles():
        if tile.shape != shape or tile.dtype != np.uint8:
            raise DicomWriteError(
                f"{where}: tile of shape {tile.shape} {tile.dtype}, expected {shape} uint8"
            )
        yield tile


def write_series(
    levels: Sequence[PyramidLevel],
    metadata: SlideMetadata,
    out_dir: Path,
    options: WriterOptions | None = None,
    *,
    label_image: RgbImage | None = None,
    overview_image: RgbImage | None = None,
) -> WrittenSeries:
    """Write the pyramid (largest level first) as one DICOM WSI series into ``out_dir``.

    ``label_image``/``overview_image``: photos from the scanner's label/macro camera; when absent
    the label is rendered from the metadata and the overview is a thumbnail of the smallest level.
    """
    options = options or WriterOptions()
    _check_levels(levels)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DicomWriteError(f"{out_dir}: cannot create output directory: {exc}") from exc
    codec = _codec(options)
    ident = _SeriesIdentity.for_slide(metadata)
    base = levels[0]
    base_spacing_mm = base.pixel_spacing_um / 1000.0
    extent_mm = (base.width * base_spacing_mm, base.height * base_spacing_mm)
    written: list[WrittenInstance] = []

    def write(kind: str, geometry: _ImageGeometry, frames: Iterable[RgbImage]) -> None:
        ds = _common_dataset(metadata, ident, options)
        ds.SOPInstanceUID = ident.instance_uid(kind)
        ds.InstanceNumber = len(written) + 1
        _add_image(ds, geometry, codec, ident, extent_mm)
        raw = geometry.frames * geometry.tile_size_rows * geometry.tile_size_columns * 3
        written.append(_write_instance(ds, frames, codec, out_dir / f"{kind}.dcm", kind, raw))

    for number, level in enumerate(levels):
        image_type = (
            ("ORIGINAL", "PRIMARY", "VOLUME", "NONE") if number == 0
            else ("DERIVED", "PRIMARY", "VOLUME", "RESAMPLED")
        )
        geometry = _ImageGeometry(level.width, level.height, level.tile_size, level.tile_size,
                                  level.pixel_spacing_um / 1000.0, image_type)
        write(f"level-{number}", geometry, _checked_tiles(level, f"level {number}"))

    label = label_image if label_image is not None else render_label(metadata)
    overview = (
        overview_image if overview_image is not None
        else thumbnail(_overview_source(levels, options.overview_max_side),
                       options.overview_max_side)
    )
    overview_spacing_mm = extent_mm[0] / overview.shape[1]
    label_spacing_mm = 0.1
    for kind, image, spacing in (
        ("label", label, label_spacing_mm), ("overview", overview, overview_spacing_mm)
    ):
        frame = _pad_for_single_frame(image, {level.width for level in levels})
        rows, columns = frame.shape[:2]
        geometry = _ImageGeometry(columns, rows, rows, columns, spacing,
                                  ("ORIGINAL", "PRIMARY", kind.upper(), "NONE"))
        write(kind, geometry, iter([frame]))
    return WrittenSeries(ident.study_uid, ident.series_uid, tuple(written))


def _overview_source(levels: Sequence[PyramidLevel], max_side: int) -> PyramidLevel:
    """The smallest level still at least ``max_side`` on its long side (the least to read)."""
    for level in reversed(levels):
        if max(level.width, level.height) >= max_side:
            return level
    return levels[0]


def _pad_for_single_frame(image: RgbImage, level_widths: set[int]) -> RgbImage:
    """Pad a LABEL/OVERVIEW picture with white so that its sides are even (the frame is the
    whole image: OpenSlide wants frame = total pixel matrix, native RGB wants an even length)
    and its width differs from every level's (Orthanc's WSI plugin 1.1 groups instances into
    levels by width and fails on a label as wide as a level)."""
    rows, columns = image.shape[0] + image.shape[0] % 2, image.shape[1] + image.shape[1] % 2
    while columns in level_widths:
        columns += 2
    if (rows, columns) == image.shape[:2]:
        return image
    frame = np.full((rows, columns, 3), 255, dtype=np.uint8)
    frame[: image.shape[0], : image.shape[1]] = image
    return frame
