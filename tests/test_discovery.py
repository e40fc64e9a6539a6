"""Discovery: sysfs enumeration on a fake tree, VID:PID hints, pins, probes against simulators
on ptys (the probe decides which driver a port speaks), and unplug/replug."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from drivers.discovery import (
    USB_SERIAL_BRIDGES,
    Change,
    Discovery,
    DiscoveryConfig,
    DriverProbe,
    Identified,
    Pin,
    PortInfo,
    enumerate_ports,
    standard_probes,
)
from drivers.modbus_device import load_map
from firmware_sim.cms50 import Cms50Simulator
from firmware_sim.link import Endpoint, SimulatorServer
from firmware_sim.modbus_vent import ModbusVentSimulator
from medge.config import ConfigError, from_mapping

ROOT = Path(__file__).resolve().parent.parent
VENT_MAP = ROOT / "config/ventilators/home-ventilator.toml"
O2_MAP = ROOT / "config/ventilators/oxygen-concentrator.toml"
CP210X = (0x10C4, 0xEA60)
CH340 = (0x1A86, 0x7523)


class FakeSystem:
    """A sysfs tree and /dev directory in tmp_path, laid out as Linux does for USB serial."""

    def __init__(self, root: Path) -> None:
        self.sysfs = root / "sys"
        self.dev = root / "dev"
        self.dev.mkdir(parents=True)
        for bus in ("usb-serial", "usb", "platform", "pnp"):
            (self.sysfs / "bus" / bus).mkdir(parents=True)
        (self.sysfs / "class" / "tty").mkdir(parents=True)
        self._socket = 0

    def _tty(self, name: str, device_dir: Path, bus: str, target: str | None) -> None:
        device_dir.mkdir(parents=True, exist_ok=True)
        (device_dir / "subsystem").symlink_to(self.sysfs / "bus" / bus)
        entry = self.sysfs / "class" / "tty" / name
        entry.mkdir()
        (entry / "device").symlink_to(device_dir)
        if target is None:
            (self.dev / name).touch()
        else:
            (self.dev / name).symlink_to(target)

    def plug_usb(self, name: str, usb_id: tuple[int, int], serial: str = "",
                 target: str | None = None, acm: bool = False) -> None:
        self._socket += 1
        usb = self.sysfs / "devices" / "usb1" / f"1-{self._socket}"
        usb.mkdir(parents=True)
        files = {"idVendor": f"{usb_id[0]:04x}", "idProduct": f"{usb_id[1]:04x}",
                 "manufacturer": "Silicon Labs", "product": "CP2102 USB to UART",
                 "bNumInterfaces": " 1"}
        if serial:
            files["serial"] = serial
        for file_name, text in files.items():
            (usb / file_name).write_text(text + "\n")
        interface = usb / f"1-{self._socket}:1.0"
        if acm:
            self._tty(name, interface, "usb", target)
        else:
            self._tty(name, interface / name, "usb-serial", target)

    def plug_other(self, name: str, bus: str) -> None:
        self._tty(name, self.sysfs / "devices" / bus / name, bus, None)

    def unplug(self, name: str) -> None:
        entry = self.sysfs / "class" / "tty" / name
        (entry / "device").unlink()
        entry.rmdir()
        (self.dev / name).unlink()


@pytest.fixture
def system(tmp_path: Path) -> FakeSystem:
    return FakeSystem(tmp_path)


# -- enumeration -------------------------------------------------------------------------------


def test_enumeration_reads_usb_identity_and_skips_platform_and_virtual_ttys(
    system: FakeSystem,
) -> None:
    system.plug_usb("ttyUSB0", CP210X, serial="0001A2")
    system.plug_usb("ttyACM0", (0x2341, 0x0043), serial="ACM9", acm=True)
    system.plug_other("ttyS0", "platform")
    system.plug_other("ttyS4", "pnp")
    (system.sysfs / "class" / "tty" / "tty1").mkdir()  # virtual terminal: no device link
    ports = enumerate_ports(system.sysfs, system.dev)
    assert ports == [
        PortInfo(str(system.dev / "ttyACM0"), 0x2341, 0x0043, "ACM9", "Silicon Labs",
                 "CP2102 USB to UART", "1-2"),
        PortInfo(str(system.dev / "ttyS4")),
        PortInfo(str(system.dev / "ttyUSB0"), 0x10C4, 0xEA60, "0001A2", "Silicon Labs",
                 "CP2102 USB to UART", "1-1"),
    ]


def test_port_without_dev_node_is_not_listed_yet(system: FakeSystem) -> None:
    system.plug_usb("ttyUSB0", CP210X, serial="X")
    (system.dev / "ttyUSB0").unlink()  # udev has not created the node yet
    assert enumerate_ports(system.sysfs, system.dev) == []


def test_missing_sysfs_gives_no_ports(tmp_path: Path) -> None:
    assert enumerate_ports(tmp_path / "nothing", tmp_path) == []


def test_identity_key_prefers_the_usb_serial_number() -> None:
    assert PortInfo("/dev/ttyUSB3", 0x10C4, 0xEA60, "0001A2").key == "usb:10c4:ea60:0001A2"
    assert PortInfo("/dev/ttyUSB3", 0x10C4, 0xEA60).key == "/dev/ttyUSB3"
    assert PortInfo("socket://127.0.0.1:7000").key == "socket://127.0.0.1:7000"


# -- hints, pins, bookkeeping (fake probes: no I/O) --------------------------------------------


class Recorder:
    """Fake probes that answer for the ports listed and record every call."""

    def __init__(self, answers: dict[str, set[str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str]] = []

    def probe(self, name: str, usb_ids: frozenset[tuple[int, int]]) -> DriverProbe:
        async def run(url: str, answer_within: float) -> Identified | None:
            self.calls.append((name, url))
            return Identified(f"{name} model") if url in self.answers.get(name, set()) else None

        return DriverProbe(name, usb_ids, run)


async def test_vid_pid_hint_orders_candidates_and_unknown_usb_is_skipped(
    system: FakeSystem,
) -> None:
    system.plug_usb("ttyUSB0", CP210X, serial="A")
    system.plug_usb("ttyUSB1", (0x1234, 0x5678), serial="B")
    usb0 = str(system.dev / "ttyUSB0")
    recorder = Recorder({"scale": {usb0}})
    probes = [recorder.probe("oximeter", frozenset({CP210X})),
              recorder.probe("modbus", frozenset({CH340})),
              recorder.probe("scale", frozenset({CP210X}))]
    discovery = Discovery(probes, sysfs=system.sysfs, dev=system.dev)
    changes = await discovery.scan()
    assert [(c.kind, c.found.driver) for c in changes] == [("added", "scale")]
    assert recorder.calls == [("oximeter", usb0), ("scale", usb0)], "VID:PID decides the order"
    assert changes[0].found.identified == Identified("scale model")


async def test_probe_unknown_usb_tries_every_driver(system: FakeSystem) -> None:
    system.plug_usb("ttyUSB1", (0x1234, 0x5678), serial="B")
    recorder = Recorder({})
    probes = [recorder.probe("oximeter", frozenset({CP210X})),
              recorder.probe("modbus", frozenset({CH340}))]
    discovery = Discovery(probes, DiscoveryConfig(probe_unknown_usb=True),
                          sysfs=system.sysfs, dev=system.dev)
    assert await discovery.scan() == []
    assert [name for name, _ in recorder.calls] == ["oximeter", "modbus"]


async def test_unidentified_port_is_not_probed_again_until_replugged(system: FakeSystem) -> None:
    system.plug_usb("ttyUSB0", CP210X, serial="A")
    recorder = Recorder({})
    discovery = Discovery([recorder.probe("oximeter", frozenset({CP210X}))],
                          sysfs=system.sysfs, dev=system.dev)
    await discovery.scan()
    await discovery.scan()
    assert len(recorder.calls) == 1
    system.unplug("ttyUSB0")
    await discovery.scan()
    system.plug_usb("ttyUSB0", CP210X, serial="A")
    await discovery.scan()
    assert len(recorder.calls) == 2


async def test_pins_bind_ports_without_probing(system: FakeSystem) -> None:
    system.plug_usb("ttyUSB0", CP210X, serial="PINNED")
    recorder = Recorder({})
    settings = DiscoveryConfig(
        extra_ports=("socket://127.0.0.1:9",),
        pins=(Pin("modbus", usb_serial="PINNED"), Pin("oximeter", port="socket://127.0.0.1:9")),
    )
    discovery = Discovery([recorder.probe("oximeter", frozenset({CP210X})),
                           recorder.probe("modbus", frozenset())],
                          settings, sysfs=system.sysfs, dev=system.dev)
    changes = await discovery.scan()
    assert recorder.calls == []
    assert sorted((c.found.port.device, c.found.driver, c.found.identified) for c in changes) == [
        (str(system.dev / "ttyUSB0"), "modbus", None),
        ("socket://127.0.0.1:9", "oximeter", None),
    ]


async def test_a_probe_that_raises_does_not_stop_discovery(system: FakeSystem) -> None:
    system.plug_usb("ttyUSB0", CP210X, serial="A")
    usb0 = str(system.dev / "ttyUSB0")

    async def broken(url: str, answer_within: float) -> Identified | None:
        raise RuntimeError("driver bug")

    recorder = Recorder({"oximeter": {usb0}})
    discovery = Discovery([DriverProbe("broken", frozenset({CP210X}), broken),
                           recorder.probe("oximeter", frozenset({CP210X}))],
                          sysfs=system.sysfs, dev=system.dev)
    (added,) = await discovery.scan()
    assert added.found.driver == "oximeter"
    assert discovery.probe_failures == 1


def test_pin_to_unknown_driver_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown driver 'nonin'"):
        Discovery([], DiscoveryConfig(pins=(Pin("nonin", port="/dev/ttyUSB0"),)))


def test_pin_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"pins\[0\]: a pin needs exactly one of port"):
        from_mapping({"pins": [{"driver": "cms50"}]}, DiscoveryConfig)
    with pytest.raises(ConfigError, match=r"pins\[0\]\.driver: required key is missing"):
        from_mapping({"pins": [{"port": "/dev/ttyUSB0"}]}, DiscoveryConfig)
    with pytest.raises(ConfigError, match=r"poll_interval: value must be at least"):
        from_mapping({"poll_interval": 0}, DiscoveryConfig)


def test_standard_probes_list_every_map() -> None:
    probes = standard_probes({"vent": load_map(VENT_MAP)})
    assert [p.name for p in probes] == ["cms50-legacy", "cms50", "modbus:vent"]
    assert probes[2].usb_ids == USB_SERIAL_BRIDGES


# -- probes against simulators on ptys ---------------------------------------------------------


async def test_probes_tell_which_driver_each_pty_speaks(system: FakeSystem) -> None:
    devices = {
        "ttyUSB0": (CP210X, Cms50Simulator(protocol="legacy", every=1 / 600).handle),
        "ttyUSB1": (CP210X, Cms50Simulator(protocol="v46", every=1 / 600,
                                           device_id="OX77").handle),
        "ttyUSB2": (CH340, ModbusVentSimulator(VENT_MAP).handle),
        "ttyUSB3": (CH340, ModbusVentSimulator(O2_MAP).handle),
    }
    probes = standard_probes({"ventilator": load_map(VENT_MAP),
                              "concentrator": load_map(O2_MAP)})
    async with AsyncExitStack() as stack:
        for index, (name, (usb_id, handler)) in enumerate(devices.items()):
            server = await stack.enter_async_context(SimulatorServer(handler, Endpoint("pty")))
            system.plug_usb(name, usb_id, serial=f"SN{index}", target=server.address)
        discovery = Discovery(probes, DiscoveryConfig(probe_timeout=0.5),
                              sysfs=system.sysfs, dev=system.dev)
        changes = await discovery.scan()
    found = {Path(c.found.port.device).name: c.found for c in changes}
    assert {name: f.driver for name, f in found.items()} == {
        "ttyUSB0": "cms50-legacy", "ttyUSB1": "cms50",
        "ttyUSB2": "modbus:ventilator", "ttyUSB3": "modbus:concentrator",
    }
    assert found["ttyUSB1"].identified == Identified("CMS50D+", "OX77")


async def next_changes(watch: AsyncIterator[Change], count: int) -> list[Change]:
    return [await anext(watch) for _ in range(count)]


async def test_unplug_and_replug_on_another_port_name(system: FakeSystem) -> None:
    """Start a simulator, detect it, close it, detect the removal, restart it, detect it
    again: as the same device (USB serial number) although it came back as ttyUSB1."""
    probes = standard_probes()
    discovery = Discovery(probes, DiscoveryConfig(poll_interval=0.05, probe_timeout=0.5),
                          sysfs=system.sysfs, dev=system.dev)
    watch = discovery.watch()
    sim = Cms50Simulator(protocol="v46", every=1 / 600, device_id="OX1")
    async with SimulatorServer(sim.handle, Endpoint("pty")) as server:
        system.plug_usb("ttyUSB0", CP210X, serial="0001", target=server.address)
        (added,) = await next_changes(watch, 1)
    assert added.kind == "added" and added.found.driver == "cms50"
    system.unplug("ttyUSB0")
    (removed,) = await next_changes(watch, 1)
    assert removed.kind == "removed" and removed.found == added.found
    assert discovery.found == {}
    async with SimulatorServer(sim.handle, Endpoint("pty")) as server:
        system.plug_usb("ttyUSB1", CP210X, serial="0001", target=server.address)
        (again,) = await next_changes(watch, 1)
    await watch.aclose()
    assert again.kind == "added" and again.found.key == added.found.key == "usb:10c4:ea60:0001"
    assert again.found.port.device == str(system.dev / "ttyUSB1")


async def test_simulator_pty_in_extra_ports_disappears_when_closed() -> None:
    sim = ModbusVentSimulator(VENT_MAP)
    server = SimulatorServer(sim.handle, Endpoint("pty"))
    address = await server.start()
    discovery = Discovery(standard_probes({"vent": load_map(VENT_MAP)}),
                          DiscoveryConfig(extra_ports=(address,), probe_timeout=0.5),
                          sysfs=Path("/nonexistent"))
    try:
        (added,) = await discovery.scan()
        assert (added.kind, added.found.driver) == ("added", "modbus:vent")
    finally:
        await server.close()
    (removed,) = await discovery.scan()
    assert removed.kind == "removed"


async def test_replug_between_two_scans_is_reported_as_removed_then_added(
    system: FakeSystem,
) -> None:
    recorder = Recorder({"oximeter": {str(system.dev / "ttyUSB0"), str(system.dev / "ttyUSB1")}})
    discovery = Discovery([recorder.probe("oximeter", frozenset({CP210X}))],
                          sysfs=system.sysfs, dev=system.dev)
    system.plug_usb("ttyUSB0", CP210X, serial="S")
    await discovery.scan()
    system.unplug("ttyUSB0")
    system.plug_usb("ttyUSB1", CP210X, serial="S")
    changes = await discovery.scan()
    assert [(c.kind, Path(c.found.port.device).name) for c in changes] == [
        ("removed", "ttyUSB0"), ("added", "ttyUSB1")]


async def test_forget_lets_the_next_scan_probe_again(system: FakeSystem) -> None:
    recorder = Recorder({"oximeter": {str(system.dev / "ttyUSB0")}})
    discovery = Discovery([recorder.probe("oximeter", frozenset({CP210X}))],
                          sysfs=system.sysfs, dev=system.dev)
    system.plug_usb("ttyUSB0", CP210X, serial="S")
    (added,) = await discovery.scan()
    discovery.forget(added.found.key)
    assert [c.kind for c in await discovery.scan()] == ["added"]
    assert len(recorder.calls) == 2


# -- udev rules --------------------------------------------------------------------------------

RULE_KEY = re.compile(
    r'(?P<key>[A-Z_]+(\{[A-Za-z0-9_]+\})?)\s*(?P<op>==|!=|\+=|-=|:=|=)\s*"(?P<value>[^"]*)"'
)
MATCH_KEYS = {"ACTION", "SUBSYSTEM", "SUBSYSTEMS", "KERNEL", "ATTRS", "ENV", "DRIVERS"}
ASSIGN_KEYS = {"GOTO", "LABEL", "IMPORT", "SYMLINK", "GROUP", "MODE", "ENV", "TAG", "OWNER"}


def test_udev_rules_are_well_formed() -> None:
    """No udevadm in CI: check every rule line is comma-separated KEY op "value" with keys
    and operators udev knows, and that every GOTO has its LABEL."""
    text = (ROOT / "config/udev/99-medge.rules").read_text(encoding="utf-8")
    labels, gotos = set(), set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(", ")]
        for part in parts:
            match = RULE_KEY.fullmatch(part)
            assert match, f"line {number}: cannot parse {part!r}"
            key = match["key"].split("{")[0]
            known = MATCH_KEYS if match["op"] in ("==", "!=") else ASSIGN_KEYS
            assert key in known, f"line {number}: {key} {match['op']} is not a udev key"
            if key == "LABEL":
                labels.add(match["value"])
            if key == "GOTO":
                gotos.add(match["value"])
    assert gotos <= labels
    assert 'SYMLINK+="medge/usb-$env{ID_VENDOR_ID}-$env{ID_MODEL_ID}-$env{ID_SERIAL_SHORT}"' in text
