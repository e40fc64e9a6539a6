"""Round trips between the two independent codecs (simulator encodes, driver decodes), and
resynchronisation: garbage before a valid frame never costs that frame."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import astm_link, cms50, dynamixel_protocol, grbl_protocol, uroflow
from drivers.modbus_device import ModbusRtuClient
from drivers.serial_link import SerialLink
from firmware_sim import astm_urine, modbus_vent
from firmware_sim import cms50 as cms50_sim
from firmware_sim import dynamixel as dynamixel_sim
from firmware_sim import uroflow as uroflow_sim
from firmware_sim.grbl_machine import GrblMachine

FAST = settings(max_examples=100, deadline=None, derandomize=True)
ASTM_TEXT = st.binary(min_size=1, max_size=600).map(
    lambda b: bytes(c for c in b if c not in astm_link.RESTRICTED and c != 0x0D) or b"x")


@FAST
@given(st.integers(0, 252), st.integers(0, 255), st.binary(max_size=80))
def test_dynamixel_status_packet_round_trip(servo_id: int, error: int, params: bytes) -> None:
    packet = dynamixel_sim.status_packet(servo_id, error, params)
    decoded = dynamixel_protocol.decode_status(packet)
    assert (decoded.servo_id, decoded.error, decoded.params) == (servo_id, error, params)
    assert dynamixel_protocol.crc16(packet[:-2]) == dynamixel_sim.crc16(packet[:-2])


@FAST
@given(st.integers(0, 252), st.binary(max_size=40).filter(lambda b: b"\xff" not in b))
def test_dynamixel_header_found_after_garbage(servo_id: int, garbage: bytes) -> None:
    packet = dynamixel_sim.status_packet(servo_id, 0, b"\x01")
    data = garbage + packet
    start = dynamixel_protocol.find_header(data)
    assert dynamixel_protocol.decode_status(data[start:]).servo_id == servo_id


def modbus_client() -> ModbusRtuClient:
    return ModbusRtuClient(SerialLink("socket://127.0.0.1:9"), unit=1)


@FAST
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=60))
def test_modbus_read_response_round_trip(registers: list[int]) -> None:
    body = struct.pack(f">BBB{len(registers)}H", 1, 3, 2 * len(registers), *registers)
    pdu = modbus_client().extract(bytearray(modbus_vent.with_crc(body)), 3)
    assert pdu is not None and list(pdu.registers) == registers


@FAST
@given(st.lists(ASTM_TEXT, min_size=1, max_size=6), st.booleans())
def test_astm_frames_round_trip(texts: list[bytes], per_record: bool) -> None:
    records = [text + b"\r" for text in texts]
    frames = astm_urine.build_frames(records, one_record_per_frame=per_record)
    decoded = [astm_link.decode_frame(frame) for frame in frames]
    assert b"".join(f.text for f in decoded) == b"".join(records)
    assert [f.number for f in decoded] == [(i + 1) % 8 for i in range(len(frames))]
    assert all(len(frame) <= astm_link.MAX_FRAME for frame in frames)
    assert decoded[-1].final


GRAMS = st.floats(-5000, 5000, allow_nan=False).map(lambda g: round(g, 1))


@FAST
@given(st.integers(0, 2**32 - 1), GRAMS)
def test_uroflow_weight_line_round_trip(tick: int, grams: float) -> None:
    sample = uroflow.parse_line(uroflow_sim.nmea_line(f"UFW,{tick},{grams}"))
    assert sample == uroflow.WeightSample(tick, grams)


VITALS = st.builds(cms50_sim.Vitals, spo2=st.integers(35, 100), pulse=st.integers(25, 250),
                   pleth=st.integers(0, 100), beat=st.booleans(), finger_out=st.just(False),
                   searching=st.just(False))


@FAST
@given(VITALS, st.binary(max_size=64))
def test_cms50_v46_frames_decode_after_any_garbage(vitals: cms50_sim.Vitals,
                                                   garbage: bytes) -> None:
    frame = cms50_sim.encode_v46_live(vitals)
    frames = cms50.V46Framer().feed(garbage + frame)
    sample = cms50.decode_live_frame(cms50.unstuff(frames[-1]))
    assert frames[-1] == frame
    assert (sample.spo2, sample.pulse_rate, sample.pleth) == (
        vitals.spo2, min(vitals.pulse, 0x7E), vitals.pleth)


@FAST
@given(VITALS, st.binary(max_size=64))
def test_cms50_legacy_packets_decode_after_any_garbage(vitals: cms50_sim.Vitals,
                                                       garbage: bytes) -> None:
    packet = cms50_sim.encode_legacy(vitals)
    packets = cms50.LegacyFramer().feed(garbage + packet)
    sample = cms50.decode_legacy_packet(packets[-1])
    assert packets[-1] == packet
    assert (sample.spo2, sample.pulse_rate) == (vitals.spo2, vitals.pulse)


@FAST
@given(st.integers(0, 255), st.booleans(), st.integers(0, 128))
def test_grbl_status_reports_of_the_simulator_parse(mask: int, unlocked: bool, rx: int) -> None:
    machine = GrblMachine()
    assert machine.execute_line(f"$10={mask}") == ["ok"]
    if unlocked:
        machine.execute_line("$X")
    for _ in range(12):  # WCO and overrides come every few reports
        report = machine.status_report(rx)
        assert report is not None
        status = grbl_protocol.parse_status(report)
        assert status.state == report[1:].split("|")[0].split(":")[0]
        assert (status.mpos or status.wpos) == machine.motor_position_mm()
