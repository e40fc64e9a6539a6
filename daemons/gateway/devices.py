"""Device manager: one task per configured device, reconnecting with backoff (hot-plug), and
stale-data detection (no data for longer than expected → technical alert).

A device configured with ``port = "auto"`` waits for drivers/discovery.py to recognise it.
Every driver family exposes ``measurements()`` as an async iterator over a composed
:class:`~drivers.serial_link.SerialLink`; :data:`DRIVERS` says for each family how to open
its line and build the driver. A device that is unplugged surfaces as a link error: the runner
logs the transition once, waits (exponential backoff with jitter, capped) and opens the port
again, so plugging the device back in is all a patient has to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import structlog

from drivers.discovery import DiscoveryConfig, Found
from drivers.measurement import Measurement
from drivers.serial_link import SerialLink, SerialSettings
from medge.config import bounds
from medge.log import StateLog
from medge.settings import check_topic_level

DriverName = Literal["cms50", "cms50-legacy", "urine-astm", "urine-printout", "uroflow",
                     "modbus"]

ASTM_SETTINGS = SerialSettings(9600, 8, "N", 1)
PRINTOUT_SETTINGS = SerialSettings(9600, 8, "N", 1)
UROFLOW_SETTINGS = SerialSettings(115200, 8, "N", 1)
"""docs/uroflow.md: USB CDC, 115200 8N1 suggested."""
AUTO = "auto"
AUTO_DRIVERS = frozenset({"cms50", "cms50-legacy", "modbus"})
"""Drivers drivers/discovery.py can recognise on an unknown port (docs/discovery.md)."""
CONTINUOUS_DRIVERS = frozenset({"cms50", "cms50-legacy", "modbus"})
"""Streaming devices: their routine observations are thinned to ``obs_interval_s``."""


@dataclass(frozen=True)
class DeviceSection:
    name: str
    """Topic level and the name shown to the patient, e.g. ``oximeter``."""
    driver: DriverName
    port: str
    """A tty path (``/dev/serial/by-id/...``), a pty, or ``socket://HOST:PORT``."""
    serial: str = ""
    """The device's serial number when the driver cannot read it (pairing key KIND:SERIAL)."""
    map: Path | None = None
    """Register map (TOML) for ``modbus`` devices, e.g. config/ventilators/home-ventilator.toml."""
    clock_timezone: str = "UTC"
    """Zone of the device's own clock, for devices that report naive local times."""
    clock_skew_s: float = field(default=300.0, metadata=bounds(min=1))
    """Clock error above which observations are tagged ``clock-skew`` and a technical alert
    is raised (times are still kept and nothing is reordered)."""
    stale_warn_min: float = field(default=15.0, metadata=bounds(min=0.01))
    stale_urgent_min: float = field(default=30.0, metadata=bounds(min=0.01))
    obs_interval_s: float | None = field(default=None, metadata=bounds(min=0))
    """Publish a streaming device's values at most this often (default 60 s for oximeters
    and ventilators, every measurement otherwise); alert rules still see every sample."""
    pleth_every_s: float = field(default=300.0, metadata=bounds(min=0))
    """Attach a waveform snippet (pleth) at most this often; 0 = never."""
    reconnect_min_s: float = field(default=1.0, metadata=bounds(min=0.01, max=60))
    reconnect_max_s: float = field(default=30.0, metadata=bounds(min=0.01, max=3600))
    window_s: float = field(default=1.0, metadata=bounds(min=0.1, max=60))
    """Oximeter: seconds of 60 Hz samples summarised into one measurement."""

    def validate(self) -> None:
        check_topic_level("name", self.name)
        if not self.port:
            raise ValueError("port must name a tty, a pty or socket://HOST:PORT")
        if self.port == AUTO and self.driver not in AUTO_DRIVERS:
            raise ValueError(f"port = \"auto\" needs a protocol probe, which only "
                             f"{', '.join(sorted(AUTO_DRIVERS))} have; give this device's port "
                             "(its /dev/medge/... udev name)")
        if self.driver == "modbus":
            if self.map is None:
                raise ValueError("a modbus device needs map = \"<register map TOML>\"")
            from drivers.modbus_device import load_map

            load_map(self.map)  # a bad map stops start-up (ConfigError names file and key)
        if self.stale_urgent_min < self.stale_warn_min:
            raise ValueError("stale_urgent_min must be at least stale_warn_min")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be at least reconnect_min_s")
        try:
            ZoneInfo(self.clock_timezone)
        except (ValueError, KeyError):
            raise ValueError(f"clock_timezone {self.clock_timezone!r} is not an IANA zone")\
                from None

    @property
    def probe_name(self) -> str:
        """The discovery probe that finds this device (one probe per register map)."""
        return f"modbus:{self.name}" if self.driver == "modbus" else self.driver

    @property
    def publish_interval_s(self) -> float:
        if self.obs_interval_s is not None:
            return self.obs_interval_s
        return 60.0 if self.driver in CONTINUOUS_DRIVERS else 0.0


Opened = tuple[SerialSettings, Callable[[SerialLink], AsyncIterator[Measurement]]]


def open_driver(cfg: DeviceSection) -> Opened:
    """Line settings and a factory of the measurement stream for one configured device."""
    if cfg.driver in ("cms50", "cms50-legacy"):
        from drivers.cms50 import Cms50Legacy, Cms50V46, PulseOximeter

        oximeter_class: type[PulseOximeter] = Cms50V46 if cfg.driver == "cms50" else Cms50Legacy
        settings = Cms50V46.settings if cfg.driver == "cms50" else Cms50Legacy.settings

        async def oximetry(link: SerialLink) -> AsyncIterator[Measurement]:
            oximeter = oximeter_class(link, device_id=cfg.serial, window=cfg.window_s)
            await oximeter.identify()
            async for m in oximeter.measurements():
                yield m

        return settings, oximetry
    if cfg.driver == "urine-astm":
        from drivers.astm import AstmUrineAnalyzer

        return ASTM_SETTINGS, lambda link: AstmUrineAnalyzer(link).measurements()
    if cfg.driver == "urine-printout":
        from drivers.urine_printout import PrintoutUrineAnalyzer

        return PRINTOUT_SETTINGS, lambda link: PrintoutUrineAnalyzer(link).measurements()
    if cfg.driver == "uroflow":
        from drivers.uroflow import UroflowScale

        return UROFLOW_SETTINGS, lambda link: UroflowScale(link).measurements()
    from drivers.modbus_device import ModbusDevice, load_map

    assert cfg.map is not None  # validate() guarantees it
    register_map = load_map(cfg.map)
    return register_map.device.serial_settings, \
        lambda link: ModbusDevice(link, register_map, device_id=cfg.serial).measurements()


class PortFinder:
    """Runs discovery for the devices configured with ``port = "auto"`` and tells each one
    the port its driver was recognised on; a device that fails is forgotten, so the next scan
    probes its port afresh (docs/discovery.md)."""

    def __init__(self, auto_devices: list[DeviceSection], settings: DiscoveryConfig) -> None:
        from drivers.discovery import Discovery, standard_probes
        from drivers.modbus_device import load_map

        maps = {d.name: load_map(d.map) for d in auto_devices if d.map is not None}
        self.discovery = Discovery(standard_probes(maps), settings)
        self._found: dict[str, Found] = {}
        self._changed = asyncio.Condition()
        self._log = structlog.get_logger().bind(component="discovery")

    async def run(self) -> None:
        async for change in self.discovery.watch():
            name = change.found.driver
            self._log.info(f"device {change.kind}", driver=name, port=change.found.port.device)
            async with self._changed:
                if change.kind == "added":
                    self._found[name] = change.found
                elif self._found.get(name) == change.found:
                    del self._found[name]
                self._changed.notify_all()

    async def port_for(self, probe_name: str) -> tuple[str, str]:
        """Wait until discovery finds the device; its (port, device id from the probe)."""
        async with self._changed:
            await self._changed.wait_for(lambda: probe_name in self._found)
            found = self._found[probe_name]
        return found.port.device, found.identified.device_id if found.identified else ""

    def lost(self, probe_name: str) -> None:
        found = self._found.pop(probe_name, None)
        if found is not None:
            self.discovery.forget(found.key)


Sink = Callable[["DeviceRunner", Measurement], Awaitable[None]]
StateSink = Callable[["DeviceRunner", str, str], Awaitable[None]]


class DeviceRunner:
    """Reads one device for ever: open, stream, and on failure back off and reopen."""

    def __init__(self, cfg: DeviceSection, on_measurement: Sink, on_state: StateSink,
                 finder: PortFinder | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.finder = finder
        self.zone = ZoneInfo(cfg.clock_timezone)
        self._on_measurement = on_measurement
        self._on_state = on_state
        self._monotonic = monotonic
        self.connection = "starting"
        self._last_data_at = monotonic()
        """Monotonic time of the last measurement (or the start): stale-data detection must not
        fire, or stay silent, because the wall clock was stepped (NTP at boot on a box without
        a real-time clock steps it by hours)."""
        self.stale_level: Literal["ok", "warn", "urgent"] = "ok"
        self.measurements = 0
        self.serial = cfg.serial
        self._log = structlog.get_logger().bind(device=cfg.name, driver=cfg.driver)
        self._state_log = StateLog(self._log, "device")

    async def run(self) -> None:
        settings, stream = open_driver(self.cfg)
        delay = self.cfg.reconnect_min_s
        while True:
            port = self.cfg.port
            if self.finder is not None:
                await self._set_connection("searching", "")
                port, serial = await self.finder.port_for(self.cfg.probe_name)
                self.serial = self.serial or serial
            try:
                async with SerialLink.open(port, settings) as link:
                    await self._set_connection("connected", "")
                    async for m in stream(link):
                        delay = self.cfg.reconnect_min_s
                        self._last_data_at = self._monotonic()
                        self.measurements += 1
                        if m.device_id:
                            self.serial = m.device_id
                        await self._on_measurement(self, m)
                    raise ConnectionError("the measurement stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any driver failure means: reopen later
                await self._set_connection("lost", f"{type(exc).__name__}: {exc}")
                if self.finder is not None:
                    self.finder.lost(self.cfg.probe_name)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.cfg.reconnect_max_s)

    async def _set_connection(self, state: str, reason: str) -> None:
        previous, self.connection = self.connection, state
        self._state_log.set(state, level="warning" if state == "lost" else "info",
                            port=self.cfg.port, reason=reason or None)
        if previous != state:
            await self._on_state(self, previous, reason)

    def minutes_without_data(self) -> float:
        return (self._monotonic() - self._last_data_at) / 60

    def check_stale(self) -> Literal["ok", "warn", "urgent"] | None:
        """The new stale level if it changed since the last check, else None."""
        minutes = self.minutes_without_data()
        level: Literal["ok", "warn", "urgent"] = (
            "urgent" if minutes >= self.cfg.stale_urgent_min
            else "warn" if minutes >= self.cfg.stale_warn_min else "ok")
        if level == self.stale_level:
            return None
        self.stale_level = level
        return level


class DeviceManager:
    """Starts a runner per device (and discovery, if a device asks for it) and stops them."""

    def __init__(self, runners: list[DeviceRunner], finder: PortFinder | None = None) -> None:
        self.runners = runners
        self.finder = finder
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(r.run(), name=f"device-{r.cfg.name}")
                       for r in self.runners]
        if self.finder is not None:
            self._tasks.append(asyncio.create_task(self.finder.run(), name="discovery"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
