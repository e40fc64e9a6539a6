"""Validation of a written DICOM WSI series, used by ``medge wsi validate`` and the test suite.

dciodvfy (per instance) and dcentvfy (across the series) from dicom3tools check the IOD; they do
not check what a reader needs, so OpenSlide 4 must open the series with the expected levels,
mpp and associated images, and every frame must decode to a tile of the declared size with the
chroma subsampling its PhotometricInterpretation promises (docs/dicom-wsi.md §Validation).
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError

from daemons.microscope.wsi.dicom_writer import VL_WSI_STORAGE

DCIODVFY = "dciodvfy"
DCENTVFY = "dcentvfy"
TOOL_TIMEOUT_S = 120.0
IMAGE_TYPE_VALUE3 = {"VOLUME": {"NONE", "RESAMPLED"}, "LABEL": {"NONE"}, "OVERVIEW": {"NONE"}}
"""Allowed ImageType value 4 for each value 3; dciodvfy accepts any value 3 (reference §5)."""
JPEG_SAMPLING = {"YBR_FULL_422": (2, 1), "YBR_FULL": (1, 1)}
"""Luma (H, V) sampling factors matching each photometric interpretation of baseline JPEG."""


class ValidatorMissing(RuntimeError):
    """A validator (dicom3tools, OpenSlide 4) is not installed: run ``make setup``."""


@dataclass(frozen=True)
class Finding:
    file: str
    check: str
    """``dciodvfy``, ``dcentvfy``, ``openslide``, ``image-type``, ``frames``, ``pyramid``,
    ``read``."""
    message: str
    fatal: bool = True


@dataclass
class ValidationReport:
    files: list[Path] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.fatal]

    @property
    def ok(self) -> bool:
        return bool(self.files) and not self.errors


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ValidatorMissing(f"{name} (Debian package dicom3tools) is not installed")
    return found


def _run(args: Sequence[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, errors="replace",
                              timeout=TOOL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"Error - {Path(args[0]).name} did not finish within {TOOL_TIMEOUT_S} s"
    return done.stdout + done.stderr


def run_dciodvfy(path: Path) -> list[Finding]:
    """Error and Warning lines of dciodvfy (DICOMDIR remarks are noise for single files)."""
    findings = []
    for line in _run([_tool(DCIODVFY), str(path)]).splitlines():
        if "DICOMDIR" in line:
            continue
        if line.startswith("Error"):
            findings.append(Finding(path.name, "dciodvfy", line))
        elif line.startswith("Warning"):
            findings.append(Finding(path.name, "dciodvfy", line, fatal=False))
    return findings


def run_dcentvfy(paths: Sequence[Path]) -> list[Finding]:
    """dcentvfy prints nothing when patient/study/series/frame of reference agree."""
    output = _run([_tool(DCENTVFY), *map(str, paths)])
    return [Finding("(series)", "dcentvfy", line) for line in output.splitlines() if line.strip()]


def check_image_type(name: str, ds: Dataset) -> list[Finding]:
    image_type = list(ds.get("ImageType", []))
    if len(image_type) != 4:
        return [Finding(name, "image-type", f"ImageType {image_type} must have 4 values")]
    allowed = IMAGE_TYPE_VALUE3.get(image_type[2])
    if allowed is None:
        return [Finding(name, "image-type", f"ImageType value 3 {image_type[2]!r} is not one of"
                        f" {sorted(IMAGE_TYPE_VALUE3)}")]
    if image_type[3] not in allowed:
        return [Finding(name, "image-type", f"ImageType value 4 {image_type[3]!r} with value 3"
                        f" {image_type[2]!r}, expected one of {sorted(allowed)}")]
    return []


def _jpeg_luma_sampling(frame: bytes) -> tuple[int, int] | None:
    """(H, V) of the first component in the JPEG's SOF0/SOF1 segment, None if not found."""
    position = 2
    while position + 4 <= len(frame):
        if frame[position] != 0xFF:
            return None
        marker = frame[position + 1]
        length = int.from_bytes(frame[position + 2:position + 4], "big")
        if marker in (0xC0, 0xC1) and position + 12 <= len(frame):
            sampling = frame[position + 11]
            return sampling >> 4, sampling & 0x0F
        position += 2 + length
    return None


def iter_frames(ds: Dataset) -> Iterator[bytes]:
    frames = int(ds.get("NumberOfFrames", 1))
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        yield from generate_frames(ds.PixelData, number_of_frames=frames)
        return
    size = ds.Rows * ds.Columns * ds.SamplesPerPixel
    for index in range(frames):
        yield bytes(ds.PixelData[index * size:(index + 1) * size])


def decode_frame(ds: Dataset, frame: bytes) -> np.ndarray:
    """RGB pixels of one frame (JPEG via OpenCV, native as stored)."""
    shape = (ds.Rows, ds.Columns, 3)
    if not ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return np.frombuffer(frame, dtype=np.uint8).reshape(shape)
    decoded = cv2.imdecode(np.frombuffer(frame, dtype=np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise ValueError("frame does not decode as JPEG")
    return np.asarray(decoded[:, :, ::-1])


def check_frames(name: str, ds: Dataset) -> list[Finding]:
    """Every frame decodes to Rows x Columns x 3 with the subsampling the photometric says."""
    expected_frames = int(ds.get("NumberOfFrames", 1))
    photometric = str(ds.PhotometricInterpretation)
    encapsulated = ds.file_meta.TransferSyntaxUID.is_encapsulated
    count = 0
    try:
        for count, frame in enumerate(iter_frames(ds), start=1):
            if encapsulated:
                sampling = _jpeg_luma_sampling(frame)
                if sampling != JPEG_SAMPLING.get(photometric):
                    return [Finding(name, "frames", f"frame {count}: JPEG luma sampling {sampling}"
                                    f" does not match PhotometricInterpretation {photometric}")]
            pixels = decode_frame(ds, frame)
            if pixels.shape != (ds.Rows, ds.Columns, 3):
                return [Finding(name, "frames", f"frame {count}: decodes to {pixels.shape},"
                                f" expected {(ds.Rows, ds.Columns, 3)}")]
    except ValueError as exc:
        return [Finding(name, "frames", f"frame {count + 1}: {exc}")]
    if count != expected_frames:
        return [Finding(name, "frames", f"{count} frames stored, NumberOfFrames={expected_frames}")]
    return []


def _spacing_mm(ds: Dataset) -> float:
    return float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1])


def check_pyramid_geometry(datasets: dict[Path, Dataset]) -> list[Finding]:
    """Every VOLUME level must cover the same slide area (size x spacing within one of its
    pixels), else readers place levels wrongly; neither dciodvfy nor OpenSlide checks this."""
    volumes = [(p, ds) for p, ds in datasets.items() if ds.ImageType[2] == "VOLUME"]
    if not volumes:
        return []
    _, base = max(volumes, key=lambda item: int(item[1].TotalPixelMatrixColumns))
    extent = (int(base.TotalPixelMatrixColumns) * _spacing_mm(base),
              int(base.TotalPixelMatrixRows) * _spacing_mm(base))
    findings = []
    for path, ds in volumes:
        spacing = _spacing_mm(ds)
        size = (int(ds.TotalPixelMatrixColumns) * spacing, int(ds.TotalPixelMatrixRows) * spacing)
        if any(abs(a - b) > spacing for a, b in zip(size, extent, strict=True)):
            findings.append(Finding(path.name, "pyramid", f"covers {size[0]:.4f}x{size[1]:.4f} mm,"
                                    f" base level covers {extent[0]:.4f}x{extent[1]:.4f} mm"))
    return findings


def check_openslide(datasets: dict[Path, Dataset]) -> list[Finding]:
    """OpenSlide 4 opens the series with one level per VOLUME instance, the same sizes and mpp,
    and ``label``/``macro`` associated images for the LABEL/OVERVIEW instances."""
    try:
        import openslide
    except ImportError as exc:
        raise ValidatorMissing(f"openslide-python/openslide-bin are not installed: {exc}") from exc
    volumes = sorted(
        ((path, ds) for path, ds in datasets.items() if ds.ImageType[2] == "VOLUME"),
        key=lambda item: -int(item[1].TotalPixelMatrixColumns),
    )
    if not volumes:
        return [Finding("(series)", "openslide", "no VOLUME instance to open")]
    base_path, base = volumes[0]
    try:
        slide = openslide.OpenSlide(str(base_path))
    except openslide.OpenSlideError as exc:
        return [Finding(base_path.name, "openslide", f"OpenSlide cannot open the series: {exc}")]
    findings: list[Finding] = []
    with slide:
        expected = [(int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows))
                    for _, ds in volumes]
        if list(slide.level_dimensions) != expected:
            findings.append(Finding("(series)", "openslide",
                                    f"levels {list(slide.level_dimensions)}, expected {expected}"))
        expected_mpp = _spacing_mm(base) * 1000.0
        for axis in ("x", "y"):
            mpp = float(slide.properties.get(f"openslide.mpp-{axis}", "nan"))
            if not math.isclose(mpp, expected_mpp, rel_tol=1e-6):
                findings.append(Finding("(series)", "openslide",
                                        f"mpp-{axis} {mpp}, expected {expected_mpp}"))
        kinds = {str(ds.ImageType[2]) for ds in datasets.values()}
        for kind, associated in (("LABEL", "label"), ("OVERVIEW", "macro")):
            if kind in kinds and associated not in slide.associated_images:
                findings.append(Finding("(series)", "openslide",
                                        f"associated image {associated!r} missing"))
    return findings


def read_series(directory: Path) -> tuple[dict[Path, Dataset], list[Finding]]:
    """Every VL WSI instance in ``directory`` (non-DICOM files are reported, not fatal)."""
    datasets: dict[Path, Dataset] = {}
    findings: list[Finding] = []
    for path in sorted(directory.glob("*.dcm")):
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            findings.append(Finding(path.name, "read", f"not a readable DICOM file: {exc}"))
            continue
        if ds.get("SOPClassUID") != VL_WSI_STORAGE:
            findings.append(Finding(path.name, "read", "not a VL Whole Slide Microscopy Image",
                                    fatal=False))
            continue
        datasets[path] = ds
    return datasets, findings


def validate_series(directory: Path, *, openslide: bool = True) -> ValidationReport:
    """All checks over one series directory; raises :class:`ValidatorMissing` if a tool is
    absent, so a missing validator is never mistaken for a pass."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    datasets, findings = read_series(directory)
    report = ValidationReport(files=list(datasets), findings=findings)
    if not datasets:
        report.findings.append(Finding(str(directory), "read", "no VL WSI instances (*.dcm)"))
        return report
    series = {str(ds.SeriesInstanceUID) for ds in datasets.values()}
    if len(series) != 1:
        report.findings.append(Finding("(series)", "read", f"{len(series)} series in one folder"))
    for path, ds in datasets.items():
        report.findings += run_dciodvfy(path)
        report.findings += check_image_type(path.name, ds)
        report.findings += check_frames(path.name, ds)
    report.findings += run_dcentvfy(list(datasets))
    report.findings += check_pyramid_geometry(datasets)
    if openslide:
        report.findings += check_openslide(datasets)
    return report
