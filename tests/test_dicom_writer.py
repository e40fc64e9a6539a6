"""The DICOM WSI writer against the real validators: dciodvfy/dcentvfy (dicom3tools), OpenSlide 4,
and a frame-by-frame comparison with the pixels that went in."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import pytest
from pydicom import dcmread

from daemons.microscope.wsi.dicom_validate import (
    ValidatorMissing,
    check_frames,
    check_image_type,
    decode_frame,
    iter_frames,
    run_dcentvfy,
    run_dciodvfy,
    validate_series,
)
from daemons.microscope.wsi.dicom_writer import (
    DicomWriteError,
    WriterOptions,
    WrittenSeries,
    write_series,
)
from daemons.microscope.wsi.model import RgbImage, SlideMetadata
from tests.fixtures.wsi_pyramid import ArrayLevel, pyramid, synthetic_slide

METADATA = SlideMetadata(
    patient_id="PSEUDO-0042",
    accession_number="ACC-2026-117",
    barcode="SLIDE-000123",
    patient_name="Doe^Pseudo",
    label_text="H&E block A1",
    specimen_id="S26-117-A1",
    container_id="SLIDE-000123",
    objective_magnification=40.0,
)
SOURCE = synthetic_slide(1000, 700, seed=5)
LEVELS = pyramid(SOURCE, tile_size=256, spacing_um=0.25)
JPEG_MEAN_ERROR_MAX = 3.0
"""Mean absolute error per channel allowed for quality-90 4:2:2 JPEG on smooth content."""


@pytest.fixture(scope="module")
def jpeg_series(tmp_path_factory: pytest.TempPathFactory) -> WrittenSeries:
    return write_series(LEVELS, METADATA, tmp_path_factory.mktemp("jpeg"))


@pytest.fixture(scope="module")
def lossless_series(tmp_path_factory: pytest.TempPathFactory) -> WrittenSeries:
    return write_series(LEVELS, METADATA, tmp_path_factory.mktemp("raw"),
                        WriterOptions(compression="none"))


def test_validators_are_installed() -> None:
    """After `make setup` these must exist; a missing one fails here instead of skipping."""
    assert shutil.which("dciodvfy"), "dicom3tools missing: run `make setup`"
    assert shutil.which("dcentvfy"), "dicom3tools missing: run `make setup`"
    assert openslide.__library_version__.startswith("4."), openslide.__library_version__


def test_one_instance_per_level_plus_label_and_overview(jpeg_series: WrittenSeries) -> None:
    kinds = [instance.kind for instance in jpeg_series.instances]
    assert kinds == [f"level-{n}" for n in range(len(LEVELS))] + ["label", "overview"]
    assert len(LEVELS) == 3
    for instance, level in zip(jpeg_series.instances, LEVELS, strict=False):
        ds = dcmread(instance.path, stop_before_pixels=True)
        assert ds.DimensionOrganizationType == "TILED_FULL"
        assert (ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows) == (level.width, level.height)
        assert ds.NumberOfFrames == -(-level.width // 256) * -(-level.height // 256)
        assert "PerFrameFunctionalGroupsSequence" not in ds
        assert ds.PhotometricInterpretation == "YBR_FULL_422"
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert [float(v) for v in spacing] == [level.pixel_spacing_um / 1000] * 2


@pytest.mark.parametrize("series_name", ["jpeg_series", "lossless_series"])
def test_every_instance_has_zero_dciodvfy_errors(
    series_name: str, request: pytest.FixtureRequest
) -> None:
    series: WrittenSeries = request.getfixturevalue(series_name)
    for path in series.paths:
        errors = [f for f in run_dciodvfy(path) if f.fatal]
        assert errors == [], f"{path.name}: {errors}"


def test_series_is_consistent_under_dcentvfy(jpeg_series: WrittenSeries) -> None:
    assert run_dcentvfy(jpeg_series.paths) == []


def test_opens_in_openslide_4_with_levels_mpp_and_associated_images(
    jpeg_series: WrittenSeries,
) -> None:
    with openslide.OpenSlide(str(jpeg_series.paths[0])) as slide:
        assert slide.detect_format(str(jpeg_series.paths[0])) == "dicom"
        assert slide.level_dimensions == tuple((lv.width, lv.height) for lv in LEVELS)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.25)
        assert float(slide.properties["openslide.objective-power"]) == pytest.approx(40)
        assert int(slide.properties["openslide.icc-size"]) > 0
        assert {"label", "macro"} <= set(slide.associated_images)
        region = np.asarray(slide.read_region((300, 200), 0, (400, 300)).convert("RGB"))
    expected = SOURCE[200:500, 300:700].astype(int)
    assert np.abs(region.astype(int) - expected).mean() < JPEG_MEAN_ERROR_MAX


def _decoded_tiles(path: Path) -> Iterator[RgbImage]:
    ds = dcmread(path)
    for frame in iter_frames(ds):
        yield decode_frame(ds, frame)


@pytest.mark.parametrize("level_index", [0, 1, 2])
def test_jpeg_frames_decode_to_the_written_pixels(
    jpeg_series: WrittenSeries, level_index: int
) -> None:
    written = list(LEVELS[level_index].tiles())
    decoded = list(_decoded_tiles(jpeg_series.paths[level_index]))
    assert len(decoded) == len(written)
    for number, (got, want) in enumerate(zip(decoded, written, strict=True)):
        error = np.abs(got.astype(int) - want.astype(int))
        assert error.mean() < JPEG_MEAN_ERROR_MAX, f"frame {number}: mean error {error.mean()}"


def test_lossless_variant_stores_exact_pixels(lossless_series: WrittenSeries) -> None:
    for path, level in zip(lossless_series.paths, LEVELS, strict=False):
        ds = dcmread(path, stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.LossyImageCompression == "00"
        for got, want in zip(_decoded_tiles(path), level.tiles(), strict=True):
            np.testing.assert_array_equal(got, want)
    assert validate_series(lossless_series.paths[0].parent).ok


def test_uids_are_consistent_and_instances_unique(jpeg_series: WrittenSeries) -> None:
    headers = [dcmread(p, stop_before_pixels=True) for p in jpeg_series.paths]
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert len({str(ds[key].value) for ds in headers}) == 1, key
    assert len({ds.SOPInstanceUID for ds in headers}) == len(headers)
    assert headers[0].SeriesInstanceUID == jpeg_series.series_instance_uid
    assert headers[0].Modality == "SM"


def test_fixed_uids_make_rewriting_idempotent(tmp_path: Path) -> None:
    fixed = SlideMetadata(patient_id="P", accession_number="A", barcode="B",
                          study_instance_uid="1.2.826.0.1.3680043.8.498.1",
                          series_instance_uid="1.2.826.0.1.3680043.8.498.2")
    small = pyramid(synthetic_slide(300, 200), tile_size=128)
    first = write_series(small, fixed, tmp_path / "a")
    second = write_series(small, fixed, tmp_path / "b")
    assert [i.sop_instance_uid for i in first.instances] == [
        i.sop_instance_uid for i in second.instances
    ]
    assert first.series_instance_uid == "1.2.826.0.1.3680043.8.498.2"


def test_label_and_overview_carry_barcode_label_text_and_image_type(
    jpeg_series: WrittenSeries,
) -> None:
    by_kind = {i.kind: dcmread(i.path, stop_before_pixels=True) for i in jpeg_series.instances}
    for kind in ("label", "overview"):
        ds = by_kind[kind]
        assert ds.ImageType[2] == kind.upper()
        assert ds.BarcodeValue == "SLIDE-000123"
        assert ds.LabelText == "H&E block A1"
        assert ds.SpecimenLabelInImage == "YES"
        assert ds.NumberOfFrames == 1
    assert list(by_kind["level-0"].ImageType) == ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    assert list(by_kind["level-1"].ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    specimen = by_kind["level-0"].SpecimenDescriptionSequence[0]
    assert specimen.SpecimenIdentifier == "S26-117-A1"
    step_items = specimen.SpecimenPreparationSequence[0].SpecimenPreparationStepContentItemSequence
    substances = {item.ConceptCodeSequence[0].CodeMeaning for item in step_items
                  if item.ConceptNameCodeSequence[0].CodeMeaning == "Using substance"}
    assert substances == {"hematoxylin stain", "water soluble eosin stain"}
    optical = by_kind["level-0"].OpticalPathSequence[0]
    assert optical.ICCProfile[36:40] == b"acsp"


def test_given_label_and_overview_photos_are_stored(tmp_path: Path) -> None:
    label = np.zeros((120, 250, 3), dtype=np.uint8)
    label[:, :, 2] = 200
    overview = synthetic_slide(301, 99, seed=9)
    series = write_series(pyramid(synthetic_slide(300, 200), tile_size=128), METADATA, tmp_path,
                          label_image=label, overview_image=overview)
    label_ds = dcmread(series.paths[-2])
    assert (label_ds.TotalPixelMatrixColumns, label_ds.TotalPixelMatrixRows) == (250, 120)
    pixels = decode_frame(label_ds, next(iter_frames(label_ds)))
    assert np.abs(pixels[:120, :250].astype(int) - label.astype(int)).mean() < JPEG_MEAN_ERROR_MAX
    overview_ds = dcmread(series.paths[-1], stop_before_pixels=True)
    assert (overview_ds.Columns, overview_ds.Rows) == (302, 100)  # padded white to even
    assert overview_ds.TotalPixelMatrixColumns == 302
    assert validate_series(tmp_path).ok


# ---- the validators fail on defects (so that a pass means something) ---------------------------


def _copy_series(series: WrittenSeries, target: Path) -> Path:
    shutil.copytree(series.paths[0].parent, target)
    return target


def test_validator_flags_wrong_frame_count(jpeg_series: WrittenSeries, tmp_path: Path) -> None:
    folder = _copy_series(jpeg_series, tmp_path / "s")
    ds = dcmread(folder / "level-0.dcm")
    ds.TotalPixelMatrixColumns = ds.TotalPixelMatrixColumns + 300
    ds.save_as(folder / "level-0.dcm")
    report = validate_series(folder)
    assert not report.ok
    assert any(f.check == "dciodvfy" and "NumberOfFrames" in f.message for f in report.errors)


def test_validator_flags_bogus_image_type_and_rgb_on_jpeg(jpeg_series: WrittenSeries) -> None:
    ds = dcmread(jpeg_series.paths[1])
    ds.ImageType = ["DERIVED", "PRIMARY", "FOO", "RESAMPLED"]
    assert [f.check for f in check_image_type("x", ds)] == ["image-type"]
    ds.PhotometricInterpretation = "RGB"
    findings = check_frames("x", ds)
    assert findings and "PhotometricInterpretation RGB" in findings[0].message


def test_validator_flags_levels_that_do_not_cover_the_same_area(
    jpeg_series: WrittenSeries, tmp_path: Path
) -> None:
    folder = _copy_series(jpeg_series, tmp_path / "s")
    (folder / "overview.dcm").unlink()
    (folder / "level-2.dcm").unlink()
    folder_report = validate_series(folder)
    assert folder_report.ok  # a shorter pyramid is still valid ...
    ds = dcmread(folder / "level-1.dcm")
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.PixelSpacing = [0.0007, 0.0007]
    ds.save_as(folder / "level-1.dcm")
    report = validate_series(folder)  # ... but levels with inconsistent spacing are not
    assert [(f.file, f.check) for f in report.errors] == [("level-1.dcm", "pyramid")]


def test_missing_validator_raises_instead_of_passing(
    jpeg_series: WrittenSeries, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ValidatorMissing, match="dicom3tools"):
        validate_series(jpeg_series.paths[0].parent)


def test_validate_reports_non_dicom_and_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    report = validate_series(tmp_path)
    assert not report.ok
    assert {f.check for f in report.errors} == {"read"}
    with pytest.raises(FileNotFoundError):
        validate_series(tmp_path / "absent")


# ---- bad input to the writer --------------------------------------------------------------------


@dataclass(frozen=True)
class ShortLevel(ArrayLevel):
    """Yields one tile fewer than the grid needs."""

    def tiles(self) -> Iterator[RgbImage]:
        tiles = list(super().tiles())
        yield from tiles[:-1]


@dataclass(frozen=True)
class GreyLevel(ArrayLevel):
    """Yields single-channel tiles, as a buggy pyramid builder might."""

    def tiles(self) -> Iterator[RgbImage]:
        for tile in super().tiles():
            yield tile[:, :, 0]


def test_bad_levels_raise_typed_errors_and_leave_no_partial_files(tmp_path: Path) -> None:
    image = synthetic_slide(300, 200)
    with pytest.raises(DicomWriteError, match="no pyramid levels"):
        write_series([], METADATA, tmp_path)
    with pytest.raises(DicomWriteError, match="pixel spacing"):
        write_series([ArrayLevel(image, 128, 0.0)], METADATA, tmp_path)
    with pytest.raises(DicomWriteError, match="tile size"):
        write_series([ArrayLevel(image, 127, 0.25)], METADATA, tmp_path)
    with pytest.raises(DicomWriteError, match="yielded 5 tiles, expected 6"):
        write_series([ShortLevel(image, 128, 0.25)], METADATA, tmp_path)
    with pytest.raises(DicomWriteError, match="tile of shape"):
        write_series([GreyLevel(image, 128, 0.25)], METADATA, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_writer_options_are_checked() -> None:
    with pytest.raises(ValueError, match="jpeg_quality"):
        WriterOptions(jpeg_quality=0)
    with pytest.raises(ValueError, match="compression"):
        WriterOptions(compression="webp")  # type: ignore[arg-type]


# ---- large levels: offset table and memory ------------------------------------------------------


def test_extended_offset_table_when_frames_pass_the_basic_table_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Levels whose encoded frames pass 4 GiB get an empty BOT and an Extended Offset Table;
    the limit is lowered here so that a small slide takes that path."""
    import daemons.microscope.wsi.dicom_writer as writer

    monkeypatch.setattr(writer, "_MAX_ITEM_LENGTH", 60_000)
    series = write_series(LEVELS, METADATA, tmp_path)
    ds = dcmread(series.paths[0])
    assert "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds
    offsets = np.frombuffer(ds.ExtendedOffsetTable, dtype="<u8")
    lengths = np.frombuffer(ds.ExtendedOffsetTableLengths, dtype="<u8")
    assert len(offsets) == ds.NumberOfFrames
    np.testing.assert_array_equal(offsets[1:], np.cumsum(lengths + 8)[:-1])
    small = dcmread(series.paths[2])
    assert "ExtendedOffsetTable" not in small  # a small level keeps the Basic Offset Table
    for path in series.paths[:2]:
        assert [f for f in run_dciodvfy(path) if f.fatal] == []
    for got, want in zip(_decoded_tiles(series.paths[0]), LEVELS[0].tiles(), strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).mean() < JPEG_MEAN_ERROR_MAX
    with openslide.OpenSlide(str(series.paths[0])) as slide:
        assert slide.level_count == 3


@dataclass(frozen=True)
class GeneratedLevel:
    """A level whose tiles are made on demand: the whole level never exists in memory."""

    width: int
    height: int
    tile_size: int = 256
    pixel_spacing_um: float = 0.25

    def tiles(self) -> Iterator[RgbImage]:
        rng = np.random.default_rng(3)
        columns = -(-self.width // self.tile_size)
        rows = -(-self.height // self.tile_size)
        for _ in range(columns * rows):
            yield rng.integers(0, 256, (self.tile_size, self.tile_size, 3), dtype=np.uint8)


def _peak_write_memory(level: GeneratedLevel, directory: Path) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        write_series([level], METADATA, directory, WriterOptions(overview_max_side=256))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_level(tmp_path: Path) -> None:
    """Peak Python/numpy allocation is a few tiles whatever the level size (4x the pixels
    here); the 4096^2 level alone would be 48 MiB decoded."""
    small = _peak_write_memory(GeneratedLevel(2048, 2048), tmp_path / "small")
    large = _peak_write_memory(GeneratedLevel(4096, 4096), tmp_path / "large")
    assert large < small * 1.25 + 2**20, (small, large)
    assert large < 4 * 2**20, large
