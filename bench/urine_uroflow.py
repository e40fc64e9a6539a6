"""Urine analyzer and uroflow drivers: decode cost, end-to-end throughput, uroflow accuracy.

    .venv/bin/python -m bench.urine_uroflow [--strips 200] [--voids 20]

The end-to-end rows run driver and simulator in one process over TCP loopback, so their CPU
includes the simulator's share. Prints Markdown tables (docs/benchmarks.md, "Urine analyzers
and uroflow").
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np

from drivers.astm import AstmUrineAnalyzer, measurements_from_message
from drivers.astm_link import AstmTimers
from drivers.measurement import MeasurementDevice
from drivers.serial_link import SerialLink
from drivers.urine_printout import PrintoutUrineAnalyzer, parse_report
from drivers.uroflow import UroflowScale
from drivers.uroflow_analysis import analyse_void
from firmware_sim import astm_urine, printout_urine, urine_strip, uroflow
from firmware_sim.link import Endpoint, Handler, SimulatorServer

TCP = Endpoint.parse("tcp://127.0.0.1:0")
NOW = datetime.now(UTC)


def args_for(module: object, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1)
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser.parse_args(list(argv))


def per_call_us(function: Callable[[], object], repeat: int) -> float:
    start = time.process_time()
    for _ in range(repeat):
        function()
    return (time.process_time() - start) / repeat * 1e6


def decode_rows() -> list[str]:
    rng = random.Random(1)
    pads = urine_strip.random_strip(rng)
    message = b"".join(astm_urine.strip_message("SN1", 1, datetime(2026, 1, 1), pads))
    frames = astm_urine.build_frames(astm_urine.strip_message("SN1", 1, datetime(2026, 1, 1), pads))
    consult = printout_urine.consult120_report(pads, datetime(2026, 1, 1), 1)[1:-1]
    clinitek = printout_urine.clinitek50_report(pads, datetime(2026, 1, 1), 1, "GELB")[1:-1]
    t = np.arange(0, 60, 0.1)
    flow = 20 * (t / 9) ** 2.5 * np.exp(2.5 * (1 - t / 9))
    grams = np.cumsum(flow) / 10 + np.random.default_rng(1).normal(0, 0.3, len(t))
    return [
        "| step | µs per call |", "|---|---|",
        f"| ASTM: E1394 message (15 records) → Measurement | "
        f"{per_call_us(lambda: measurements_from_message(message, NOW), 2000):.0f} |",
        f"| ASTM: {len(frames)} frames checked (driver codec) | "
        f"{per_call_us(lambda: [_decode(f) for f in frames], 2000):.0f} |",
        f"| printout: Consult 120 report → Measurement | "
        f"{per_call_us(lambda: parse_report(consult, NOW), 2000):.0f} |",
        f"| printout: Clinitek 50 report → Measurement | "
        f"{per_call_us(lambda: parse_report(clinitek, NOW), 2000):.0f} |",
        f"| uroflow: analyse one 60 s void at 10 Hz | "
        f"{per_call_us(lambda: analyse_void(t, grams, 10.0), 200):.0f} |",
    ]


def _decode(frame: bytes) -> object:
    from drivers.astm_link import decode_frame

    return decode_frame(frame)


async def end_to_end(
    handler: Handler, make: Callable[[SerialLink], MeasurementDevice], count: int
) -> tuple[float, float]:
    """(measurements per second, CPU ms per measurement) of driver + simulator."""
    server = SimulatorServer(handler, TCP)
    async with server, SerialLink.open(server.address) as link:
        device = make(link)
        await device.next_measurement()  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            await device.next_measurement()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return count / wall, cpu / count * 1000


async def throughput_rows(strips: int, voids: int) -> list[str]:
    fast = AstmTimers(frame=5, frame_complete=2)
    rows = ["| device (driver + simulator, TCP) | measurements/s | CPU ms per measurement |",
            "|---|---|---|"]
    cases: list[tuple[str, Handler, Callable[[SerialLink], MeasurementDevice], int]] = [
        ("ASTM urine, one record per frame",
         astm_urine.create(args_for(astm_urine, "--every", "0.0001", "--first-after", "0")),
         lambda link: AstmUrineAnalyzer(link, timers=fast), strips),
        ("ASTM urine, whole message in 240-char frames",
         astm_urine.create(args_for(astm_urine, "--every", "0.0001", "--first-after", "0",
                                    "--frames", "message")),
         lambda link: AstmUrineAnalyzer(link, timers=fast), strips),
        ("printout, Consult 120",
         printout_urine.create(args_for(printout_urine, "--every", "0.0001", "--first-after",
                                        "0")),
         PrintoutUrineAnalyzer, strips),
        ("uroflow scale, 10 Hz stream replayed at 1000×",
         uroflow.create(args_for(uroflow, "--speed", "1000", "--every", "100",
                                 "--first-after", "0")),
         UroflowScale, voids),
    ]
    for name, handler, make, count in cases:
        rate, cpu_ms = await end_to_end(handler, make, count)
        rows.append(f"| {name} | {rate:.1f} | {cpu_ms:.2f} |")
    return rows


async def uroflow_rows(voids: int) -> list[str]:
    """Accuracy against the simulator's true voids, and the CPU share of one real-time scale."""
    device = uroflow.UroflowScaleDevice(args_for(uroflow, "--speed", "500", "--every", "100",
                                                 "--knock-rate", "0.5"))
    server = SimulatorServer(device.serve, TCP)
    async with server, SerialLink.open(server.address) as link:
        scale = UroflowScale(link)
        cpu = time.process_time()
        measured = [await scale.next_measurement() for _ in range(voids)]
        cpu = time.process_time() - cpu
        device_seconds = device.t
    volume_err, qmax_err = [], []
    for truth, void in zip(device.history, measured, strict=False):
        volume, qmax = void.readings[0].value or 0.0, void.readings[1].value or 0.0
        volume_err.append(abs(volume / truth.volume - 1) * 100)
        qmax_err.append(abs(qmax / truth.qmax - 1) * 100)
    return [
        "| uroflow figure | value |", "|---|---|",
        f"| voids measured (knock on 50 %) | {len(measured)} |",
        f"| voided volume error, mean / max | {statistics.mean(volume_err):.2f} % / "
        f"{max(volume_err):.2f} % |",
        f"| Qmax error, mean / max | {statistics.mean(qmax_err):.2f} % / {max(qmax_err):.2f} % |",
        f"| CPU per real-time 10 Hz scale (driver + simulator) | "
        f"{cpu / device_seconds * 100:.3f} % of a core |",
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strips", type=int, default=200)
    parser.add_argument("--voids", type=int, default=20)
    options = parser.parse_args()
    print(f"Python {platform.python_version()}, {platform.platform()}\n")
    print("\n".join(decode_rows()), end="\n\n")
    print("\n".join(await throughput_rows(options.strips, max(3, options.voids // 4))), end="\n\n")
    print("\n".join(await uroflow_rows(options.voids)))


if __name__ == "__main__":
    asyncio.run(main())
