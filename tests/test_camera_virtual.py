"""The virtual slide camera: right crop at the true stage position, blur with defocus, exposure."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from daemons.microscope.autofocus import grey_thumbnail, tenengrad
from drivers.camera import CameraSettings
from firmware_sim.camera import (
    BacklashStage,
    FocalSurface,
    MotionLimits,
    SimOptics,
    VirtualSlideCamera,
)
from firmware_sim.slide import ImageSlide, ProceduralSlide

SETTINGS = CameraSettings(resolution=(160, 120))
CLEAN = SimOptics(um_per_px=0.5, vignetting=0.0, read_noise=0.0, full_well=0.0,
                  focal_surface=FocalSurface(z0_um=0.0, tilt_x=0.0, tilt_y=0.0,
                                             curvature_per_um=0.0))


async def test_frame_is_the_source_crop_at_the_true_position() -> None:
    rng = np.random.default_rng(7)
    source = rng.integers(0, 255, (600, 800, 3), np.uint8)
    slide = ImageSlide(source, source_um_per_px=0.5)
    position = [100.0, 80.0, 0.0]
    camera = VirtualSlideCamera(slide, lambda: (position[0], position[1], position[2]), CLEAN,
                                SETTINGS)
    async with camera:
        frame = await camera.capture()
        # Field centred on (100, 80) µm = pixel (200, 160): a 160 x 120 crop from (120, 100).
        assert np.array_equal(frame, source[100:220, 120:280])
        position[0] += 1.5  # three pixels to the right
        moved = await camera.capture()
        assert np.array_equal(moved, source[100:220, 123:283])


async def test_backlash_shows_in_the_images() -> None:
    source = np.random.default_rng(8).integers(0, 255, (600, 800, 3), np.uint8)
    stage = BacklashStage(100.0, 80.0, 0.0, backlash_um=(2.0, 0.0, 0.0))
    camera = VirtualSlideCamera(ImageSlide(source, 0.5), stage.true_position_um, CLEAN, SETTINGS)
    async with camera:
        stage.move_to(x_um=150.0)
        stage.move_to(x_um=100.0)  # approached from above: stops 2 µm (4 px) high
        frame = await camera.capture()
    assert np.array_equal(frame, source[100:220, 124:284])


async def test_blur_grows_with_defocus() -> None:
    stage = BacklashStage(47_500.0, 12_500.0)
    optics = SimOptics(read_noise=0.0, full_well=0.0)  # noise would set a floor to sharpness
    camera = VirtualSlideCamera(ProceduralSlide(seed=2), stage.true_position_um, optics,
                                CameraSettings(resolution=(320, 240)))
    sharpness = []
    async with camera:
        focus = optics.focal_surface.z_at(47_500.0, 12_500.0)
        for defocus in (-8.0, 0.0, 3.0, 8.0, 20.0, 60.0):
            stage.move_to(z_um=focus + defocus)
            sharpness.append(tenengrad(grey_thumbnail(await camera.capture())))
    below, *above = sharpness
    assert all(a > b for a, b in itertools.pairwise(above)), sharpness
    assert below == pytest.approx(above[2], rel=0.05)  # blur is symmetric about focus
    assert camera.frames_captured == 6


async def test_exposure_gain_and_noise() -> None:
    source = np.full((400, 400, 3), 100, np.uint8)
    optics = SimOptics(vignetting=0.0, read_noise=3.0, full_well=0.0)
    camera = VirtualSlideCamera(ImageSlide(source, 0.5), lambda: (100.0, 100.0, 0.0), optics,
                                CameraSettings(resolution=(160, 120), exposure_ms=10.0))
    async with camera:
        normal = (await camera.capture()).astype(np.float32)
        await camera.configure(CameraSettings(resolution=(160, 120), exposure_ms=20.0))
        double = (await camera.capture()).astype(np.float32)
        await camera.configure(CameraSettings(resolution=(160, 120), exposure_ms=10.0, gain=3.0))
        saturated = await camera.capture()
    assert abs(normal.mean() - 100) < 1 and 2 < normal.std() < 4
    assert abs(double.mean() - 200) < 1.5
    assert saturated.min() == 255


async def test_vignetting_darkens_corners() -> None:
    source = np.full((400, 400, 3), 200, np.uint8)
    optics = SimOptics(vignetting=0.3, read_noise=0.0, full_well=0.0)
    async with VirtualSlideCamera(ImageSlide(source, 0.5), lambda: (100.0, 100.0, 0.0), optics,
                                  SETTINGS) as camera:
        frame = await camera.capture()
    assert frame[60, 80].mean() > 195 and frame[0, 0].mean() < 150


def test_motion_time_model() -> None:
    limits = MotionLimits(max_rate_um_s=1000, accel_um_s2=10_000)
    assert limits.move_time_s(0) == 0
    assert abs(limits.move_time_s(10) - 2 * (10 / 10_000) ** 0.5) < 1e-12  # triangular
    assert abs(limits.move_time_s(1100) - (0.1 + 1.0)) < 1e-12  # ramps plus cruise


async def test_camera_follows_the_grbl_simulators_mechanical_position() -> None:
    """Integration with the GRBL simulator: backlash in its mechanics shows in the frames."""
    grbl = pytest.importorskip("firmware_sim.grbl_machine")
    now = [0.0]
    machine = grbl.GrblMachine(clock=lambda: now[0])
    assert machine.execute_line("$X")[-1] == "ok"
    for line in ("G0X-3Y-3", "G0X-1Y-1", "G0X-2Y-2"):  # the last move approaches from above
        assert machine.execute_line(line) == ["ok"]
        while machine.is_moving or machine.queue:
            now[0] += 0.05
            machine.advance()
    x_um, y_um, _ = machine.true_position_um()
    assert (x_um, y_um) != (-2000.0, -2000.0)  # the simulator's backlash left it short
    source = np.random.default_rng(9).integers(0, 255, (400, 400, 3), np.uint8)
    slide = ImageSlide(source, 0.5)
    offset = 2100.0  # machine frame (negative space once homed) to slide coordinates

    def on_slide() -> tuple[float, float, float]:
        x, y, z = machine.true_position_um()
        return x + offset, y + offset, z

    camera = VirtualSlideCamera(slide, on_slide, CLEAN, SETTINGS)
    async with camera:
        frame = await camera.capture()
    left, top = camera.field_origin_um(x_um + offset, y_um + offset)
    assert np.array_equal(frame, slide.render(left, top, 160, 120, 0.5))
    commanded_left, commanded_top = camera.field_origin_um(100.0, 100.0)
    assert not np.array_equal(frame, slide.render(commanded_left, commanded_top, 160, 120, 0.5))
