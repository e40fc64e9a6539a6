"""Autofocus and focus map against the virtual slide camera on a stage with backlash."""

from __future__ import annotations

import numpy as np
import pytest

from daemons.microscope.autofocus import (
    AutofocusSettings,
    FocusFailed,
    autofocus,
    grey_thumbnail,
    laplacian_variance,
    tenengrad,
    tissue_fraction,
)
from daemons.microscope.focusmap import build_focus_map, fit_surface
from daemons.microscope.optics import OBJECTIVES, Objective
from drivers.camera import CameraSettings
from firmware_sim.camera import (
    BacklashStage,
    FocalSurface,
    SimOptics,
    SimulatedRig,
    VirtualSlideCamera,
)
from firmware_sim.slide import ImageSlide, ProceduralSlide

SLIDE = ProceduralSlide(seed=5)
SURFACE = FocalSurface(z0_um=12.0, tilt_x=0.003, tilt_y=-0.002, curvature_per_um=2e-7)
FRAME = CameraSettings(resolution=(320, 240), exposure_ms=10.0)


def make_rig(objective: Objective, slide: object = SLIDE, backlash_z: float = 6.0,
             x: float = 47_000.0, y: float = 12_000.0) -> SimulatedRig:
    stage = BacklashStage(x, y, 0.0, backlash_um=(3.0, 3.0, backlash_z))
    optics = SimOptics(um_per_px=objective.um_per_px,
                       numerical_aperture=objective.numerical_aperture, focal_surface=SURFACE)
    camera = VirtualSlideCamera(slide, stage.true_position_um, optics, FRAME)  # type: ignore[arg-type]
    return SimulatedRig(stage, camera)


class RecordingRig:
    """Records every commanded Z to check the approach direction."""

    def __init__(self, rig: SimulatedRig) -> None:
        self.rig = rig
        self.z_moves: list[float] = []

    async def move_z(self, z_um: float) -> None:
        self.z_moves.append(z_um)
        await self.rig.move_z(z_um)

    async def capture(self) -> np.ndarray:
        return await self.rig.capture()


def test_metrics_rank_sharp_above_blurred_and_ignore_exposure() -> None:
    frame = SLIDE.render(47_000, 12_000, 320, 240, 0.5)
    blurred = np.asarray(__import__("cv2").GaussianBlur(frame, (0, 0), 4.0))
    darker = (frame.astype(np.float32) * 0.5).astype(np.uint8)
    for metric in (laplacian_variance, tenengrad):
        sharp = metric(grey_thumbnail(frame))
        assert sharp > 2 * metric(grey_thumbnail(blurred))
        assert metric(grey_thumbnail(darker)) == pytest.approx(sharp, rel=0.1)
    assert tissue_fraction(frame) > 0.9
    assert tissue_fraction(SLIDE.render(30_000, 3_000, 320, 240, 0.5)) == 0


@pytest.mark.parametrize("name", ["10x", "20x", "40x"])
async def test_autofocus_lands_within_depth_of_field(name: str) -> None:
    objective = OBJECTIVES[name]
    rig = make_rig(objective)
    settings = AutofocusSettings.for_objective(objective)
    async with rig.camera:
        for x, y, start_offset in ((47_000, 12_000, -9.0), (44_500, 10_500, 7.0),
                                   (50_500, 14_000, 0.0)):
            await rig.move_xy(x, y)
            truth = SURFACE.z_at(x, y)
            result = await autofocus(rig, truth + start_offset, settings)
            assert abs(result.z_um - truth) <= objective.focus_tolerance_um, (x, y, result)
            mechanical_z = rig.stage.true_position_um()[2]
            assert abs(mechanical_z - truth) <= objective.focus_tolerance_um
            assert result.frames <= 20


async def test_final_approach_is_from_below_and_takes_up_backlash() -> None:
    objective = OBJECTIVES["20x"]
    rig = make_rig(objective, backlash_z=8.0)  # more play than the depth of field
    recorder = RecordingRig(rig)
    async with rig.camera:
        result = await autofocus(recorder, SURFACE.z_at(47_000, 12_000) + 5.0,
                                 AutofocusSettings.for_objective(objective))
    assert recorder.z_moves[-1] == result.z_um
    assert recorder.z_moves[-2] < result.z_um
    assert rig.stage.true_position_um()[2] == result.z_um  # no play left


async def test_peak_outside_the_first_window_is_still_found() -> None:
    objective = OBJECTIVES["20x"]
    rig = make_rig(objective)
    settings = AutofocusSettings.for_objective(objective)
    async with rig.camera:
        truth = SURFACE.z_at(47_000, 12_000)
        for offset in (-45.0, 45.0):
            result = await autofocus(rig, truth + offset, settings)
            assert abs(result.z_um - truth) <= objective.focus_tolerance_um


async def test_blank_glass_fails_cleanly() -> None:
    rig = make_rig(OBJECTIVES["20x"], x=30_000, y=3_000)
    async with rig.camera:
        with pytest.raises(FocusFailed, match="blank glass") as failure:
            await autofocus(rig, 0.0)
    assert failure.value.reason == "blank"


async def test_texture_free_stain_fails_with_no_peak() -> None:
    flat_pink = np.zeros((2000, 2000, 3), np.uint8)
    flat_pink[:] = (230, 150, 190)
    rig = make_rig(OBJECTIVES["20x"], slide=ImageSlide(flat_pink, 0.5), x=500, y=500)
    async with rig.camera:
        with pytest.raises(FocusFailed, match="flat") as failure:
            await autofocus(rig, 0.0)
    assert failure.value.reason == "no-peak" and failure.value.curve


def test_bad_autofocus_settings() -> None:
    with pytest.raises(ValueError, match="metric"):
        AutofocusSettings(metric="jpeg")
    with pytest.raises(ValueError, match="fine_step_um"):
        AutofocusSettings(fine_step_um=10.0, coarse_step_um=5.0)
    assert AutofocusSettings.for_objective(OBJECTIVES["40x"]).coarse_step_um < \
        AutofocusSettings.for_objective(OBJECTIVES["10x"]).coarse_step_um


# --- focus map ------------------------------------------------------------------------------


def test_surface_fit_rejects_outliers() -> None:
    rng = np.random.default_rng(3)
    xy = rng.uniform(-5000, 5000, (30, 2))
    z = np.array([SURFACE.z_at(47_500 + x, 12_500 + y) for x, y in xy])
    z += rng.normal(0, 0.2, len(z))
    z[[4, 17]] += (25.0, -40.0)  # two failed focuses (dust, a fold)
    points = [(47_500 + x, 12_500 + y, zz) for (x, y), zz in zip(xy, z, strict=True)]
    surface = fit_surface(points)
    assert surface.degree == 2
    assert not surface.inliers[4] and not surface.inliers[17] and surface.inliers.sum() == 28
    assert surface.rms_residual_um < 0.4
    assert abs(surface.residuals_um[17] + 40) < 1.5
    probe = (49_000.0, 11_000.0)
    assert abs(float(surface.predict(*probe)) - SURFACE.z_at(*probe)) < 0.5


def test_surface_fit_degrades_with_few_points() -> None:
    plane = fit_surface([(0, 0, 1.0), (100, 0, 2.0), (0, 100, 3.0), (100, 100, 4.0)])
    assert plane.degree == 1
    assert float(plane.predict(50, 50)) == pytest.approx(2.5)
    assert fit_surface([(5, 5, 7.0)]).degree == 0
    with pytest.raises(ValueError, match="no focused points"):
        fit_surface([])


async def test_focus_map_within_depth_of_field_at_95_percent_of_tissue_points() -> None:
    objective = OBJECTIVES["20x"]
    rig = make_rig(objective)
    grid = [(47_500 + dx, 12_500 + dy) for dy in np.linspace(-5000, 5000, 5)
            for dx in np.linspace(-5000, 5000, 5)]
    async with rig.camera:
        result = await build_focus_map(rig, grid, start_z_um=0.0,
                                       settings=AutofocusSettings.for_objective(objective))
    focused = [p for p in result.points if p.z_um is not None]
    assert len(focused) >= 12
    assert any(p.reason == "no tissue" for p in result.points)  # holes and glass are skipped
    tolerance = objective.focus_tolerance_um
    assert all(abs(p.z_um - SURFACE.z_at(p.x_um, p.y_um)) <= tolerance for p in focused)
    rng = np.random.default_rng(11)
    tissue_points = []
    while len(tissue_points) < 200:
        x, y = rng.uniform(41_000, 54_000), rng.uniform(6_000, 19_000)
        if tissue_fraction(SLIDE.render(x - 40, y - 30, 160, 120, 0.5)) > 0.5:
            tissue_points.append((x, y))
    xs, ys = np.array(tissue_points).T
    errors = result.surface.predict(xs, ys) - np.array([SURFACE.z_at(*p) for p in tissue_points])
    assert np.mean(np.abs(errors) <= tolerance) >= 0.95, np.abs(errors).max()
    assert result.surface.rms_residual_um < tolerance / 2


async def test_focus_map_on_bare_glass_fails_cleanly() -> None:
    rig = make_rig(OBJECTIVES["20x"], x=30_000, y=3_000)
    async with rig.camera:
        with pytest.raises(FocusFailed, match="no tissue point focused among 2") as failure:
            await build_focus_map(rig, [(30_000, 3_000), (70_000, 20_000)], start_z_um=0.0)
    assert failure.value.reason == "blank"
