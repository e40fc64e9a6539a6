"""Virtual slides: deterministic, lazily rendered regions that agree wherever they overlap."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from firmware_sim.slide import GLASS_RGB, ImageSlide, ProceduralSlide, SlideError

SLIDE = ProceduralSlide(seed=3)
IN_SECTION = (47_500.0, 12_500.0)


def saturation(image: np.ndarray) -> np.ndarray:
    pixels = image.reshape(-1, 3).astype(np.float32)
    return (pixels.max(axis=1) - pixels.min(axis=1)) / np.maximum(pixels.max(axis=1), 1)


def test_overlapping_regions_agree() -> None:
    x, y = IN_SECTION
    whole = SLIDE.render(x, y, 200, 160, 0.5)
    shifted = SLIDE.render(x + 40.0, y + 25.0, 200, 160, 0.5)  # 80 and 50 px further on
    overlap = np.abs(whole[50:, 80:].astype(int) - shifted[:110, :120].astype(int))
    assert np.percentile(overlap, 99) <= 2
    assert overlap.max() <= 4


def test_same_seed_same_slide_other_seed_differs() -> None:
    x, y = IN_SECTION
    again = ProceduralSlide(seed=3).render(x, y, 64, 64, 0.5)
    assert np.array_equal(SLIDE.render(x, y, 64, 64, 0.5), again)
    assert not np.array_equal(ProceduralSlide(seed=4).render(x, y, 64, 64, 0.5), again)


def test_he_colours_tissue_glass_and_label() -> None:
    x, y = IN_SECTION
    tissue = SLIDE.render(x - 160, y - 120, 320, 240, 0.5)
    mean = tissue.reshape(-1, 3).mean(axis=0)
    assert mean[0] > mean[1] and mean[2] > mean[1]  # pink/purple: green absorbed most
    assert np.median(saturation(tissue)) > 0.15
    darkest = tissue.reshape(-1, 3)[np.argsort(tissue.sum(axis=2).ravel())[:200]]
    assert (darkest[:, 2] > darkest[:, 0]).mean() > 0.8  # nuclei are blue-purple
    glass = SLIDE.render(30_000, 2_000, 100, 100, 0.5)
    assert (glass == GLASS_RGB).all()
    label = SLIDE.render(0, 0, 400, 250, 50.0)  # the 20 mm label end at 50 µm/px
    assert label[:, :400].min() < 60  # dark text and barcode bars


def test_overview_shows_tissue_surrounded_by_glass() -> None:
    overview = SLIDE.render(0, 0, 750, 250, 100.0)  # the whole slide, 75 x 25 mm
    stained = saturation(overview).reshape(overview.shape[:2]) > 0.1
    assert 0.05 < stained.mean() < 0.5
    assert not stained[:, :200].any()  # label end
    assert not stained[0].any() and not stained[-1].any()


def test_bad_region_is_a_clear_error() -> None:
    with pytest.raises(SlideError, match="region size"):
        SLIDE.render(0, 0, 0, 10, 0.5)
    with pytest.raises(SlideError, match="um_per_px"):
        SLIDE.render(0, 0, 10, 10, float("nan"))


def test_image_slide_crops_and_shrinks(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    source = rng.integers(0, 255, (300, 400, 3), np.uint8)
    path = tmp_path / "slide.png"
    cv2.imwrite(str(path), cv2.cvtColor(source, cv2.COLOR_RGB2BGR))
    slide = ImageSlide.from_file(path, source_um_per_px=0.5)
    assert (slide.width_um, slide.height_um) == (200.0, 150.0)
    crop = slide.render(10.0, 20.0, 50, 30, 0.5)  # 20 px in, 40 px down
    assert np.array_equal(crop, source[40:70, 20:70])
    half = slide.render(0.0, 0.0, 200, 150, 1.0)
    expected = cv2.resize(source, (200, 150), interpolation=cv2.INTER_AREA)
    assert np.abs(half.astype(int) - expected.astype(int)).max() <= 1
    outside = slide.render(-100.0, -100.0, 10, 10, 0.5)
    assert (outside == GLASS_RGB).all()


def test_unreadable_image_file(tmp_path: Path) -> None:
    path = tmp_path / "not-an-image.png"
    path.write_text("hello")
    with pytest.raises(SlideError, match="not a readable image"):
        ImageSlide.from_file(path, 0.5)
    with pytest.raises(SlideError, match="source_um_per_px"):
        ImageSlide.from_file(path, 0)
