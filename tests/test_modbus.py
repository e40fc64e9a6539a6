"""Modbus RTU respiratory devices: CRC vectors (protocols.md §10.2), register-map loading and
value codecs, then the pymodbus-based driver against the independent simulator."""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest, WriteSingleRegisterRequest

from drivers.measurement import Measurement
from drivers.modbus_device import (
    ModbusDevice,
    ModbusDeviceException,
    ModbusError,
    ModbusFrameError,
    ModbusRtuClient,
    ModbusTimeout,
    RegisterMap,
    RegisterSpec,
    decode_value,
    encode_value,
    frame_gap,
    load_map,
    probe,
)
from drivers.serial_link import SerialLink
from firmware_sim import modbus_vent
from firmware_sim.cms50 import Cms50Simulator
from firmware_sim.link import (
    DeviceLink,
    Endpoint,
    Faults,
    Handler,
    HostDisconnected,
    SimulatorServer,
)
from firmware_sim.modbus_vent import (
    MapError,
    ModbusVentSimulator,
    Respiration,
    crc16,
    with_crc,
)
from medge.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
VENT_MAP = ROOT / "config/ventilators/home-ventilator.toml"
O2_MAP = ROOT / "config/ventilators/oxygen-concentrator.toml"

# ✅ golden vectors, protocols.md §10.2: request without CRC -> CRC bytes as sent
CRC_VECTORS = [
    ("01 03 00 00 00 0A", "C5 CD"),
    ("01 06 00 01 00 03", "98 0B"),
    ("11 03 00 6B 00 03", "76 87"),
]


# -- CRC ---------------------------------------------------------------------------------------


def test_crc_check_value_on_both_ends() -> None:
    assert crc16(b"123456789") == 0x4B37
    swapped = FramerRTU.compute_CRC(b"123456789")  # pymodbus returns it byte-swapped for sending
    assert swapped == 0x374B


@pytest.mark.parametrize(("request_hex", "crc_hex"), CRC_VECTORS)
def test_crc_vectors_simulator(request_hex: str, crc_hex: str) -> None:
    request = bytes.fromhex(request_hex)
    assert with_crc(request) == request + bytes.fromhex(crc_hex)
    assert crc16(request + bytes.fromhex(crc_hex)) == 0  # how the simulator checks a frame


def test_crc_vectors_driver_codec() -> None:
    framer = FramerRTU(DecodePDU(is_server=False))
    read = ReadHoldingRegistersRequest(address=0, count=10, dev_id=1)
    write = WriteSingleRegisterRequest(address=1, registers=[3], dev_id=1)
    read_17 = ReadHoldingRegistersRequest(address=0x6B, count=3, dev_id=0x11)
    frames = [framer.buildFrame(pdu) for pdu in (read, write, read_17)]
    assert frames == [bytes.fromhex(r + c) for r, c in CRC_VECTORS]


# -- register maps and value codecs ------------------------------------------------------------


@pytest.mark.parametrize("path", [VENT_MAP, O2_MAP])
def test_shipped_maps_load(path: Path) -> None:
    register_map = load_map(path)
    assert register_map.device.unit == 1
    assert any(r.kind == "alarm_bits" for r in register_map.registers)
    ModbusVentSimulator(path)  # and the simulator can serve every quantity in it


def write_map(tmp_path: Path, registers: str, device: str = "") -> Path:
    path = tmp_path / "map.toml"
    path.write_text(f'[device]\nmodel = "test"\n{device}\n{registers}', encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("registers", "key", "reason"),
    [
        ('[[registers]]\nquantity = "a"\naddress = 0\ntype = "int8"\n', "registers[0].type",
         "must be one of"),
        ('[[registers]]\nquantity = "a"\n', "registers[0].address", "required"),
        ('[[registers]]\nquantity = "a"\naddress = 70000\n', "registers[0].address", "at most"),
        ('[[registers]]\nquantity = "a"\naddress = 0\ntype = "float32"\n'
         '[[registers]]\nquantity = "b"\naddress = 1\n', "", "registers: b overlaps a"),
        ('[[registers]]\nquantity = "a"\naddress = 0\n[[registers]]\nquantity = "a"\n'
         'address = 1\n', "", "registers: quantity 'a' mapped twice"),
        ('[[registers]]\nquantity = "a"\naddress = 0\nkind = "alarm_bits"\n'
         '[[registers.alarms]]\nbit = 16\nname = "x"\n', "registers[0]", "beyond a uint16"),
        ('[[registers]]\nquantity = "a"\naddress = 0\n[[registers.alarms]]\nbit = 1\n'
         'name = "x"\n', "registers[0]", "kind is not alarm_bits"),
        ('[[registers]]\nquantity = "a"\naddress = 0\nscale = 0\n', "registers[0]", "scale"),
        ("", "registers", "required"),
    ],
)
def test_bad_map_names_file_key_and_reason(
    tmp_path: Path, registers: str, key: str, reason: str
) -> None:
    path = write_map(tmp_path, registers)
    with pytest.raises(ConfigError) as caught:
        load_map(path)
    assert caught.value.source == str(path)
    assert caught.value.key == key
    assert reason in caught.value.reason


def test_bad_device_settings(tmp_path: Path) -> None:
    path = write_map(tmp_path, '[[registers]]\nquantity = "a"\naddress = 0\n', "unit = 300")
    with pytest.raises(ConfigError, match=r"device\.unit: value must be at most 247"):
        load_map(path)


def spec(type_name: str, scale: float = 1.0) -> RegisterSpec:
    return RegisterSpec("q", 0, type=type_name, scale=scale)  # type: ignore[arg-type]


def test_decode_values_and_word_order() -> None:
    # 1.5 = 0x3FC00000; -1 as int16 = 0xFFFF; 100000 = 0x000186A0
    assert decode_value(spec("float32"), [0x3FC0, 0x0000], "big") == 1.5
    assert decode_value(spec("float32"), [0x0000, 0x3FC0], "little") == 1.5
    assert decode_value(spec("int16"), [0xFFFF], "big") == -1
    assert decode_value(spec("uint16"), [0xFFFF], "big") == 65535
    assert decode_value(spec("int32"), [0x0001, 0x86A0], "big") == 100000
    assert decode_value(spec("int32"), [0x86A0, 0x0001], "little") == 100000
    assert decode_value(spec("uint32"), [0xFFFF, 0xFFFE], "big") == 0xFFFFFFFE


def test_encode_values_for_writing() -> None:
    assert encode_value(spec("uint16", 0.1), 20.0, "big") == [200]
    assert encode_value(spec("int16", 0.1), -1.5, "big") == [0xFFF1]
    assert encode_value(spec("float32"), 1.5, "little") == [0x0000, 0x3FC0]
    with pytest.raises(ValueError, match="does not fit a uint16"):
        encode_value(spec("uint16", 0.1), 7000.0, "big")


def test_frame_gap_follows_the_serial_line_guide() -> None:
    assert frame_gap(9600) == pytest.approx(0.003646, abs=1e-6)
    assert frame_gap(19200) == pytest.approx(0.001823, abs=1e-6)
    assert frame_gap(38400) == frame_gap(115200) == 0.00175


def test_blocks_merge_contiguous_registers_and_respect_gaps() -> None:
    register_map = load_map(VENT_MAP)
    assert register_map.blocks() == [("holding", 100, 4), ("input", 0, 12)]
    sparse = RegisterMap(register_map.device, (
        RegisterSpec("a", 0), RegisterSpec("b", 3, type="float32"), RegisterSpec("c", 200),
    ))
    assert sparse.blocks() == [("input", 0, 1), ("input", 3, 2), ("input", 200, 1)]


# -- breathing model (deterministic, no I/O) ---------------------------------------------------


def test_breathing_cycle_reaches_ipap_and_epap_and_delivers_the_tidal_volume() -> None:
    model = Respiration()
    model.settings.update({"vent.set.resp_rate": 20.0, "vent.set.ipap": 18.0,
                           "vent.set.epap": 6.0})
    step = 0.001
    samples = [model.values(i * step)[0] for i in range(3000)]  # one breath = 3 s
    pressures = [s["vent.pressure"] for s in samples]
    assert 17.5 < max(pressures) <= 18.0 and 6.0 <= min(pressures) < 6.5
    inspired_l = sum(s["vent.flow"] for s in samples if s["vent.flow"] > 0) * step / 60
    assert inspired_l * 1000 == pytest.approx(samples[0]["vent.tidal_volume"], rel=0.02)


def test_disconnection_and_apnoea_raise_their_alarm_bits() -> None:
    model = Respiration(disconnect_every=10, disconnect_for=5, apnoea_every=100, apnoea_for=30)
    assert model.values(5)[1] == set()
    values, alarms = model.values(12)
    assert alarms == {"disconnection", "high_leak", "low_pressure", "low_minute_volume"}
    assert values["vent.leak"] > 100 and values["vent.pressure"] < 1
    values, alarms = model.values(108)
    assert alarms == {"apnoea", "low_minute_volume"} and values["vent.resp_rate"] == 0


# -- driver against the simulator --------------------------------------------------------------


@asynccontextmanager
async def ventilator(
    simulator: ModbusVentSimulator | None = None,
    where: str = "tcp://127.0.0.1:0",
    faults: Faults | None = None,
    map_path: Path = VENT_MAP,
    unit: int | None = None,
) -> AsyncIterator[tuple[ModbusDevice, ModbusVentSimulator]]:
    sim = simulator or ModbusVentSimulator(map_path, every=0.02)
    register_map = load_map(map_path)
    if unit is not None:
        device = replace(register_map.device, unit=unit, response_timeout=0.2, retries=1)
        register_map = replace(register_map, device=device)
    async with (
        SimulatorServer(sim.handle, Endpoint.parse(where), faults) as server,
        SerialLink.open(server.address, register_map.device.serial_settings) as link,
    ):
        yield ModbusDevice(link, register_map, device_id="VENT-1"), sim


def value(measurement: Measurement, quantity: str) -> float:
    reading = measurement.reading(quantity)
    assert reading is not None and reading.value is not None, quantity
    return reading.value


@pytest.mark.parametrize("where", ["tcp://127.0.0.1:0", "pty"])
async def test_poll_reads_every_mapped_value(where: str) -> None:
    async with ventilator(where=where) as (device, _):
        m = await device.poll()
    assert m.device_kind == "ventilator" and m.device_id == "VENT-1"
    assert value(m, "vent.peep") == 5.0 and value(m, "vent.pip") == 15.0
    assert value(m, "vent.resp_rate") == 16.0
    assert 430 <= value(m, "vent.tidal_volume") <= 470
    minute_volume = value(m, "vent.tidal_volume") * 16 / 1000
    assert value(m, "vent.minute_volume") == pytest.approx(minute_volume, abs=0.02)
    assert 5.0 <= value(m, "vent.pressure") <= 15.0
    alarms = m.reading("vent.alarms")
    assert alarms is not None and alarms.flags == frozenset() and alarms.text == "none"
    assert m.raw is not None and len(m.raw) == 2 * (4 + 12)
    peep = m.reading("vent.peep")
    assert peep is not None and peep.unit == "cm[H2O]"


async def test_writing_a_setting_changes_the_breathing() -> None:
    async with ventilator() as (device, sim):
        await device.write("vent.set.resp_rate", 22.5)
        m = await device.poll()
    assert value(m, "vent.set.resp_rate") == 22.5
    assert value(m, "vent.resp_rate") == 22.5
    assert sim.model.settings["vent.set.resp_rate"] == 22.5


async def test_writing_a_measured_value_is_refused_before_sending() -> None:
    async with ventilator() as (device, sim):
        with pytest.raises(ValueError, match="only holding"):
            await device.write("vent.peep", 3)
        with pytest.raises(KeyError, match=r"vent\.nope"):
            await device.write("vent.nope", 3)
        assert sim.requests == 0


async def test_disconnection_episode_shows_in_alarm_flags() -> None:
    model = Respiration(disconnect_every=0.1, disconnect_for=60)
    async with ventilator(ModbusVentSimulator(VENT_MAP, every=0.02, model=model)) as (device, _):
        async with asyncio.timeout(5):
            while True:
                m = await device.poll()
                alarms = m.reading("vent.alarms")
                assert alarms is not None
                if alarms.flags:
                    break
    assert alarms.flags == {"disconnection", "high_leak", "low_pressure", "low_minute_volume"}
    assert value(m, "vent.leak") == 120.0


async def test_forced_alarm_from_the_command_line() -> None:
    parser = argparse.ArgumentParser()
    modbus_vent.add_arguments(parser)
    handler = modbus_vent.create(parser.parse_args(["--alarm", "power_failure"]))
    register_map = load_map(VENT_MAP)
    async with (
        SimulatorServer(handler, Endpoint.parse("tcp://127.0.0.1:0")) as server,
        SerialLink.open(server.address) as link,
    ):
        m = await ModbusDevice(link, register_map).poll()
    alarms = m.reading("vent.alarms")
    assert alarms is not None and alarms.flags == {"power_failure"}


def test_unknown_forced_alarm_is_refused() -> None:
    parser = argparse.ArgumentParser()
    modbus_vent.add_arguments(parser)
    with pytest.raises(ValueError, match="--alarm tea_time: not in the map"):
        modbus_vent.create(parser.parse_args(["--alarm", "tea_time"]))


def test_simulator_refuses_a_map_it_cannot_fill(tmp_path: Path) -> None:
    path = write_map(tmp_path, '[[registers]]\nquantity = "vent.mood"\naddress = 0\n')
    with pytest.raises(MapError, match=r"vent\.mood"):
        ModbusVentSimulator(path)
    with pytest.raises(MapError, match="cannot use register map"):
        ModbusVentSimulator(tmp_path / "missing.toml")


async def test_oxygen_concentrator_map() -> None:
    async with ventilator(map_path=O2_MAP) as (device, _):
        m = await device.poll()
    assert m.device_kind == "oxygen-concentrator"
    assert 92.0 <= value(m, "o2.concentration") <= 94.0
    assert value(m, "o2.flow") == 2.0
    assert value(m, "o2.operating_hours") == 12345


async def test_measurements_poll_again_and_again() -> None:
    async with ventilator() as (device, sim):
        device.map = replace(device.map, device=replace(device.map.device, poll_interval=0.05))
        found = []
        async for m in device.measurements():
            found.append(m)
            if len(found) == 3:
                break
    assert sim.requests == 3 * 2  # two blocks per poll


async def test_illegal_address_is_a_typed_exception() -> None:
    async with ventilator() as (device, sim):
        with pytest.raises(ModbusDeviceException, match="exception 02 \\(illegal data address\\)"):
            await device.client.read_registers("input", 50, 2)
        with pytest.raises(ModbusDeviceException) as caught:
            await device.client.write_registers(0, [1])  # input registers are read-only
        assert caught.value.code == 2
        assert sim.requests == 2, "exception responses are answers: no retry"


async def test_bad_request_parameters_are_refused_before_sending() -> None:
    async with ventilator() as (device, sim):
        with pytest.raises(ModbusError, match="count"):
            await device.client.read_registers("input", 0, 0)
        assert sim.requests == 0


def test_simulator_answers_unknown_function_with_exception_01() -> None:
    sim = ModbusVentSimulator(VENT_MAP)
    assert sim.answer(bytes([1, 0x2B, 0x0E, 0x01])) == bytes([1, 0xAB, 0x01])
    assert sim.answer(bytes([1, 3, 0, 0, 0, 200])) == bytes([1, 0x83, 0x03])
    assert sim.answer(bytes([7, 3, 0, 0, 0, 1])) is None  # another unit's request
    assert sim.answer(bytes([0, 6, 0, 102, 0, 150])) is None  # broadcast: applied, not answered
    assert sim.model.settings["vent.set.resp_rate"] == 15.0


async def test_wrong_unit_times_out() -> None:
    async with ventilator(unit=2) as (device, sim):
        with pytest.raises(ModbusTimeout, match=r"unit 2: read .*no answer within 0\.2 s"):
            await device.poll()
        assert sim.requests == 0


async def test_stalled_device_times_out_after_retries() -> None:
    faults = Faults()
    async with ventilator(faults=faults, unit=1) as (device, _):
        faults.stall()
        with pytest.raises(ModbusTimeout):
            await device.poll()
        faults.stall(False)
        assert value(await device.poll(), "vent.peep") == 5.0


async def test_only_garbage_is_a_frame_error() -> None:
    faults = Faults(corrupt_rate=1.0, seed=3)
    async with ventilator(faults=faults, unit=1) as (device, _):
        with pytest.raises(ModbusFrameError, match="garbled"):
            await device.poll()
        assert device.client.garbage_bytes > 0


def answering(reply: Callable[[bytes], bytes]) -> Handler:
    """A scripted device: answers each request with ``reply(request)``."""

    async def handler(link: DeviceLink) -> None:
        try:
            while True:
                await link.write(reply(await link.read()))
        except HostDisconnected:
            pass

    return handler


async def test_garbage_before_the_answer_is_skipped() -> None:
    """The device's answer arrives after line noise; the driver hunts past it."""
    sim = ModbusVentSimulator(VENT_MAP)

    def noisy(request: bytes) -> bytes:
        reply = sim.answer(request[:-2])
        assert reply is not None
        return b"\x11\x22\xff\x01\x03" + with_crc(reply)

    register_map = load_map(VENT_MAP)
    async with (
        SimulatorServer(answering(noisy), Endpoint.parse("tcp://127.0.0.1:0")) as server,
        SerialLink.open(server.address) as link,
    ):
        device = ModbusDevice(link, register_map)
        m = await device.poll()
        assert device.client.garbage_bytes >= 5
    assert value(m, "vent.peep") == 5.0


async def test_half_frame_then_silence_is_a_frame_error() -> None:
    def truncating(request: bytes) -> bytes:
        return bytes([1, 4, 24, 0, 1])  # promises 24 bytes, sends 2

    register_map = load_map(VENT_MAP)
    async with (
        SimulatorServer(answering(truncating), Endpoint.parse("tcp://127.0.0.1:0")) as server,
        SerialLink.open(server.address) as link,
    ):
        device = ModbusDevice(link, register_map)
        device.client.response_timeout = 0.2
        with pytest.raises(ModbusFrameError):
            await device.poll()


async def test_probe_confirms_the_map_and_rejects_other_devices() -> None:
    register_map = load_map(VENT_MAP)
    sim = ModbusVentSimulator(VENT_MAP)
    async with SimulatorServer(sim.handle, Endpoint.parse("pty")) as server:
        assert await probe(server.address, register_map, 0.5) == register_map.device.model
    oximeter = Cms50Simulator(protocol="legacy", every=1 / 600)
    async with SimulatorServer(oximeter.handle, Endpoint.parse("pty")) as server:
        assert await probe(server.address, register_map, 0.3) is None


def test_nan_float_register_reads_as_no_value() -> None:
    from drivers.modbus_device import to_reading

    reading = to_reading(spec("float32"), [0x7FC0, 0x0000], "big")
    assert reading.value is None and reading.text == "no value"
    assert math.isnan(decode_value(spec("float32"), [0x7FC0, 0x0000], "big"))


# -- arbitrary input (hypothesis) --------------------------------------------------------------

ANSWER = with_crc(bytes([1, 4, 4, 0x00, 0x32, 0x01, 0xC2]))  # input registers 50, 450


def fresh_client() -> ModbusRtuClient:
    return ModbusRtuClient(SerialLink("socket://127.0.0.1:1"), 1)


@settings(max_examples=300, deadline=None)
@given(noise=st.binary(max_size=80))
def test_extract_never_fails_on_arbitrary_bytes(noise: bytes) -> None:
    for buffer in (bytearray(noise), bytearray(noise + ANSWER), bytearray(ANSWER + noise)):
        pdu = fresh_client().extract(buffer, 4)
        assert pdu is None or pdu.function_code & 0x7F == 4


@settings(max_examples=300, deadline=None)
@given(noise=st.lists(st.integers(min_value=0x80, max_value=0xFF), max_size=40).map(bytes))
def test_extract_hunts_past_line_noise(noise: bytes) -> None:
    client = fresh_client()
    pdu = client.extract(bytearray(noise + ANSWER), 4)
    assert pdu is not None and list(pdu.registers) == [50, 450]
    assert client.garbage_bytes == len(noise)
