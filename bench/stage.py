"""Slide-scanner stage: time per tile for move + settle (+ exposure) against the physical minimum.

    .venv/bin/python -m bench.stage [--tiles 6x4] [--step-um 600,450] [--exposure-ms 0]

Drives the GRBL simulator in real time (time scale 1, its configured max rates and
accelerations, 20 µm backlash) through GrblStage over a pty, visiting a raster of tiles with
backlash compensation on. The physical minimum of a tile is the time its motion profiles take
(the simulator adds up the trapezoids it executed, including the backlash pre-positions) plus
the exposure; the ratio physical / measured is the share of the tile time the stage really
needs (target >= 0.9: host overhead <= 10 %). Two polling strategies are compared: the
driver's default (5 Hz, plus polls at the predicted end of each move and 50 Hz until Idle)
and plain 5 Hz polling.
``exposure_s`` is the hook for the camera: a capture of that length follows each settle.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time
from dataclasses import dataclass

from drivers.grbl import GrblConfig, GrblStage
from firmware_sim.grbl import serve
from firmware_sim.grbl_machine import GrblMachine
from firmware_sim.link import Endpoint, SimulatorServer
from medge import log


@dataclass
class TileTiming:
    measured_s: float
    physical_s: float


async def capture(exposure_s: float) -> None:
    """Placeholder for the camera: a frame takes its exposure time."""
    if exposure_s:
        await asyncio.sleep(exposure_s)


async def scan(
    config: GrblConfig, tiles: tuple[int, int], step_um: tuple[float, float], exposure_s: float
) -> list[TileTiming]:
    machine = GrblMachine(time_scale=1.0, backlash_um=(20.0, 20.0, 10.0))
    async with (
        SimulatorServer(serve(machine), Endpoint("pty")) as server,
        GrblStage(server.address, config) as stage,
    ):
        await stage.home()
        origin = (-10000.0, -10000.0)
        await stage.move_to(*origin, -5000.0)
        timings = []
        for row in range(tiles[1]):
            for column in range(tiles[0]):
                x = origin[0] + column * step_um[0]
                y = origin[1] + row * step_um[1]
                motion_before = machine.motion_time_s
                started = time.perf_counter()
                await stage.move_to(x, y)
                await capture(exposure_s)
                measured = time.perf_counter() - started
                physical = machine.motion_time_s - motion_before + exposure_s
                timings.append(TileTiming(measured, physical))
        return timings


def _grid(text: str) -> tuple[int, int]:
    columns, rows = text.split("x")
    return int(columns), int(rows)


def _pitch(text: str) -> tuple[float, float]:
    x, y = text.split(",")
    return float(x), float(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", default="6x4", help="columns x rows (default 6x4)")
    parser.add_argument("--step-um", default="600,450", help="tile pitch X,Y in µm")
    parser.add_argument("--exposure-ms", type=float, default=0.0,
                        help="exposure per tile (capture placeholder), default 0")
    args = parser.parse_args()
    log.configure(level="warning")
    tiles = _grid(args.tiles)
    step = _pitch(args.step_um)
    exposure = args.exposure_ms / 1000
    strategies = {
        "default (5 Hz + predicted end)": GrblConfig(),
        "plain 5 Hz polling": GrblConfig(predict_motion_end=False),
    }
    print(f"stage bench: {tiles[0]}x{tiles[1]} tiles, pitch {step[0]:.0f}x{step[1]:.0f} µm, "
          f"exposure {args.exposure_ms:.0f} ms, GRBL simulator in real time over a pty; "
          f"Python {platform.python_version()}")
    print(f"{'strategy':32} {'tiles':>5} {'measured ms':>12} {'physical ms':>12} "
          f"{'overhead p50/p95 ms':>20} {'ratio':>6}")
    for name, config in strategies.items():
        timings = asyncio.run(scan(config, tiles, step, exposure))
        measured = sum(t.measured_s for t in timings)
        physical = sum(t.physical_s for t in timings)
        overheads = sorted((t.measured_s - t.physical_s) * 1000 for t in timings)
        p95 = overheads[min(len(overheads) - 1, round(0.95 * (len(overheads) - 1)))]
        print(f"{name:32} {len(timings):5d} {measured / len(timings) * 1000:12.1f} "
              f"{physical / len(timings) * 1000:12.1f} "
              f"{statistics.median(overheads):9.1f} / {p95:8.1f} {physical / measured:6.3f}")


if __name__ == "__main__":
    main()
