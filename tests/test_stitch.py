"""Tile registration, placement and the streamed pyramid against synthetic slides of known truth."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemons.microscope.wsi.model import PyramidLevel
from daemons.microscope.wsi.pipeline import BuildResult, build_pyramid
from daemons.microscope.wsi.pyramid import open_pyramid
from daemons.microscope.wsi.registration import register_strips, to_gray
from daemons.microscope.wsi.scanfolder import ScanFolderError, load_scan
from daemons.microscope.wsi.synthetic import (
    GroundTruth,
    Rect,
    ScanSpec,
    SyntheticSlide,
    position_errors,
    write_scan,
)

TISSUE = SyntheticSlide(seed=11, bare_glass=0.0)


def scan_and_build(
    tmp_path: Path, spec: ScanSpec, slide: SyntheticSlide = TISSUE, **options: int
) -> tuple[GroundTruth, BuildResult]:
    truth = write_scan(tmp_path / "tiles", spec, slide)
    return truth, build_pyramid(tmp_path / "tiles", tmp_path / "work", **options)


def level_image(level: PyramidLevel) -> np.ndarray:
    """Reassemble a level from its tiles (small test slides only)."""
    columns = math.ceil(level.width / level.tile_size)
    tiles = list(level.tiles())
    rows = [np.hstack(tiles[r * columns : (r + 1) * columns]) for r in range(len(tiles) // columns)]
    return np.vstack(rows)[: level.height, : level.width]


@pytest.mark.parametrize("shift", [(0.0, 0.0), (3.3, -2.7), (-10.6, 4.25), (7.5, 0.5)])
def test_strip_registration_is_subpixel(shift: tuple[float, float]) -> None:
    a = to_gray(TISSUE.render(1000.0, 1000.0, 120, 300))
    b = to_gray(TISSUE.render(1000.0 + shift[0], 1000.0 + shift[1], 120, 300))
    sx, sy, ncc = register_strips(a, b, max_shift=20, peaks=3, sigma=1.0)
    assert abs(sx - shift[0]) < 0.1 and abs(sy - shift[1]) < 0.1
    assert ncc > 0.9


def test_grid_positions_match_truth(tmp_path: Path) -> None:
    truth, result = scan_and_build(tmp_path, ScanSpec(rows=5, cols=6, seed=3), tile_size=256)
    errors = position_errors(result.positions_px, truth.true_px)
    stage_errors = position_errors(truth.stage_px, truth.true_px)
    assert errors.mean() <= 0.5 and errors.max() <= 2.0, errors
    assert stage_errors.mean() > 2.0  # the stage alone would not do: registration did the work
    assert set(result.positions_px) == set(truth.true_px)
    assert result.report.flagged_tiles == []
    assert result.report.accepted >= len(result.report.pairs) - 1
    assert result.report.residual_max_px < 2.0
    assert set(result.timings_s) == {"register", "place", "compose", "pyramid"}


def test_blank_glass_tiles_are_flagged_and_kept(tmp_path: Path) -> None:
    spec = ScanSpec(rows=4, cols=5, seed=4, origin_px=(0.0, 0.0))
    step_x, step_y = spec.step_px
    # Glass over tiles (1, 3), (1, 4), (2, 3), (2, 4) entirely, with margin for the jitter.
    glass = Rect(3 * step_x - 40, step_y - 40, 10_000, 3 * step_y + spec.tile_height * 0.1 + 40)
    slide = SyntheticSlide(seed=4, bare_glass=0.0, glass=(glass,))
    truth, result = scan_and_build(tmp_path, spec, slide, tile_size=256)
    report = result.report
    blank = {f"tile_r{r:03d}_c{c:03d}.png" for r in (1, 2) for c in (3, 4)}
    assert blank <= set(report.flagged_tiles)
    assert report.rejected >= 4
    for pair in report.pairs:
        if pair.a in blank and pair.b in blank:
            assert not pair.accepted and pair.ncc < report.threshold
    assert set(result.positions_px) == set(truth.true_px)  # nothing dropped
    tissue = [name for name in truth.true_px if name not in report.flagged_tiles]
    errors = position_errors(result.positions_px, truth.true_px, tissue)
    assert errors.mean() <= 0.5 and errors.max() <= 2.0, errors
    # A blank tile stays near its stage-model position (stage error only, a few px).
    blank_errors = position_errors(result.positions_px, truth.true_px, sorted(blank))
    assert blank_errors.max() < 20


def test_single_row(tmp_path: Path) -> None:
    truth, result = scan_and_build(tmp_path, ScanSpec(rows=1, cols=6, seed=5), tile_size=256)
    errors = position_errors(result.positions_px, truth.true_px)
    assert errors.mean() <= 0.5 and errors.max() <= 2.0, errors
    assert result.report.accepted == 5


def test_single_tile_is_the_whole_slide(tmp_path: Path) -> None:
    spec = ScanSpec(rows=1, cols=1, seed=6, tile_width=200, tile_height=150)
    _, result = scan_and_build(tmp_path, spec, tile_size=128)
    assert result.report.pairs == [] and result.report.flagged_tiles == ["tile_r000_c000.png"]
    base = result.levels[0]
    assert (base.width, base.height) == (200, 150)
    camera = cv2.imread(str(tmp_path / "tiles" / "tile_r000_c000.png"))[..., ::-1]
    assert np.array_equal(level_image(base), camera)
    assert [(level.width, level.height) for level in result.levels] == [(200, 150), (100, 75)]


def test_holes_and_missing_tiles(tmp_path: Path) -> None:
    skip = frozenset({(2, 2), (0, 4), (4, 0)})
    spec = ScanSpec(rows=5, cols=5, seed=7, skip=skip, origin_px=(0.0, 0.0), overlap=0.15)
    truth, result = scan_and_build(tmp_path, spec, tile_size=128)
    assert len(result.positions_px) == 22
    errors = position_errors(result.positions_px, truth.true_px)
    assert errors.mean() <= 0.5 and errors.max() <= 2.0, errors
    image = level_image(result.levels[0])
    # The middle of the hole at (2, 2) is covered by no tile: white glass.
    above = result.positions_px["tile_r001_c002.png"]
    x = int(above[0] + spec.tile_width / 2)
    y = int(above[1] + spec.step_px[1] + spec.tile_height / 2)
    assert np.all(image[y - 3 : y + 3, x - 3 : x + 3] == 255)


def test_pyramid_levels_and_tiles(tmp_path: Path) -> None:
    truth, result = scan_and_build(tmp_path, ScanSpec(rows=3, cols=4, seed=8), tile_size=128)
    levels = result.levels
    base = levels[0]
    assert base.pixel_spacing_um == truth.spec.pixel_size_um
    for upper, lower in itertools.pairwise(levels):
        assert (lower.width, lower.height) == (math.ceil(upper.width / 2),
                                               math.ceil(upper.height / 2))
        assert lower.pixel_spacing_um == pytest.approx(2 * upper.pixel_spacing_um)
    assert max(levels[-1].width, levels[-1].height) <= 128 < max(levels[-2].width,
                                                                 levels[-2].height)
    for level in levels:
        tiles = list(level.tiles())
        assert len(tiles) == math.ceil(level.width / 128) * math.ceil(level.height / 128)
        assert all(t.shape == (128, 128, 3) and t.dtype == np.uint8 for t in tiles)
        assert all(np.array_equal(x, y) for x, y in zip(tiles, level.tiles(), strict=True))
    # Edge padding is white; the lower level is the area average of the one above.
    image0, image1 = level_image(levels[0]), level_image(levels[1])
    padded = list(levels[0].tiles())[-1]
    assert np.all(padded[base.height % 128 or 128 :] == 255)
    padded0 = np.full((image1.shape[0] * 2, image1.shape[1] * 2, 3), 255, np.uint8)
    padded0[: image0.shape[0], : image0.shape[1]] = image0
    halved = cv2.resize(padded0, (image1.shape[1], image1.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(halved.astype(int) - image1).max() <= 1
    reopened = open_pyramid(tmp_path / "work")
    assert reopened == levels == result.levels


def test_composition_matches_the_slide(tmp_path: Path) -> None:
    spec = ScanSpec(rows=3, cols=3, seed=9, noise=0.0, vignetting=0.0)
    truth, result = scan_and_build(tmp_path, spec, tile_size=128)
    image = level_image(result.levels[0]).astype(np.float32)
    found = np.array([result.positions_px[n] for n in sorted(truth.true_px)])
    true = np.array([truth.true_px[n] for n in sorted(truth.true_px)])
    origin = (true - found).mean(axis=0)
    expected = TISSUE.render(origin[0], origin[1], image.shape[1], image.shape[0])
    # Centre tile's overlap-free interior: exactly one camera tile covers it.
    x0, y0 = result.positions_px["tile_r001_c001.png"]
    inner = (slice(int(y0) + 40, int(y0) + spec.tile_height - 40),
             slice(int(x0) + 50, int(x0) + spec.tile_width - 50))
    difference = np.abs(image[inner] - expected[inner].astype(np.float32))
    assert difference.mean() < 4.0, difference.mean()
    # Whole covered area, seams included: blending leaves no misregistration ghosts.
    covered = (slice(int(y0) - 100, int(y0) + 2 * spec.tile_height - 100),
               slice(int(x0) - 120, int(x0) + 2 * spec.tile_width - 120))
    assert np.abs(image[covered] - expected[covered].astype(np.float32)).mean() < 5.0


def test_small_cache_rereads_but_gives_the_same_image(tmp_path: Path) -> None:
    spec = ScanSpec(rows=3, cols=4, seed=10)
    write_scan(tmp_path / "tiles", spec, TISSUE)
    roomy = build_pyramid(tmp_path / "tiles", tmp_path / "roomy", tile_size=64)
    tight = build_pyramid(tmp_path / "tiles", tmp_path / "tight", tile_size=64,
                          cache_bytes=2 * 320 * 240 * 3)
    assert roomy.camera_tile_reads == 12
    assert tight.camera_tile_reads > 12
    assert all(np.array_equal(a, b) for a, b in
               zip(roomy.levels[0].tiles(), tight.levels[0].tiles(), strict=True))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "positions.csv").unlink(), "positions.csv: cannot read"),
        (lambda d: (d / "scan.json").write_text("{"), "scan.json: not JSON"),
        (lambda d: (d / "scan.json").write_text('{"pixel_size_um": -1}'), "pixel_size_um"),
        (lambda d: (d / "positions.csv").write_text("name,row\n"), "lacks column(s) col"),
        (lambda d: (d / "positions.csv").write_text(
            "name,row,col,x_um,y_um\ntile_r000_c000.png,0,zero,1,1\n"), "positions.csv:2"),
        (lambda d: (d / "positions.csv").write_text(
            "name,row,col,x_um,y_um\ntile_r000_c000.png,0,0,nan,1\n"), "finite"),
        (lambda d: (d / "positions.csv").write_text(
            "name,row,col,x_um,y_um\ntile_r000_c000.png,0,0,0,0\ntile_r000_c000.png,0,1,9,0\n"),
         "appears twice"),
        (lambda d: (d / "tile_r000_c001.png").unlink(), "has no image"),
        (lambda d: (d / "positions.csv").write_text("name,row,col,x_um,y_um\n"), "no tiles"),
    ],
)
def test_bad_tiles_folder_is_a_clear_error(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    write_scan(tmp_path, ScanSpec(rows=1, cols=2, tile_width=64, tile_height=48))
    damage(tmp_path)
    with pytest.raises(ScanFolderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_pyramid(tmp_path, tmp_path / "work")


def test_unreadable_or_odd_sized_tile_is_named(tmp_path: Path) -> None:
    write_scan(tmp_path, ScanSpec(rows=1, cols=3, tile_width=64, tile_height=48))
    cv2.imwrite(str(tmp_path / "tile_r000_c001.png"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ScanFolderError, match=r"tile_r000_c001.png: 10x10 px, expected 64x48"):
        build_pyramid(tmp_path, tmp_path / "work")
    (tmp_path / "tile_r000_c002.png").write_bytes(b"not an image")
    with pytest.raises(ScanFolderError, match="not a readable image"):
        load_scan(tmp_path).read(load_scan(tmp_path).tiles[2])


@pytest.mark.parametrize("slide", [TISSUE, SyntheticSlide(seed=12, bare_glass=0.0, period=512)])
def test_synthetic_slide_is_one_global_image(slide: SyntheticSlide) -> None:
    """Ground truth is only truth if a pixel does not depend on which tile rendered it."""
    whole = slide.render(300.0, 200.0, 200, 150).astype(int)
    part = slide.render(340.0, 230.0, 100, 80).astype(int)
    assert np.array_equal(whole[30:110, 40:140], part)
    shifted = slide.render(300.5, 200.0, 200, 150).astype(int)
    assert 0 < np.abs(shifted - whole).mean() < np.abs(whole[:, 1:] - whole[:, :-1]).mean()
    if slide.period:
        assert np.array_equal(slide.render(300.0 + slide.period, 200.0, 200, 150), whole)
