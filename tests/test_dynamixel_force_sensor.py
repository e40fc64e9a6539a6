"""The probe load cell: MLC1 line protocol both ends, and the shared probe/patient world."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.force_sensor import ForceSensor, ForceSensorError, parse_line
from drivers.serial_link import SerialLink
from firmware_sim import force as force_sim
from firmware_sim.dynamixel import HW_OVERLOAD, DynamixelSim
from firmware_sim.link import Endpoint, Faults, SimulatorServer
from firmware_sim.probe_world import PatientSurface, ProbeWorld

# docs/force-sensor.md test vector: 12.345 N, sequence 7, no flags
VECTOR = b"$F,7,12345,00*6C\r\n"


def test_line_vector_both_ends() -> None:
    assert force_sim.line("F,7,12345,00") == VECTOR
    assert parse_line(VECTOR) == ("F", ["7", "12345", "00"])


@pytest.mark.parametrize("bad", [b"F,7,12345,00*09\r\n", b"$F,7,12345,00*0A\r\n", b"$F*\r\n",
                                 b"$F,7,1*ZZ\r\n", b"\xff\xfe\r\n"])
def test_bad_lines_are_typed_errors(bad: bytes) -> None:
    with pytest.raises(ForceSensorError):
        parse_line(bad)


@contextlib.asynccontextmanager
async def sensor_rig(
    sim: force_sim.ForceSim, faults: Faults | None = None
) -> AsyncIterator[ForceSensor]:
    async with SimulatorServer(sim.serve, Endpoint.parse("pty"), faults) as server, \
            SerialLink.open(server.address) as link:
        sensor = ForceSensor(link)
        reader = asyncio.create_task(sensor.run())
        try:
            yield sensor
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, ForceSensorError):
                await reader


def constant(value: float) -> Callable[[], float]:
    return lambda: value


async def test_identify_tare_rate() -> None:
    async with sensor_rig(force_sim.ForceSim(constant(2.0), noise_n=0.0)) as sensor:
        assert await sensor.identify() == ("MLC1", "1.0", 100.0)
        assert (await sensor.wait_reading(1.0)).force_n == pytest.approx(2.0)
        assert await sensor.tare() == pytest.approx(2.0)
        await sensor.set_rate(500)
        reading = await sensor.wait_reading(1.0)
        reading = await sensor.wait_reading(1.0)  # the first may predate the tare
        assert reading.force_n == pytest.approx(0.0) and not reading.faulted
        with pytest.raises(ForceSensorError, match="BAD_RATE"):
            await sensor.set_rate(5000)


async def test_faults_are_flagged_and_garbage_is_counted() -> None:
    sim = force_sim.ForceSim(constant(1.0))
    faults = Faults(corrupt_rate=0.01, seed=3)
    async with sensor_rig(sim, faults) as sensor:
        async with asyncio.timeout(5):
            while sensor.bad_lines == 0:
                await sensor.wait_reading(1.0)
        faults.corrupt_rate = 0.0
        sim.bridge_fault = True
        async with asyncio.timeout(5):
            while not (await sensor.wait_reading(1.0)).faulted:
                pass
        assert sensor.latest is not None
        assert sensor.latest.flags & force_sim.FLAG_BRIDGE_FAULT


async def test_silent_sensor_is_reported() -> None:
    faults = Faults()
    async with sensor_rig(force_sim.ForceSim(constant(0.0)), faults) as sensor:
        await sensor.wait_reading(1.0)
        faults.stall()
        with pytest.raises(ForceSensorError, match="no reading"):
            for _ in range(200):  # lines already on their way may still arrive, then silence
                await sensor.wait_reading(0.2)


def test_world_contact_force_from_servo_angles() -> None:
    bus = DynamixelSim()
    world = ProbeWorld(bus.positions)
    tip, axis = world.tip_and_axis()
    assert tip == pytest.approx((0.0, 0.0, -0.20)) and axis == pytest.approx((0.0, 0.0, -1.0))
    assert world.contact_force()[0] == 0.0  # hanging 20 mm above the belly
    bus.servo(3).position = -1.0  # 30 mm down: 10 mm into the surface
    axial, vector = world.contact_force()
    assert axial == pytest.approx(1500 * 0.010)
    assert vector[2] > 0  # the body pushes back up
    bus.servo(4).position = 0.3  # tilting the probe reduces the axial share
    tilted, _ = world.contact_force()
    assert tilted < axial


async def test_force_sim_reads_the_shared_world() -> None:
    bus = DynamixelSim()
    world = ProbeWorld(bus.positions)
    sim = force_sim.ForceSim(lambda: world.contact_force()[0], noise_n=0.0)
    async with sensor_rig(sim) as sensor:
        assert (await sensor.wait_reading(1.0)).force_n == 0.0
        bus.servo(3).position = -1.2  # 16 mm into the surface
        await sensor.wait_reading(1.0)
        reading = await sensor.wait_reading(1.0)
        assert math.isclose(reading.force_n, 1500 * 0.016, abs_tol=0.01)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60))
def test_any_line_is_a_reading_or_a_typed_error(raw: bytes) -> None:
    with contextlib.suppress(ForceSensorError):
        parse_line(raw)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["F", "I", "T", "E", "X", ""]), max_size=4),
       st.lists(st.text(max_size=6), max_size=4))
def test_reader_counts_garbage_instead_of_raising(kinds: list[str], fields: list[str]) -> None:
    sensor = ForceSensor(SerialLink("socket://127.0.0.1:1"))
    body = ",".join(kinds + fields)
    sensor._handle(force_sim.line(body) if body.isascii() else b"$" + body.encode() + b"\r\n")
    assert sensor.latest is None or math.isfinite(sensor.latest.force_n)


def test_pressing_loads_the_servos_and_too_hard_overloads_z() -> None:
    now = [0.0]
    bus = DynamixelSim(clock=lambda: now[0])
    world = ProbeWorld(bus.positions)
    bus.loads = world.servo_loads
    bus.servo(3).position = -1.0  # 10 mm into the belly: 15 N up on the probe
    for servo in bus.servos:
        assert servo.write(64, b"\x01") == 0  # torque on, holding where it stands
    assert world.servo_loads() == pytest.approx([0, 0, -15 * 0.03, 0, 0], abs=1e-6)
    now[0] += 0.01
    bus.advance()
    current_units = _signed16(bus.servo(3).read(126, 2)[1])
    assert current_units * 2.69e-3 == pytest.approx(-0.45 / 1.78, rel=0.05)
    stiff = ProbeWorld(bus.positions, surface=PatientSurface(stiffness_n_per_m=20000.0))
    bus.loads = stiff.servo_loads  # 200 N: beyond what the Z servo can hold
    now[0] += 1.0
    bus.advance()
    assert bus.servo(3).hardware_error == 1 << HW_OVERLOAD and not bus.servo(3).torque_on
    assert all(s.hardware_error == 0 for s in bus.servos if s.servo_id != 3)


def _signed16(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True)
