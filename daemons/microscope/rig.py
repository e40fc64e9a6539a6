"""The scanner's hardware as the daemon sees it: stage, tile camera, overview camera, objectives.

``port = "sim"`` / ``device = "sim"`` build the simulated rig inside the daemon: the GRBL
simulator served on a loopback TCP port and driven by the real :class:`GrblStage` driver over
that socket (so the wire protocol is exercised), and cameras that render a virtual slide at the
simulated carriage's *true* position (the shared :class:`VirtualSlideCamera`: defocus from a
tilted, optionally curved focal surface, vignetting, sensor noise, exposure). A
real rig uses the serial port and UVC cameras unchanged. ``device = "sim"`` with a real
``port`` (a GRBL board, or ``medge sim grbl`` in its own process, which a test can kill, stall
or make noisy) renders at the position the controller *reports*.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from daemons.microscope.optics import Objective
from drivers.camera import Camera, CameraError, CameraSettings, RgbFrame, UvcCamera
from drivers.grbl import GrblConfig, GrblStage
from firmware_sim.camera import FocalSurface, SimOptics, VirtualSlideCamera
from firmware_sim.grbl import serve
from firmware_sim.grbl_machine import GrblMachine
from firmware_sim.link import Endpoint, SimulatorServer
from firmware_sim.slide import GLASS_RGB, ImageSlide, ProceduralSlide, Slide
from medge.config import ConfigError, bounds, load

SIM = "sim"
TEST_SLIDE_SIZE_PX = (3200, 2400)
TEST_SLIDE_UM_PER_PX = 1.0


@dataclass(frozen=True)
class StageSection:
    port: str = SIM
    """Serial device of the GRBL board (udev name), a socket:// URL, or "sim"."""
    slide_origin_um: tuple[float, ...] = field(default=(-75_000.0, -40_000.0),
                                               metadata=bounds(min=2, max=2))
    """Stage (x, y) at which the slide's top-left corner is at the top-left of the field."""
    focus_guess_z_um: float = -5_000.0
    """Where the focus search starts (the slide holder's nominal focus height)."""
    settle_s: float = field(default=0.0, metadata=bounds(min=0, max=5))


@dataclass(frozen=True)
class CameraSection:
    device: str = SIM
    """A /dev/videoN path, or "sim"."""
    width: int = field(default=1280, metadata=bounds(min=16, max=16384))
    height: int = field(default=960, metadata=bounds(min=16, max=16384))
    exposure_ms: float = field(default=10.0, metadata=bounds(min=0.01, max=10_000))
    overview_device: str = SIM
    """The macro camera that photographs the whole slide and its label."""
    overview_um_per_px: float = field(default=50.0, metadata=bounds(min=1, max=1000))


@dataclass(frozen=True)
class SimulatorSection:
    slide: str = "procedural"
    """"procedural" (a 75 x 25 mm H&E section, realistic but slow to render), "test" (a small
    synthetic slide that renders fast), "texture" (a 75 x 25 mm slide covered with tissue, fast;
    for benchmarks), or the path of an image file."""
    slide_um_per_px: float = field(default=1.0, metadata=bounds(min=0.05, max=100))
    seed: int = 0
    time_scale: float = field(default=1.0, metadata=bounds(min=0.01, max=1000))
    """Motion runs this many times faster than real time."""
    focal_plane_z_um: float = -5_010.0
    focal_tilt_um_per_mm: tuple[float, ...] = field(default=(0.8, -0.5),
                                                    metadata=bounds(min=2, max=2))
    """The slide is never flat: the best focus drifts this much per mm in x and y."""
    focal_curvature_um_per_mm2: float = 0.0
    """Bowl of the focal surface around the slide's corner: z grows by this times r² (mm)."""
    vignetting: float = field(default=0.25, metadata=bounds(min=0, max=0.9))
    """Tile camera: fractional brightness loss in the frame corners."""
    read_noise: float = field(default=2.0, metadata=bounds(min=0, max=50))
    """Tile camera: read noise, grey levels (sigma)."""
    full_well: float = field(default=4000.0, metadata=bounds(min=0))
    """Tile camera: electrons at grey level 255 (shot noise); 0: no shot noise."""
    fault_reset_after_captures: int = field(default=0, metadata=bounds(min=0))
    """Fault for tests: the controller reboots (alarm, position lost) after this many frames of
    acquisition (focus frames do not count); 0: never."""
    fault_alarm_after_captures: int = field(default=0, metadata=bounds(min=0))
    """Fault for tests: the controller raises a limit alarm (ALARM:2, locked until reset)."""
    fault_camera_lost_after_captures: int = field(default=0, metadata=bounds(min=0))
    """Fault for tests: the tile camera drops off USB after this many acquisition frames."""


@dataclass(frozen=True)
class ObjectiveSection:
    magnification: float = field(metadata=bounds(min=1, max=200))
    numerical_aperture: float = field(metadata=bounds(min=0.01, max=1.6))
    um_per_px: float = field(metadata=bounds(min=0.01, max=100))
    """Calibrated camera pixel size on the sample (stage micrometer)."""
    immersion_index: float = field(default=1.0, metadata=bounds(min=1, max=2))


@dataclass(frozen=True)
class ObjectivesFile:
    objectives: dict[str, ObjectiveSection] = field(metadata=bounds(min=1))


def load_objectives(path: Path) -> dict[str, Objective]:
    """The calibration file; ConfigError names the file and key of a bad entry."""
    calibrations = load(path, ObjectivesFile).objectives
    objectives: dict[str, Objective] = {}
    for name, section in calibrations.items():
        try:
            objectives[name] = Objective(name, section.magnification, section.numerical_aperture,
                                         section.um_per_px, section.immersion_index)
        except ValueError as exc:
            raise ConfigError(str(path), f"objectives.{name}", str(exc)) from None
    return objectives


def small_slide(seed: int, everywhere: bool = False) -> ImageSlide:
    """A 3.2 x 2.4 mm slide with one irregular tissue patch, glass around it; cheap to render.

    Stained texture: eosin stroma with haematoxylin dots, strong enough for focus and overlap.
    ``everywhere``: no glass, tissue edge to edge (a periodic texture for :class:`TextureSlide`).
    """
    rng = np.random.default_rng(seed)
    height, width = TEST_SLIDE_SIZE_PX[1], TEST_SLIDE_SIZE_PX[0]
    coarse = cv2.resize(rng.random((6, 8), np.float32), (width, height),
                        interpolation=cv2.INTER_CUBIC)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    blob = np.hypot((xs - width * 0.55) / (width * 0.28), (ys - height * 0.5) / (height * 0.3))
    tissue = np.clip((1.0 - blob + 0.35 * (coarse - 0.5)) * 6.0, 0.0, 1.0)
    if everywhere:
        tissue[:] = 1.0
    detail = cv2.GaussianBlur(rng.random((height, width), np.float32), (0, 0), 2.0)
    detail = (detail - detail.min()) / max(float(np.ptp(detail)), 1e-6)
    nuclei = np.clip((detail - 0.6) * 5.0, 0.0, 1.0)
    eosin = tissue * (0.3 + 0.7 * detail)
    haematoxylin = tissue * nuclei * 1.5
    density = (eosin[..., None] * np.array([0.07, 0.99, 0.11], np.float32)
               + haematoxylin[..., None] * np.array([0.65, 0.70, 0.29], np.float32))
    rgb = np.asarray(GLASS_RGB, np.float32) * np.exp(-density)
    return ImageSlide(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), TEST_SLIDE_UM_PER_PX)


class TextureSlide:
    """A 75 x 25 mm slide covered edge to edge with a periodic H&E texture: as much tissue as a
    benchmark wants, rendered as cheaply as a warp (the procedural slide costs seconds a tile)."""

    width_um = 75_000.0
    height_um = 25_000.0

    def __init__(self, seed: int) -> None:
        self.texture = small_slide(seed, everywhere=True).image
        self._reduced: dict[int, RgbFrame] = {1: self.texture}

    def render(self, left_um: float, top_um: float, width_px: int, height_px: int,
               um_per_px: float) -> RgbFrame:
        factor = max(1, math.floor(um_per_px / TEST_SLIDE_UM_PER_PX))
        if factor not in self._reduced:
            height, width = self.texture.shape[:2]
            self._reduced[factor] = np.asarray(cv2.resize(
                self.texture, (width // factor, height // factor),
                interpolation=cv2.INTER_AREA), np.uint8)
        source = self._reduced[factor]
        source_um = TEST_SLIDE_UM_PER_PX * factor
        scale = um_per_px / source_um
        transform = np.array([[scale, 0, (left_um + um_per_px / 2) / source_um - 0.5],
                              [0, scale, (top_um + um_per_px / 2) / source_um - 0.5]])
        return np.asarray(cv2.warpAffine(source, transform, (width_px, height_px),
                                         flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                         borderMode=cv2.BORDER_WRAP), np.uint8)


def make_slide(section: SimulatorSection) -> Slide:
    if section.slide == "procedural":
        return ProceduralSlide(seed=section.seed)
    if section.slide == "test":
        return small_slide(section.seed)
    if section.slide == "texture":
        return TextureSlide(section.seed)
    return ImageSlide.from_file(Path(section.slide), section.slide_um_per_px)


class RigCamera(VirtualSlideCamera):
    """The shared virtual camera plus the simulated rig's fault injection (a camera lost from
    USB, controller faults) counted in acquisition frames, so a test can place a fault at a
    given tile whatever the focus search took."""

    def __init__(self, slide: Slide, position_source: Callable[[], tuple[float, float, float]],
                 optics: SimOptics, settings: CameraSettings, seed: int) -> None:
        super().__init__(slide, position_source, optics, settings, seed, name="tiles")
        self.unplugged = False
        self.counting = False
        """True during acquisition: only those frames advance ``acquired``."""
        self.acquired = 0
        self.on_exposed: Callable[[], None] = lambda: None
        """Called (worker thread) when the exposure ends, before readout: the stage may move."""
        self.on_acquired: Callable[[int], None] = lambda count: None
        """Called (worker thread) after each acquisition frame with the number taken so far."""

    def _do_capture(self) -> RgbFrame:
        """Expose at the stage position, signal the end of the exposure (a camera's strobe
        output), then read out: the scan moves the stage on while the frame is rendered."""
        if self.unplugged:
            raise CameraError(f"camera {self.name}: device disappeared from USB")
        x_um, y_um, z_um = self.position_source()
        time.sleep(self.settings.exposure_ms / 1000)
        self.on_exposed()
        with self._lock:
            frame = self.render(x_um, y_um, z_um)
        self.frames_captured += 1
        if self.counting:
            self.acquired += 1
            self.on_acquired(self.acquired)
        return frame


@dataclass
class Rig:
    """What a scan drives. ``machine``/``server`` exist only on the simulated rig."""

    stage: GrblStage
    camera: Camera
    overview: Camera
    label_width_um: float
    machine: GrblMachine | None = None
    server: SimulatorServer | None = None

    async def open(self) -> None:
        if self.server is not None:
            self.stage.url = await self.server.start()
        await self.stage.connect()
        await self.camera.open()
        await self.overview.open()

    def use(self, objective: Objective, acquiring: bool = False) -> None:
        """The objective of the next phase (a real turret is set by the technician);
        ``acquiring`` tells the simulated camera's fault injection that tiles are being taken."""
        if isinstance(self.camera, RigCamera):
            self.camera.optics = replace(self.camera.optics, um_per_px=objective.um_per_px,
                                         numerical_aperture=objective.numerical_aperture)
            self.camera.counting = acquiring

    async def close(self) -> None:
        await self.overview.close()
        await self.camera.close()
        await self.stage.close()
        if self.server is not None:
            await self.server.close()


def build_rig(stage: StageSection, camera: CameraSection, simulator: SimulatorSection,
              objective: Objective) -> Rig:
    """The rig with ``objective`` mounted (:meth:`Rig.use` swaps it for a job)."""
    settings = CameraSettings(resolution=(camera.width, camera.height),
                              exposure_ms=camera.exposure_ms)
    grbl = GrblConfig(settle_s=stage.settle_s)
    if stage.port != SIM and camera.device != SIM:
        return Rig(GrblStage(stage.port, grbl), UvcCamera(camera.device, settings=settings),
                   UvcCamera(camera.overview_device), label_width_um=0.0)
    if stage.port != SIM:  # simulated optics on an external controller: its reported position
        external = GrblStage(stage.port, grbl)
        tiles, overview, label_width_um = _virtual_cameras(
            stage, camera, simulator, objective, settings, lambda: tuple(external.position_um))
        return Rig(external, tiles, overview, label_width_um)
    machine = GrblMachine(time_scale=simulator.time_scale)
    server = SimulatorServer(serve(machine), Endpoint.parse("tcp://127.0.0.1:0"))
    tiles, overview, label_width_um = _virtual_cameras(stage, camera, simulator, objective,
                                                       settings, machine.true_position_um)
    loop = asyncio.get_running_loop()

    def inject_faults(count: int) -> None:
        if count == simulator.fault_reset_after_captures:
            loop.call_soon_threadsafe(machine.spurious_reset)
        if count == simulator.fault_alarm_after_captures:
            loop.call_soon_threadsafe(machine._soft_limit_alarm)
        if count == simulator.fault_camera_lost_after_captures:
            tiles.unplugged = True

    tiles.on_acquired = inject_faults
    return Rig(GrblStage("socket://127.0.0.1:0", grbl), tiles, overview, label_width_um,
               machine=machine, server=server)


def _virtual_cameras(stage: StageSection, camera: CameraSection, simulator: SimulatorSection,
                     objective: Objective, settings: CameraSettings,
                     stage_position_um: Callable[[], tuple[float, ...]],
                     ) -> tuple[RigCamera, VirtualSlideCamera, float]:
    """The tile and overview cameras over the simulated slide, and the label's width (µm)."""
    slide = make_slide(simulator)
    origin_x, origin_y = stage.slide_origin_um
    tilt_x, tilt_y = simulator.focal_tilt_um_per_mm
    surface = FocalSurface(simulator.focal_plane_z_um, (0.0, 0.0), tilt_x / 1000, tilt_y / 1000,
                           simulator.focal_curvature_um_per_mm2 / 1e6)
    optics = SimOptics(objective.um_per_px, objective.numerical_aperture, surface,
                       simulator.vignetting, simulator.read_noise, simulator.full_well)

    def field_centre_on_slide() -> tuple[float, float, float]:
        """Stage positions address the field's top-left corner; the camera wants its centre."""
        x, y, z = stage_position_um()
        width, height = tiles.settings.resolution
        half = tiles.optics.um_per_px / 2
        return x - origin_x + width * half, y - origin_y + height * half, z

    tiles = RigCamera(slide, field_centre_on_slide, optics, settings, simulator.seed)
    overview = overview_camera(slide, camera.overview_um_per_px)
    return tiles, overview, float(getattr(slide, "label_width_um", 0.0))


def overview_camera(slide: Slide, um_per_px: float) -> VirtualSlideCamera:
    """The macro camera: the whole slide in one frame with its top-left pixel at the slide's
    corner, always in focus, and clean (no vignetting or noise, which tissue detection would
    take for stain)."""
    width = max(16, math.ceil(slide.width_um / um_per_px))
    height = max(16, math.ceil(slide.height_um / um_per_px))
    optics = SimOptics(um_per_px, numerical_aperture=0.05, focal_surface=FocalSurface(
        0.0, (0.0, 0.0), 0.0, 0.0, 0.0), vignetting=0.0, read_noise=0.0, full_well=0.0)
    centre = (width * um_per_px / 2, height * um_per_px / 2, 0.0)
    return VirtualSlideCamera(slide, lambda: centre, optics, CameraSettings(
        resolution=(width, height)), name="overview")
