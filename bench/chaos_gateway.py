"""The home gateway as a chaos/soak ``Part`` (bench/parts.py): ``medge run gateway`` against four
device simulator processes (CMS50 oximeter, ASTM urine analyzer, Modbus ventilator, printout
urine analyzer). Its workload is the devices' own pace; its faults:

- SIGKILL of the gateway, restarted at once (systemd would);
- serial unplug/replug: the ventilator simulator killed, back after ``--settle`` s;
- stalled device: SIGSTOP of the oximeter simulator for ``--settle`` s, then SIGCONT;
- corrupted and dropped bytes: the ASTM simulator restarted with ``--corrupt-rate``/
  ``--drop-rate`` for 2x ``--settle`` s;
- disk nearly full: ``RLIMIT_FSIZE`` of the running gateway pinned to 4 KiB (no file may grow:
  SQLite's commits fail as on a full disk), lifted after ``--settle`` s;
- device clock jump: the printout simulator restarted one hour ahead (the host clock cannot be
  changed here).

Recovery: the next observation of the affected device (any of the gateway's devices for the
SIGKILL, the disk and the shared faults) at the hospital subscriber.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.gateway import gateway_toml
from bench.parts import Check, DaemonProcess, Fault, Recovered, Shared, Sim
from medge.runtime import outbox_path

REPO = Path(__file__).resolve().parent.parent
VENT_MAP = REPO / "config" / "ventilators" / "home-ventilator.toml"
DISK_FULL_BYTES = 4096
"""No file of the gateway may grow past this while the disk is "full" (its outbox is larger)."""


class GatewayPart:
    name = "gateway"
    daemon = "gateway"

    def __init__(self) -> None:
        self.sims: dict[str, Sim] = {}
        self._shared: Shared | None = None
        self._process: DaemonProcess | None = None
        self._disk_full_injected = 0

    @property
    def shared(self) -> Shared:
        if self._shared is None:
            raise RuntimeError("the gateway part is not started")
        return self._shared

    @property
    def process(self) -> DaemonProcess:
        if self._process is None:
            raise RuntimeError("the gateway part is not started")
        return self._process

    @property
    def state(self) -> Path:
        return self.shared.work / "gateway"

    @property
    def outbox_path(self) -> Path:
        return outbox_path(self.state, "gateway")

    def start(self, shared: Shared) -> None:
        """``shared.rate``: times the realistic pace (oximeter and ventilator published every
        60 s, ventilator polled every 1 s, a urine strip every 5 minutes)."""
        self._shared = shared
        self.state.mkdir(parents=True, exist_ok=True)
        rate = shared.rate
        vent_map = self.state / "vent.toml"
        vent_map.write_text(VENT_MAP.read_text().replace(
            "poll_interval = 1.0", f"poll_interval = {max(0.01, 1.0 / rate):.3f}"))
        publish, strip_every = 60.0 / rate, f"{300.0 / rate:.2f}"
        self.sims = {
            "oximeter": Sim("cms50"),
            "urine-astm": Sim("astm-urine", ("--every", strip_every, "--first-after", "1",
                                             "--ack-timeout", "2", "--busy-retry", "1")),
            "ventilator": Sim("modbus-vent"),
            "urine-printout": Sim("printout-urine", ("--every", strip_every)),
        }
        for device, sim in self.sims.items():
            sim.log = self.state / f"sim-{device}.log"
        devices: dict[str, dict[str, Any]] = {
            "oximeter": {"driver": "cms50", "obs_interval_s": publish, "pleth_every_s": 0.0},
            "urine-astm": {"driver": "urine-astm"},
            "ventilator": {"driver": "modbus", "map": str(vent_map), "serial": "VENT-1",
                           "obs_interval_s": publish},
            "urine-printout": {"driver": "urine-printout"},
        }
        for sim in self.sims.values():
            sim.start()
        tables = {name: {**table, "port": self.sims[name].url,
                         "reconnect_min_s": 0.5, "reconnect_max_s": 2.0}
                  for name, table in devices.items()}
        config = self.state / "gateway.toml"
        config.write_text(gateway_toml(self.state, shared.broker.port, tables).replace(
            "[mqtt]\n", "[mqtt]\nreconnect_min = 0.5\nreconnect_max = 2.0\n"))
        self._process = DaemonProcess("gateway", config, shared.work / "gateway.log")
        self._process.start()

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
        for sim in self.sims.values():
            sim.kill()

    def daemon_pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def faults(self) -> Sequence[tuple[str, Fault]]:
        return [("SIGKILL gateway", self.sigkill), ("serial unplug/replug", self.unplug),
                ("stalled device", self.stall), ("corrupt+dropped bytes", self.noisy_line),
                ("disk nearly full", self.disk_full), ("device clock jump", self.clock_jump)]

    async def working(self, since: float) -> None:
        await self.shared.hospital.arrival_from(since, self.sims)

    def _device_back(self, device: str | None) -> Recovered:
        """Recovery probe: the next observation of ``device`` (any of ours if None) from now."""
        since = time.monotonic()

        async def recovered() -> None:
            await self.shared.hospital.arrival_from(
                since, self.sims if device is None else {device})
        return recovered

    async def sigkill(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        await asyncio.to_thread(self.process.restart)
        return self._device_back(None), 0.0

    async def unplug(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        sim = self.sims["ventilator"]
        sim.kill()
        await asyncio.sleep(args.settle)
        await asyncio.to_thread(sim.start)
        return self._device_back("ventilator"), args.settle

    async def stall(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        process = self.sims["oximeter"].proc
        assert process is not None
        process.send_signal(signal.SIGSTOP)  # the device hangs with its line open
        try:
            await asyncio.sleep(args.settle)
        finally:
            process.send_signal(signal.SIGCONT)
        return self._device_back("oximeter"), args.settle

    async def noisy_line(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        sim = self.sims["urine-astm"]
        sim.kill()
        await asyncio.to_thread(sim.start, "--corrupt-rate", "0.003", "--drop-rate", "0.003",
                                "--seed", "7")
        await asyncio.sleep(args.settle * 2)
        sim.kill()
        await asyncio.to_thread(sim.start)
        return self._device_back("urine-astm"), args.settle * 2

    async def disk_full(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        """The gateway may not write past the first 4 KiB of any file: SQLite gets EFBIG
        ("database or disk is full") on every commit, as on a full disk."""
        pid = self.process.pid
        assert pid is not None
        limits = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (DISK_FULL_BYTES, limits[1]))
        self._disk_full_injected += 1
        try:
            await asyncio.sleep(args.settle)
        finally:
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)
        return self._device_back(None), args.settle

    async def clock_jump(self, args: argparse.Namespace) -> tuple[Recovered, float]:
        sim = self.sims["urine-printout"]
        sim.kill()
        await asyncio.to_thread(sim.start, "--clock-offset", "3600")
        return self._device_back("urine-printout"), 0.0

    async def load(self) -> None:
        """The devices produce at their own (sped-up) pace: nothing to drive."""
        await asyncio.Event().wait()

    async def settle(self, timeout: float) -> None:
        """Nothing to bring to rest: the outbox drain that follows is the gateway's end."""

    async def check(self) -> list[Check]:
        log = self.process.log_text()
        store_failures = log.count("outbox store unavailable")
        checks = [Check(self.name, "daemon alive at the end", self.process.pid is not None,
                        f"pid {self.process.pid}")]
        if self._disk_full_injected:
            checks.append(Check(
                self.name, "disk-full fault bit (outbox store failures logged, retried)",
                store_failures > 0, f"{store_failures} failures logged over "
                f"{self._disk_full_injected} injections"))
        return checks
