"""Slide scan end to end: time per tile and acquisition efficiency against the rig's physics.

    .venv/bin/python -m bench.scan [--area-mm 3] [--objective 20x] [--full]

Runs the real microscope daemon code (Runtime, local mosquitto, job queue, every phase through
DICOM and the validators) on the simulated rig in real time (time scale 1): GRBL simulator at
the rig's rates and accelerations with 20 µm backlash, a 1280 x 960 camera with a 10 ms exposure,
a slide covered with tissue ("texture"). ``--full`` scans 15 x 15 mm at 20x (0.5 µm/px).

Efficiency = physical limit / measured acquisition time, where the physical limit is what the
simulated machine itself spent executing motion profiles along the planned path (including the
backlash pre-positions) plus one exposure per tile: 1.0 would mean the host never made the
stage wait. Target >= 0.85. OpenFlexure's field report: about 15 s per tile with autofocus.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from daemons.microscope import daemon, scan
from daemons.microscope.jobs import JobState
from medge import log
from medge.config import from_mapping
from medge.localbroker import Mosquitto
from medge.runtime import Runtime

OBJECTIVES = Path(__file__).parents[1] / "config" / "objectives.toml"
OPENFLEXURE_S_PER_TILE = 15.0
EXPOSURE_MS = 10.0


class AcquisitionMeter:
    """Wraps scan.acquire to read the simulator's motion-profile time around it."""

    def __init__(self, microscope: daemon.Microscope) -> None:
        self.microscope = microscope
        self.motion_s = 0.0
        self.wall_s = 0.0
        self.tiles = 0
        self._inner = scan.acquire

    async def __call__(self, motion: scan.Motion, state: JobState, *args: Any) -> None:
        machine = self.microscope.rig.machine
        assert machine is not None
        before_motion, before_tiles = machine.motion_time_s, len(state.tiles)
        started = time.perf_counter()
        await self._inner(motion, state, *args)
        self.wall_s += time.perf_counter() - started
        self.motion_s += (machine.motion_time_s - before_motion) / machine.time_scale
        self.tiles += len(state.tiles) - before_tiles


async def run(area_mm: float, objective: str, workdir: Path) -> dict[str, Any]:
    broker = Mosquitto(workdir / "broker")
    broker.start()
    try:
        cfg = from_mapping({
            "node": {"site": "bench", "node": "scanner", "state_dir": str(workdir / "state")},
            "mqtt": {"port": broker.port},
            "outbox": {"sync": "normal"},
            "microscope": {
                "objectives_file": str(OBJECTIVES), "disk_reserve_mb": 100,
                "stage": {"slide_origin_um": [-75_000.0, -40_000.0]},
                "camera": {"width": 1280, "height": 960, "exposure_ms": EXPOSURE_MS},
                "simulator": {"slide": "texture", "time_scale": 1.0},
            },
        }, daemon.MicroscopeConfig)
        async with Runtime(cfg, daemon.DAEMON) as rt:
            microscope = daemon.Microscope(cfg, rt)
            meter = AcquisitionMeter(microscope)
            scan.acquire = meter  # type: ignore[assignment]
            await microscope.start()
            try:
                x0, y0 = 30.0, 5.0
                started = time.perf_counter()
                reply = await microscope._submit({"job": {
                    "barcode": "BENCH", "accession": "B1", "patient": "P1",
                    "objective": objective, "area_mm": [x0, y0, x0 + area_mm, y0 + area_mm]}})
                job = microscope.jobs[reply["job"]["job"]]
                while not job.finished:
                    await asyncio.sleep(0.5)
                total = time.perf_counter() - started
            finally:
                scan.acquire = meter._inner
                await microscope.stop()
        return {"job": job, "total_s": total, "meter": meter}
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--area-mm", type=float, default=3.0,
                        help="side of the square scan area in mm (default 3)")
    parser.add_argument("--full", action="store_true", help="15 x 15 mm (overrides --area-mm)")
    parser.add_argument("--objective", default="20x")
    args = parser.parse_args()
    area = 15.0 if args.full else args.area_mm
    log.configure("warning", "console")
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
        result = asyncio.run(run(area, args.objective, Path(tmp)))
    job: JobState = result["job"]
    meter: AcquisitionMeter = result["meter"]
    tiles = len(job.tiles)
    physical = meter.motion_s + meter.tiles * EXPOSURE_MS / 1000
    print(f"scan bench: {area:g} x {area:g} mm at {args.objective}, 1280x960 tiles, "
          f"{EXPOSURE_MS:g} ms exposure, time scale 1; Python {platform.python_version()}")
    print(f"job status: {job.status} ({job.message})")
    print(f"{'phase':<10}{'seconds':>10}")
    for phase, seconds in job.timings.items():
        print(f"{phase:<10}{seconds:>10.1f}")
    rows = [
        ("tiles captured", f"{tiles} of {len(job.plan)} planned"),
        ("total (submit to report)", f"{result['total_s']:.1f} s"),
        ("time per tile, end to end", f"{result['total_s'] / max(tiles, 1):.2f} s"),
        ("time per tile, acquisition", f"{meter.wall_s / max(meter.tiles, 1):.3f} s"),
        ("physical limit per tile", f"{physical / max(meter.tiles, 1):.3f} s"
                                    f" (motion {meter.motion_s:.1f} s + exposures)"),
        ("acquisition efficiency", f"{physical / meter.wall_s:.3f} (target >= 0.85)"
         if meter.wall_s else "-"),
        ("OpenFlexure field report", f"~{OPENFLEXURE_S_PER_TILE:.0f} s per tile incl. "
                                     "autofocus"),
    ]
    for name, value in rows:
        print(f"{name:<28}{value}")


if __name__ == "__main__":
    main()
