"""CMS50 driver: hand-built byte vectors from protocols.md §6, then the driver against the
independent simulator in ``firmware_sim/cms50.py`` for both protocol generations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.cms50 import (
    FLAG_ARTEFACT,
    FLAG_FINGER_OUT,
    FLAG_PROBE_ERROR,
    FLAG_SEARCHING,
    Cms50Legacy,
    Cms50V46,
    LegacyFramer,
    OximeterSilent,
    PulseOximeter,
    V46Framer,
    command,
    decode_legacy_packet,
    decode_live_frame,
    probe_legacy,
    probe_v46,
    unstuff,
)
from drivers.measurement import Measurement
from drivers.serial_link import LinkError, SerialLink
from firmware_sim.cms50 import Cms50Simulator, Patient
from firmware_sim.link import Endpoint, Faults, SimulatorServer

FAST = 1 / 600  # ten times the device rate keeps the tests short


# -- byte vectors (protocols.md §6.1 / §6.2 tables) ----------------------------------------


def test_legacy_packet_fields() -> None:
    # sync|beep|strength 8, pleth 0x35, bar 5, PR 72, SpO2 97
    sample = decode_legacy_packet(bytes([0xC8, 0x35, 0x05, 0x48, 0x61]))
    assert (sample.spo2, sample.pulse_rate, sample.pleth, sample.beat) == (97, 72, 0x35, True)
    assert sample.flags == frozenset()


def test_legacy_pulse_rate_bit_7_lives_in_byte_2() -> None:
    sample = decode_legacy_packet(bytes([0x88, 0x10, 0x40, 0x02, 0x5F]))
    assert sample.pulse_rate == 130
    assert sample.spo2 == 95


def test_legacy_finger_out_blanks_values() -> None:
    sample = decode_legacy_packet(bytes([0x90, 0x00, 0x40, 0x7F, 0x7F]))
    assert sample.flags == {FLAG_FINGER_OUT}
    assert sample.spo2 is None and sample.pulse_rate is None


def test_legacy_searching_and_probe_error() -> None:
    assert FLAG_SEARCHING in decode_legacy_packet(bytes([0x80, 0, 0x20, 0x48, 0x61])).flags
    flags = decode_legacy_packet(bytes([0x80, 0, 0x10, 0x48, 0x61])).flags
    assert {FLAG_PROBE_ERROR, FLAG_ARTEFACT} <= flags


def test_implausible_values_are_flagged_as_artefact() -> None:
    sample = decode_legacy_packet(bytes([0x88, 0x10, 0x00, 0x05, 0x1E]))  # PR 5, SpO2 30
    assert sample.spo2 is None and sample.pulse_rate is None
    assert sample.flags == {FLAG_ARTEFACT}


def test_legacy_framer_resynchronises_after_garbage() -> None:
    good = bytes([0xC8, 0x35, 0x05, 0x48, 0x61])
    stream = b"\x01\x02\x03" + good[:3] + good + b"\x7f" + good
    framer = LegacyFramer()
    packets = [p for byte in stream for p in framer.feed(bytes([byte]))]
    assert packets == [good, good]
    assert framer.discarded == 3 + 3 + 1


def test_v46_command_bytes() -> None:
    assert command(0xA1) == bytes.fromhex("7D 81 A1 80 80 80 80 80 80")
    assert command(0xA6, 2) == bytes.fromhex("7D 81 A6 80 82 80 80 80 80")
    with pytest.raises(ValueError, match="0x01"):
        command(0x01)


def test_v46_live_frame_fields() -> None:
    frame = bytes([0x01, 0xE0, 0xC0, 0xB5, 0xB5, 0xC8, 0xE1, 0xFF, 0xFF])
    sample = decode_live_frame(frame)
    assert (sample.spo2, sample.pulse_rate, sample.pleth, sample.beat) == (97, 72, 0x35, True)
    assert sample.flags == frozenset()
    out = decode_live_frame(bytes([0x01, 0xE1, 0x80, 0x80, 0x80, 0xFF, 0xFF, 0xFF, 0xFF]))
    assert out.flags == {FLAG_FINGER_OUT} and out.spo2 is None
    searching = decode_live_frame(bytes([0x01, 0xE2, 0x80, 0x80, 0x80, 0xFF, 0xFF, 0xFF, 0xFF]))
    assert searching.flags == {FLAG_SEARCHING}


def test_v46_framer_resyncs_on_type_byte_and_skips_unknown_answers() -> None:
    live = bytes([0x01, 0xE0, 0xC0, 0xB5, 0xB5, 0xC8, 0xE1, 0xFF, 0xFF])
    hello_ack = bytes([0x0C, 0x80])
    stream = b"\xff\xfe" + live[:4] + hello_ack + live + b"\x7a\x80" + live
    framer = V46Framer()
    frames = [f for byte in stream for f in framer.feed(bytes([byte]))]
    assert frames == [hello_ack, live, live]
    assert framer.discarded == 2 + 4 + 2


def test_unstuff_restores_high_bits() -> None:
    assert unstuff(bytes([0x04, 0x82, 0xC1, 0xC2, 0x80])) == bytes([0x04, 0x82, 0x41, 0xC2, 0x00])


# -- driver against simulator -------------------------------------------------------------


@asynccontextmanager
async def oximeter(
    protocol: str,
    where: str = "tcp://127.0.0.1:0",
    faults: Faults | None = None,
    simulator: Cms50Simulator | None = None,
    **options: float,
) -> AsyncIterator[tuple[PulseOximeter, Cms50Simulator]]:
    sim = simulator or Cms50Simulator(protocol=protocol, every=FAST, patient=Patient(
        finger_out_every=0))
    driver_class = Cms50Legacy if protocol == "legacy" else Cms50V46
    async with (
        SimulatorServer(sim.handle, Endpoint.parse(where), faults) as server,
        SerialLink.open(server.address, driver_class.settings) as link,
    ):
        yield driver_class(link, **options), sim  # type: ignore[arg-type]


async def collect(driver: PulseOximeter, count: int) -> list[Measurement]:
    found: list[Measurement] = []
    async for measurement in driver.measurements():
        found.append(measurement)
        if len(found) == count:
            break
    return found


@pytest.mark.parametrize("where", ["tcp://127.0.0.1:0", "pty"])
@pytest.mark.parametrize("protocol", ["legacy", "v46"])
async def test_driver_reads_simulated_patient(protocol: str, where: str) -> None:
    async with oximeter(protocol, where) as (driver, _):
        measurements = await collect(driver, 3)
    for m in measurements:
        spo2, pulse = m.reading("spo2"), m.reading("pulse_rate")
        assert spo2 is not None and spo2.value is not None and 94 <= spo2.value <= 98
        assert spo2.unit == "%" and not spo2.flags
        assert pulse is not None and pulse.value is not None and 66 <= pulse.value <= 78
        assert m.device_kind == "cms50"
        (pleth,) = m.samples
        assert len(pleth.values) == 60 and max(pleth.values) - min(pleth.values) > 40


@pytest.mark.parametrize("protocol", ["legacy", "v46"])
async def test_finger_out_then_searching_episode_is_flagged(protocol: str) -> None:
    patient = Patient(finger_out_every=3, finger_out_for=2, searching_for=1)
    sim = Cms50Simulator(protocol=protocol, every=FAST, patient=patient)
    async with oximeter(protocol, simulator=sim) as (driver, _):
        measurements = await collect(driver, 6)
    flags = [m.readings[0].flags for m in measurements]
    values = [m.readings[0].value for m in measurements]
    # seconds 0-2 valid, 3-4 finger out, 5 searching
    assert flags[:3] == [frozenset()] * 3 and all(v is not None for v in values[:3])
    assert flags[3] == flags[4] == {FLAG_FINGER_OUT}
    assert flags[5] == {FLAG_SEARCHING}
    assert values[3:] == [None, None, None]
    assert measurements[3].readings[0].text == "no signal"


async def test_desaturation_episode_lowers_spo2() -> None:
    patient = Patient(spo2=95, finger_out_every=0, desaturation_every=2, desaturation_depth=10,
                      desaturation_for=3)
    sim = Cms50Simulator(protocol="v46", every=FAST, patient=patient)
    async with oximeter("v46", simulator=sim) as (driver, _):
        measurements = await collect(driver, 5)
    spo2 = [m.readings[0].value for m in measurements]
    assert all(v is not None for v in spo2)
    assert min(v for v in spo2 if v is not None) <= 88 < 93 <= spo2[0]  # type: ignore[operator]


async def test_v46_identify_reports_model_and_device_id() -> None:
    sim = Cms50Simulator(protocol="v46", every=FAST, device_id="AB12345")
    async with oximeter("v46", simulator=sim) as (driver, _):
        info = await driver.identify()
        assert (info.model, info.device_id) == ("CMS50D+", "AB12345")
        assert driver.device_id == "AB12345"
        (m,) = await collect(driver, 1)
        assert m.device_id == "AB12345"


async def test_v46_keepalives_keep_the_stream_going() -> None:
    sim = Cms50Simulator(protocol="v46", every=FAST, keepalive_timeout=0.5,
                         patient=Patient(finger_out_every=0))
    async with oximeter("v46", simulator=sim, keepalive_interval=0.1) as (driver, _):
        await collect(driver, 25)  # 2.5 s, five times the device's patience
    assert 0xAF in sim.commands
    assert sim.commands.count(0xA1) == 1, "the stream never stopped, so no restart was needed"


async def test_v46_watchdog_restarts_a_device_that_stopped_streaming() -> None:
    sim = Cms50Simulator(protocol="v46", every=FAST, keepalive_timeout=0.3,
                         patient=Patient(finger_out_every=0))
    async with oximeter(
        "v46", simulator=sim, keepalive_interval=60, silence_timeout=1.0
    ) as (driver, _):
        await collect(driver, 12)
    assert sim.commands.count(0xA1) >= 2


async def test_stalled_device_raises_oximeter_silent() -> None:
    faults = Faults()
    async with oximeter("legacy", faults=faults, silence_timeout=0.3) as (driver, _):
        faults.stall()
        with pytest.raises(OximeterSilent, match="no oximeter data"):
            await collect(driver, 1000)


async def test_unplugged_device_raises_link_error() -> None:
    faults = Faults()
    async with oximeter("v46", faults=faults) as (driver, _):
        with pytest.raises(LinkError, match="disconnected"):
            async for _ in driver.measurements():
                faults.disconnect()


@pytest.mark.parametrize("protocol", ["legacy", "v46"])
async def test_corrupted_line_loses_bytes_not_the_stream(protocol: str) -> None:
    faults = Faults(corrupt_rate=0.002, drop_rate=0.002, seed=7)
    async with oximeter(protocol, faults=faults) as (driver, _):
        measurements = await collect(driver, 10)
        assert driver.discarded_bytes > 0
    valid = [m.readings[0].value for m in measurements if not m.readings[0].flags]
    assert valid and all(v is not None and 35 <= v <= 100 for v in valid)


@pytest.mark.parametrize("protocol", ["legacy", "v46"])
async def test_probes_tell_the_generations_apart(protocol: str) -> None:
    sim = Cms50Simulator(protocol=protocol, every=FAST)
    async with SimulatorServer(sim.handle, Endpoint.parse("pty")) as server:
        legacy = await probe_legacy(server.address, answer_within=0.5)
        current = await probe_v46(server.address, answer_within=0.5)
    if protocol == "legacy":
        assert legacy is not None and current is None
    else:
        assert current is not None and current.model == "CMS50D+" and legacy is None


async def test_probe_of_unreachable_port_is_none() -> None:
    assert await probe_v46("socket://127.0.0.1:1", answer_within=0.2) is None
    assert await probe_legacy("/dev/does-not-exist", answer_within=0.2) is None


def test_driver_rejects_nonsense_options() -> None:
    with pytest.raises(ValueError, match="positive"):
        Cms50Legacy(SerialLink("socket://127.0.0.1:1"), window=0)


# -- arbitrary input (hypothesis) ----------------------------------------------------------

LEGACY_PACKET = bytes([0xC8, 0x35, 0x05, 0x48, 0x61])
LIVE_FRAME = bytes([0x01, 0xE0, 0xC0, 0xB5, 0xB5, 0xC8, 0xE1, 0xFF, 0xFF])


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=64), count=st.integers(min_value=1, max_value=4))
def test_legacy_framer_recovers_every_packet_after_any_garbage(garbage: bytes, count: int) -> None:
    framer = LegacyFramer()
    packets = framer.feed(garbage) + framer.feed(LEGACY_PACKET * count)
    assert packets[-count:] == [LEGACY_PACKET] * count
    for packet in packets:  # whatever garbage decodes to, it decodes without error
        sample = decode_legacy_packet(packet)
        assert sample.spo2 is None or 35 <= sample.spo2 <= 100


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=64), count=st.integers(min_value=1, max_value=4))
def test_v46_framer_recovers_every_frame_after_any_garbage(garbage: bytes, count: int) -> None:
    framer = V46Framer()
    frames = framer.feed(garbage) + framer.feed(LIVE_FRAME * count)
    assert frames[-count:] == [LIVE_FRAME] * count
    for frame in frames:
        if frame[0] == 0x01:
            sample = decode_live_frame(frame)
            assert sample.pulse_rate is None or 25 <= sample.pulse_rate <= 250
        else:
            unstuff(frame)


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=20))
def test_framers_are_indifferent_to_how_reads_split_the_stream(chunks: list[int]) -> None:
    stream = (LIVE_FRAME + bytes([0x0C, 0x80])) * 10
    framer, found, position = V46Framer(), [], 0
    for size in chunks * 20:
        found += framer.feed(stream[position:position + size])
        position += size
    found += framer.feed(stream[position:])
    assert found == [LIVE_FRAME, bytes([0x0C, 0x80])] * 10 and framer.discarded == 0
