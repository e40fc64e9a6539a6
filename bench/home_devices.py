"""Home-gateway serial drivers: CMS50 decode cost and throughput, Modbus poll latency,
discovery scan time.

    .venv/bin/python -m bench.home_devices [--polls 300] [--seconds 5]

Everything runs in one process against the simulators (firmware_sim) over ptys and TCP, so
the CPU figures of the end-to-end rows include the simulator's share; the pure-decode rows
do not. Prints one Markdown table per part (docs/benchmarks.md, "Home-gateway drivers").
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from contextlib import AsyncExitStack
from pathlib import Path

from drivers import cms50
from drivers.discovery import Discovery, DiscoveryConfig, standard_probes
from drivers.modbus_device import ModbusDevice, load_map
from drivers.serial_link import SerialLink
from firmware_sim.cms50 import Cms50Simulator, Patient, encode_legacy, encode_v46_live
from firmware_sim.link import Endpoint, SimulatorServer
from firmware_sim.modbus_vent import ModbusVentSimulator

ROOT = Path(__file__).resolve().parent.parent
VENT_MAP = ROOT / "config/ventilators/home-ventilator.toml"
O2_MAP = ROOT / "config/ventilators/oxygen-concentrator.toml"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def decode_cost(samples: int = 36_000) -> list[str]:
    """CPU per sample of framing + decoding, on bytes produced ahead of time (10 min at 60 Hz)."""
    rows = []
    for name, encode, framer, decode in (
        ("legacy", encode_legacy, cms50.LegacyFramer(), cms50.decode_legacy_packet),
        ("v46", encode_v46_live, cms50.V46Framer(), cms50.decode_live_frame),
    ):
        patient = Patient()
        stream = b"".join(encode(patient.next()) for _ in range(samples))
        chunk = len(stream) // samples * 30  # reads of half a second of data
        start = time.process_time()
        decoded = 0
        for offset in range(0, len(stream), chunk):
            decoded += len([decode(f) for f in framer.feed(stream[offset:offset + chunk])])
        cpu = time.process_time() - start
        per_sample = cpu / decoded
        rows.append(f"| CMS50 {name} decode | {decoded} samples | {per_sample * 1e6:.2f} µs/sample "
                    f"| {per_sample * 60 * 100:.3f} % of a core at 60 Hz |")
    return rows


async def cms50_stream(seconds: float) -> list[str]:
    """Driver against the simulator at 100× the device rate, over a pty."""
    rows = []
    for protocol in ("legacy", "v46"):
        sim = Cms50Simulator(protocol=protocol, every=1 / 6000)
        driver_class = cms50.Cms50Legacy if protocol == "legacy" else cms50.Cms50V46
        async with (
            SimulatorServer(sim.handle, Endpoint("pty")) as server,
            SerialLink.open(server.address, driver_class.settings) as link,
        ):
            driver = driver_class(link)
            count = 0
            cpu0, wall0 = time.process_time(), time.monotonic()
            async for _ in driver.measurements():
                count += 1
                if time.monotonic() - wall0 >= seconds:
                    break
            wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
        device_seconds = count  # one measurement per device second
        rows.append(f"| CMS50 {protocol} end-to-end, 100× rate, pty | {device_seconds / wall:.0f} "
                    f"device-s/s | {cpu / device_seconds * 1000:.2f} ms CPU per device-second "
                    f"(driver + simulator) | discarded {driver.discarded_bytes} B |")
    return rows


async def modbus_polls(polls: int) -> list[str]:
    rows = []
    register_map = load_map(VENT_MAP)
    for where in ("pty", "tcp://127.0.0.1:0"):
        sim = ModbusVentSimulator(VENT_MAP)
        async with (
            SimulatorServer(sim.handle, Endpoint.parse(where)) as server,
            SerialLink.open(server.address, register_map.device.serial_settings) as link,
        ):
            device = ModbusDevice(link, register_map)
            latencies = []
            cpu0 = time.process_time()
            for _ in range(polls):
                start = time.monotonic()
                await device.poll()
                latencies.append(time.monotonic() - start)
            cpu = time.process_time() - cpu0
        kind = "pty" if where == "pty" else "TCP"
        rows.append(f"| Modbus poll (2 requests, 16 registers), {kind} | {polls} | "
                    f"p50 {pct(latencies, 50) * 1000:.2f} ms | p99 {pct(latencies, 99) * 1000:.2f} "
                    f"ms | {cpu / polls * 1000:.2f} ms CPU per poll (driver + simulator) |")
    return rows


async def discovery_scan() -> list[str]:
    """Four simulators on fresh ptys (a pty re-opened with parity is refused: see the notes)."""
    probes = standard_probes({"ventilator": load_map(VENT_MAP), "concentrator": load_map(O2_MAP)})
    rows = []
    for timeout in (0.5, 2.0):
        handlers = [
            Cms50Simulator(protocol="legacy").handle, Cms50Simulator(protocol="v46").handle,
            ModbusVentSimulator(VENT_MAP).handle, ModbusVentSimulator(O2_MAP).handle,
        ]
        async with AsyncExitStack() as stack:
            addresses = [
                (await stack.enter_async_context(SimulatorServer(h, Endpoint("pty")))).address
                for h in handlers
            ]
            discovery = Discovery(probes, DiscoveryConfig(probe_timeout=timeout,
                                                          extra_ports=tuple(addresses)),
                                  sysfs=Path("/nonexistent"))
            start = time.monotonic()
            changes = await discovery.scan()
            took = time.monotonic() - start
            again = time.monotonic()
            await discovery.scan()
            rescan = time.monotonic() - again
        drivers = sorted(c.found.driver for c in changes)
        rows.append(f"| discovery scan, 4 ptys, probe timeout {timeout:g} s | {took:.2f} s | "
                    f"{', '.join(drivers)} |")
        rows.append(f"| rescan, nothing changed | {rescan * 1000:.2f} ms | |")
    return rows


async def main(polls: int, seconds: float) -> None:
    print(f"# home-gateway drivers — {platform.python_version()}, {platform.machine()}")
    print("\n| part | n | cost | note |\n|---|---|---|---|")
    print("\n".join(decode_cost()))
    print("\n".join(await cms50_stream(seconds)))
    print("\n| part | polls | latency | latency | CPU |\n|---|---|---|---|---|")
    print("\n".join(await modbus_polls(polls)))
    print("\n| part | time | found |\n|---|---|---|")
    print("\n".join(await discovery_scan()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    options = parser.parse_args()
    asyncio.run(main(options.polls, options.seconds))
