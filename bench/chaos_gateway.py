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

End to end for the two urine analyzers (discrete results the device deletes once delivered):
each simulator logs every strip it handed over (``--handed-over-log``), and every one must be
among the observations the hospital subscriber received from that device (see
``unreached_strips``) — the outbox accounting alone starts counting after the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.gateway import gateway_toml
from bench.parts import Check, DaemonProcess, Fault, Recovered, Shared, Sim
from medge.runtime import outbox_path

REPO = Path(__file__).resolve().parent.parent
VENT_MAP = REPO / "config" / "ventilators" / "home-ventilator.toml"
DISK_FULL_BYTES = 4096
"""No file of the gateway may grow past this while the disk is "full" (its outbox is larger)."""
URINE_DEVICES = ("urine-astm", "urine-printout")
STRIPS_IN_FLIGHT_S = 15.0
"""At the check, how long a strip handed over just before may take to reach the hospital."""


@dataclass(frozen=True)
class HandedOver:
    """One line of a urine simulator's ``--handed-over-log``."""

    strip: int
    """The analyzer's number (restarts at 1 with the simulator)."""
    wire: str
    """The device time as the wire showed it."""
    device_time: datetime
    """``wire`` read as UTC (the gateway's default ``clock_timezone`` for naive device times)."""


def read_handed_over(path: Path) -> list[HandedOver]:
    """The strips a simulator handed over, in order; none if it never wrote the log; a line a
    killed simulator left half-written is skipped."""
    if not path.exists():
        return []
    strips = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = json.loads(line)
            moment = datetime.strptime(entry["device_time"], entry["time_format"])
            strips.append(HandedOver(int(entry["strip"]), entry["device_time"],
                                     moment.replace(tzinfo=UTC)))
    return strips


def unreached_strips(handed_over: Sequence[HandedOver],
                     received: Mapping[tuple[str, str], int]) -> list[HandedOver]:
    """The handed-over strips missing from what the hospital received from the device.

    The key is the device's own clock, which the gateway carries unchanged in every
    Observation (the device-clock extension; ``effectiveDateTime`` is corrected by the
    estimated clock offset, so a device clock jump moves it): ``received`` counts distinct
    observations per (device time, code), the hospital's ``device_times[device]``. A strip
    has one observation per pad, so the strips received at a device time are the most
    observations of any one code there. The strip's number does not survive into the
    Observation, and strips can share a device time (the Consult 120 prints minutes; an
    analyzer that fell behind dates a batch at once), so strips are matched by count per
    device time: the ones beyond what arrived are reported, in log order. A strip the gateway
    stored twice (an ASTM session re-sent after its last ACK was lost) counts twice: it could
    hide a loss only at the same device time."""
    strips_at: Counter[datetime] = Counter()
    for (stamp, _code), count in received.items():
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(stamp)
            strips_at[moment] = max(strips_at[moment], count)
    missing = []
    for strip in handed_over:
        if strips_at[strip.device_time] > 0:
            strips_at[strip.device_time] -= 1
        else:
            missing.append(strip)
    return missing


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
        for device in URINE_DEVICES:  # in the sim's args: kept when a fault restarts it
            sim = self.sims[device]
            sim.args = (*sim.args, "--handed-over-log", str(self.handed_over_log(device)))
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

    def handed_over_log(self, device: str) -> Path:
        return self.state / f"handed-over-{device}.jsonl"

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
        checks.append(await self.strips_check())
        return checks

    async def strips_check(self) -> Check:
        """Every strip the urine analyzers had handed over when the check began reached the
        hospital (waiting up to ``STRIPS_IN_FLIGHT_S`` for the last ones)."""
        handed = {device: read_handed_over(self.handed_over_log(device))
                  for device in URINE_DEVICES}
        deadline = time.monotonic() + STRIPS_IN_FLIGHT_S
        while True:
            missing = {device: unreached_strips(
                strips, self.shared.hospital.device_times.get(device, Counter()))
                for device, strips in handed.items()}
            if not any(missing.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        parts = []
        for device, strips in handed.items():
            lost = missing[device]
            text = f"{device} {len(strips) - len(lost)}/{len(strips)} reached"
            if lost:
                first = ", ".join(f"#{s.strip} ({s.wire})" for s in lost[:5])
                text += f", {len(lost)} missing: {first}{', ...' if len(lost) > 5 else ''}"
            parts.append(text)
        return Check(self.name, "every urine strip the analyzers handed over reached the hospital",
                     not any(missing.values()), "; ".join(parts))
