"""Find which device sits on which serial port, and notice when one is unplugged or replugged.

USB VID:PID names the bridge chip, not the device (the CP210x in a CMS50 oximeter also sits in
scales), so it only orders the candidates: every port is confirmed by a protocol probe that
each driver supplies. A port can be pinned to a driver in config (no probe), devices are keyed
by their USB serial number so a replug on another ttyUSB name is the same device, and
:meth:`Discovery.watch` polls the enumeration to report arrivals and removals.

Enumeration reads sysfs the way pyserial's ``list_ports_linux`` does, with the sysfs and /dev
roots as parameters so tests can hand it a fake tree. Extra ports (ptys, ``socket://`` URLs of
simulators) can be listed in config. Details: docs/discovery.md.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from drivers import cms50, modbus_device
from drivers.modbus_device import RegisterMap
from medge.config import bounds
from medge.log import get_logger

log = get_logger(component="discovery")


@dataclass(frozen=True)
class Identified:
    """What a successful probe learnt about the device."""

    model: str
    device_id: str = ""


ProbeFunction = Callable[[str, float], Awaitable[Identified | None]]
"""``probe(url, answer_within)``: ``None`` when the port does not speak the protocol."""

USB_SERIAL_BRIDGES = frozenset({
    (0x10C4, 0xEA60),  # Silicon Labs CP210x
    (0x0403, 0x6001),  # FTDI FT232R
    (0x1A86, 0x7523),  # WCH CH340
    (0x1A86, 0x55D4),  # WCH CH9102
    (0x067B, 0x2303),  # Prolific PL2303
})
"""Bridges that USB-RS485 adapters for Modbus devices are commonly built on."""


@dataclass(frozen=True)
class PortInfo:
    """One serial port as enumeration found it."""

    device: str
    """What a driver opens: ``/dev/ttyUSB0``, a pty path or a ``socket://`` URL."""
    vid: int | None = None
    pid: int | None = None
    serial_number: str = ""
    manufacturer: str = ""
    product: str = ""
    location: str = ""
    """USB topology (``1-2``, ``1-2:1.0``): stable per physical socket, not per device."""

    @property
    def usb_id(self) -> tuple[int, int] | None:
        return (self.vid, self.pid) if self.vid is not None and self.pid is not None else None

    @property
    def key(self) -> str:
        """Identity that survives a replug on another port name: the USB serial number when
        the device has one, else the port itself."""
        if self.usb_id and self.serial_number:
            return f"usb:{self.vid:04x}:{self.pid:04x}:{self.serial_number}"
        return self.device


@dataclass(frozen=True)
class DriverProbe:
    """A driver's way to recognise its device on a port."""

    name: str
    usb_ids: frozenset[tuple[int, int]]
    """VID:PIDs this device is known to ship with: a hint that orders probes, nothing more."""
    probe: ProbeFunction


@dataclass(frozen=True)
class Found:
    port: PortInfo
    driver: str
    identified: Identified | None
    """``None`` for a pinned port, which is not probed."""

    @property
    def key(self) -> str:
        return self.port.key


@dataclass(frozen=True)
class Change:
    kind: Literal["added", "removed"]
    found: Found


@dataclass(frozen=True)
class Pin:
    """Bind a port (by path/URL, or by USB serial number) to a driver without probing."""

    driver: str = field(metadata=bounds(min=1))
    port: str = ""
    usb_serial: str = ""

    def validate(self) -> None:
        if bool(self.port) == bool(self.usb_serial):
            raise ValueError("a pin needs exactly one of port or usb_serial")

    def matches(self, port: PortInfo) -> bool:
        return port.device == self.port if self.port else port.serial_number == self.usb_serial


@dataclass(frozen=True)
class DiscoveryConfig:
    poll_interval: float = field(default=2.0, metadata=bounds(min=0.05))
    probe_timeout: float = field(default=2.0, metadata=bounds(min=0.05, max=30))
    probe_unknown_usb: bool = False
    """Also probe USB ports whose VID:PID no driver lists (slow; off by default)."""
    extra_ports: tuple[str, ...] = ()
    """Non-USB ports to consider too: ptys or ``socket://`` URLs (simulators, RS485 HATs)."""
    pins: tuple[Pin, ...] = ()


# -- enumeration -------------------------------------------------------------------------------


def _read(directory: Path, name: str) -> str:
    try:
        return (directory / name).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def enumerate_ports(sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> list[PortInfo]:
    """Serial ports with a hardware device behind them, USB ones with VID:PID and serial.

    Platform UARTs that exist on every PC (``ttyS0``…, subsystem ``platform``) and virtual
    terminals (no ``device`` link) are left out, as pyserial does.
    """
    ports: list[PortInfo] = []
    tty_class = sysfs / "class" / "tty"
    try:
        names = sorted(os.listdir(tty_class))
    except OSError:
        return ports
    for name in names:
        device_link = tty_class / name / "device"
        if not device_link.exists():
            continue
        device_path = device_link.resolve()
        subsystem = (device_path / "subsystem").resolve().name
        if subsystem == "platform":
            continue
        if not (dev / name).exists():
            continue  # sysfs saw it, udev has not created (or already removed) the node
        if subsystem == "usb-serial":
            interface = device_path.parent
        elif subsystem == "usb":
            interface = device_path
        else:
            ports.append(PortInfo(str(dev / name)))
            continue
        usb_device = interface.parent
        try:
            vid = int(_read(usb_device, "idVendor"), 16)
            pid = int(_read(usb_device, "idProduct"), 16)
        except ValueError:
            ports.append(PortInfo(str(dev / name)))
            continue
        interfaces = _read(usb_device, "bNumInterfaces")
        multi = interfaces.isdigit() and int(interfaces) > 1
        ports.append(PortInfo(
            device=str(dev / name), vid=vid, pid=pid,
            serial_number=_read(usb_device, "serial"),
            manufacturer=_read(usb_device, "manufacturer"), product=_read(usb_device, "product"),
            location=interface.name if multi else usb_device.name,
        ))
    return ports


# -- probes shipped with medge's drivers -------------------------------------------------------


def standard_probes(register_maps: Mapping[str, RegisterMap] | None = None) -> list[DriverProbe]:
    """The probes for medge's serial drivers, passive listeners first.

    A legacy CMS50 talks unasked, so listening costs nothing and sends no bytes that another
    device might misread; then the command-driven CMS50 model query (protocols.md §13); then
    one Modbus read per register map (``name -> map``).
    """
    probes = [
        DriverProbe("cms50-legacy", cms50.USB_IDS, _cms50_probe(cms50.probe_legacy)),
        DriverProbe("cms50", cms50.USB_IDS, _cms50_probe(cms50.probe_v46)),
    ]
    for name, register_map in (register_maps or {}).items():
        probe = _modbus_probe(register_map)
        probes.append(DriverProbe(f"modbus:{name}", USB_SERIAL_BRIDGES, probe))
    return probes


def _cms50_probe(
    probe: Callable[[str, float], Awaitable[cms50.DeviceInfo | None]],
) -> ProbeFunction:
    async def run(url: str, answer_within: float) -> Identified | None:
        info = await probe(url, answer_within)
        return Identified(info.model, info.device_id) if info else None

    return run


def _modbus_probe(register_map: RegisterMap) -> ProbeFunction:
    async def run(url: str, answer_within: float) -> Identified | None:
        model = await modbus_device.probe(url, register_map, answer_within)
        return Identified(model) if model else None

    return run


# -- discovery ---------------------------------------------------------------------------------


class Discovery:
    """Keeps the table of identified devices; ``scan`` once, or ``watch`` for hot-plug."""

    def __init__(
        self,
        probes: Iterable[DriverProbe],
        settings: DiscoveryConfig | None = None,
        *,
        sysfs: Path = Path("/sys"),
        dev: Path = Path("/dev"),
    ) -> None:
        self.probes = list(probes)
        self.settings = settings or DiscoveryConfig()
        self.sysfs = sysfs
        self.dev = dev
        self.found: dict[str, Found] = {}
        """Identified devices by :attr:`PortInfo.key`."""
        self.unidentified: set[str] = set()
        """Ports probed without success; probed again only after they disappear and return."""
        self.probe_failures = 0
        """Probes that raised instead of answering (driver bugs, odd ports): a health figure."""
        names = {p.name for p in self.probes}
        for pin in self.settings.pins:
            if pin.driver not in names:
                raise ValueError(f"pin {pin.port or pin.usb_serial}: unknown driver "
                                 f"{pin.driver!r} (known: {', '.join(sorted(names))})")

    def ports(self) -> list[PortInfo]:
        """Everything present now: enumerated USB/serial ports plus configured extra ports that
        exist (a pty path that vanished means the simulator or adapter is gone)."""
        ports = enumerate_ports(self.sysfs, self.dev)
        for extra in self.settings.extra_ports:
            if extra.startswith("socket://") or os.path.exists(extra):
                ports.append(PortInfo(extra))
        return ports

    def candidates(self, port: PortInfo) -> list[DriverProbe]:
        """Probes worth trying on ``port``: those whose VID:PID hint matches first."""
        if port.usb_id is None:
            return list(self.probes)
        hinted = [p for p in self.probes if port.usb_id in p.usb_ids]
        if self.settings.probe_unknown_usb:
            return hinted + [p for p in self.probes if p not in hinted]
        return hinted

    async def identify(self, port: PortInfo) -> Found | None:
        """Pinned driver, or the first probe that recognises the port."""
        for pin in self.settings.pins:
            if pin.matches(port):
                return Found(port, pin.driver, None)
        for candidate in self.candidates(port):
            try:
                identified = await candidate.probe(port.device, self.settings.probe_timeout)
            except Exception as exc:  # one driver's probe bug must not hide the other devices
                log.warning("probe failed", driver=candidate.name, port=port.device,
                            error=repr(exc))
                self.probe_failures += 1
                continue
            if identified is not None:
                return Found(port, candidate.name, identified)
        return None

    async def scan(self) -> list[Change]:
        """One enumeration: probe ports not seen before, drop devices that are gone."""
        present = {port.key: port for port in self.ports()}
        changes: list[Change] = []
        for key, known in list(self.found.items()):
            if present.get(key) != known.port:  # gone, or back on another port name
                changes.append(Change("removed", self.found.pop(key)))
        self.unidentified &= set(present)
        new = [p for k, p in present.items() if k not in self.found and k not in self.unidentified]
        results = await asyncio.gather(*(self.identify(port) for port in new))
        for port, found in zip(new, results, strict=True):
            if found is None:
                self.unidentified.add(port.key)
                continue
            self.found[port.key] = found
            changes.append(Change("added", found))
        return changes

    async def watch(self) -> AsyncIterator[Change]:
        """Scan every ``poll_interval`` seconds and yield each arrival and removal."""
        while True:
            for change in await self.scan():
                yield change
            await asyncio.sleep(self.settings.poll_interval)

    def forget(self, key: str) -> None:
        """A driver lost its device: let the next scan identify the port afresh."""
        self.found.pop(key, None)
        self.unidentified.discard(key)
