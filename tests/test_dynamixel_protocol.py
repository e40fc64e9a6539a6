"""Golden vectors (protocols.md §3.5, copied here) against both codecs, separately.

The driver codec (drivers.dynamixel_protocol) must produce the instruction bytes and decode the
status bytes; the simulator (firmware_sim.dynamixel), an independent implementation, must parse
the instruction bytes and answer with exactly the status bytes.
"""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import dynamixel_protocol as proto
from drivers.dynamixel import ticks_to_rad
from drivers.dynamixel_protocol import Instruction, StatusErrorCode
from firmware_sim import dynamixel as sim


def h(text: str) -> bytes:
    return bytes.fromhex(text)


PING = h("FF FF FD 00 01 03 00 01 19 4E")
PING_STATUS = h("FF FF FD 00 01 07 00 55 00 06 04 26 65 5D")  # model 1030, firmware 38
READ_POS = h("FF FF FD 00 01 07 00 02 84 00 04 00 1D 15")
READ_POS_STATUS = h("FF FF FD 00 01 08 00 55 00 A6 00 00 00 8C C0")  # 166
WRITE_GOAL = h("FF FF FD 00 01 09 00 03 74 00 00 02 00 00 CA 89")  # 512
WRITE_STATUS = h("FF FF FD 00 01 04 00 55 00 A1 0C")
SYNC_WRITE = h("FF FF FD 00 FE 11 00 83 74 00 04 00 01 96 00 00 00 02 AA 00 00 00 82 87")
SYNC_READ = h("FF FF FD 00 FE 09 00 82 84 00 04 00 01 02 CE FA")
BULK_READ = h("FF FF FD 00 FE 0D 00 92 01 90 00 02 00 02 92 00 01 00 1A 05")
BULK_STATUS_ID1 = h("FF FF FD 00 01 06 00 55 00 77 00 C3 69")  # 119 (11.9 V)
ACTION = h("FF FF FD 00 01 03 00 05 02 CE")
REBOOT = h("FF FF FD 00 01 03 00 08 2F 4E")


@pytest.mark.parametrize("crc", [proto.crc16, sim.crc16], ids=["driver", "simulator"])
def test_crc_check_value(crc: object) -> None:
    assert callable(crc)
    assert crc(b"123456789") == 0xFEE8


# --- driver codec -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "servo_id", "instruction", "params"),
    [
        (PING, 1, Instruction.PING, b""),
        (READ_POS, 1, Instruction.READ, proto.read_params(132, 4)),
        (WRITE_GOAL, 1, Instruction.WRITE, proto.write_params(116, (512).to_bytes(4, "little"))),
        (SYNC_WRITE, 0xFE, Instruction.SYNC_WRITE, proto.sync_write_params(
            116, 4, {1: (150).to_bytes(4, "little"), 2: (170).to_bytes(4, "little")})),
        (SYNC_READ, 0xFE, Instruction.SYNC_READ, proto.sync_read_params(132, 4, [1, 2])),
        (BULK_READ, 0xFE, Instruction.BULK_READ, proto.bulk_read_params([(1, 144, 2),
                                                                         (2, 146, 1)])),
        (ACTION, 1, Instruction.ACTION, b""),
        (REBOOT, 1, Instruction.REBOOT, b""),
    ],
)
def test_driver_encodes_golden_instructions(
    packet: bytes, servo_id: int, instruction: Instruction, params: bytes
) -> None:
    assert proto.encode_instruction(servo_id, instruction, params) == packet


def test_driver_decodes_golden_status_packets() -> None:
    ping = proto.decode_status(PING_STATUS)
    assert (ping.servo_id, ping.code, ping.alert) == (1, StatusErrorCode.NONE, False)
    assert int.from_bytes(ping.params[:2], "little") == 1030 and ping.params[2] == 38
    assert int.from_bytes(proto.decode_status(READ_POS_STATUS).params, "little") == 166
    assert proto.decode_status(WRITE_STATUS).params == b""
    assert int.from_bytes(proto.decode_status(BULK_STATUS_ID1).params, "little") == 119


def test_driver_rejects_corrupted_status() -> None:
    damaged = bytearray(READ_POS_STATUS)
    damaged[9] ^= 0x01
    with pytest.raises(proto.CrcMismatch, match="CRC"):
        proto.decode_status(bytes(damaged))
    with pytest.raises(proto.PacketError, match="LEN"):
        proto.decode_status(READ_POS_STATUS[:-1])
    with pytest.raises(proto.PacketError, match="not a status"):
        proto.decode_status(READ_POS)  # an instruction, not a status


def test_alert_bit_and_error_code() -> None:
    packet = proto.encode_instruction(1, 0x55, bytes([0x80 | 7]))  # a status-shaped packet
    status = proto.decode_status(packet)
    assert status.alert and status.code is StatusErrorCode.ACCESS_ERROR


def test_byte_stuffing_round_trip_and_length() -> None:
    data = b"\xff\xff\xfd\x01\xff\xff\xfd"
    packet = proto.encode_instruction(3, Instruction.WRITE, proto.write_params(224, data))
    assert packet.count(b"\xff\xff\xfd\xfd") == 2
    assert int.from_bytes(packet[5:7], "little") == len(packet) - 7
    # the simulator parses it back to the original bytes
    (parsed,) = sim.PacketReader().feed(packet)
    assert parsed.crc_ok and parsed.params == proto.write_params(224, data)


def test_bad_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="servo id 253"):
        proto.encode_instruction(253, Instruction.PING)
    with pytest.raises(ValueError, match="expected 4"):
        proto.sync_write_params(116, 4, {1: b"\x00"})


# --- simulator codec ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "servo_id", "instruction", "params"),
    [
        (PING, 1, 0x01, b""),
        (READ_POS, 1, 0x02, h("84 00 04 00")),
        (SYNC_WRITE, 0xFE, 0x83, h("74 00 04 00 01 96 00 00 00 02 AA 00 00 00")),
        (SYNC_READ, 0xFE, 0x82, h("84 00 04 00 01 02")),
        (BULK_READ, 0xFE, 0x92, h("01 90 00 02 00 02 92 00 01 00")),
        (REBOOT, 1, 0x08, b""),
    ],
)
def test_simulator_parses_golden_instructions(
    packet: bytes, servo_id: int, instruction: int, params: bytes
) -> None:
    reader = sim.PacketReader()
    assert reader.feed(packet[:5]) == []  # partial packets wait for the rest
    (parsed,) = reader.feed(packet[5:])
    assert parsed == sim.Packet(servo_id, instruction, params, crc_ok=True)


def golden_bus() -> sim.DynamixelSim:
    """Servo 1 shaped like the reference capture: XM430-W210 (1030), firmware 38, at 166 ticks."""
    bus = sim.DynamixelSim([1, 2], clock=lambda: 0.0)
    servo = bus.servo(1)
    servo.put(0, 2, 1030)
    servo.put(6, 1, 38)
    servo.position = ticks_to_rad(166)
    servo.table[9] = 0  # return delay
    return bus


def replies(bus: sim.DynamixelSim, packet: bytes) -> list[bytes]:
    (parsed,) = sim.PacketReader().feed(packet)
    return [reply for reply, _delay in bus.handle(parsed)]


def test_simulator_answers_golden_status_packets() -> None:
    bus = golden_bus()
    assert replies(bus, PING) == [PING_STATUS]
    assert replies(bus, READ_POS) == [READ_POS_STATUS]
    assert replies(bus, WRITE_GOAL) == [WRITE_STATUS]
    assert bus.servo(1).get(116, 4) == 512


def test_simulator_sync_write_is_silent_and_applies() -> None:
    bus = golden_bus()
    assert replies(bus, SYNC_WRITE) == []
    assert (bus.servo(1).get(116, 4), bus.servo(2).get(116, 4)) == (150, 170)


def test_simulator_bulk_read_status_for_id1() -> None:
    bus = golden_bus()
    bus.servo(1).input_voltage_v = 11.9
    first, second = replies(bus, BULK_READ)
    assert first == BULK_STATUS_ID1
    assert proto.decode_status(second).servo_id == 2


def test_simulator_answers_crc_error_and_ignores_garbled_broadcast() -> None:
    bus = golden_bus()
    damaged = PING[:-1] + bytes([PING[-1] ^ 0xFF])
    (reply,) = replies(bus, damaged)
    assert proto.decode_status(reply).code is StatusErrorCode.CRC_ERROR
    damaged_sync = SYNC_READ[:-1] + b"\x00"
    assert replies(bus, damaged_sync) == []


def test_unit_conversions() -> None:
    assert ticks_to_rad(2048) == 0.0
    assert math.isclose(ticks_to_rad(4096), math.pi)


# --- bad input of every kind --------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_driver_decoder_raises_only_typed_errors(data: bytes) -> None:
    with contextlib.suppress(proto.PacketError):
        proto.decode_status(proto.HEADER + data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFE), st.integers(0, 0xFF), st.binary(max_size=40))
def test_simulator_survives_any_instruction(servo_id: int, instruction: int, params: bytes) -> None:
    bus = golden_bus()
    packet = proto.encode_instruction(servo_id if servo_id <= 0xFC else 0xFE, instruction, params)
    for reply in replies(bus, packet):
        status = proto.decode_status(reply)  # every answer is a well-formed status packet
        assert status.servo_id in (1, 2)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_simulator_parser_skips_noise(noise: bytes) -> None:
    reader = sim.PacketReader()
    reader.feed(noise)
    reader.buffer.clear()  # whatever the noise left half-parsed, a fresh packet still parses
    assert [p.instruction for p in reader.feed(PING)] == [0x01]


def test_simulator_reports_malformed_requests() -> None:
    bus = golden_bus()
    short_read = proto.encode_instruction(1, Instruction.READ, b"\x84\x00")
    beyond_table = proto.encode_instruction(1, Instruction.READ, proto.read_params(250, 10))
    unknown = proto.encode_instruction(1, 0x7F)
    for packet, code in ((short_read, StatusErrorCode.DATA_LENGTH_ERROR),
                         (beyond_table, StatusErrorCode.DATA_LENGTH_ERROR),
                         (unknown, StatusErrorCode.INSTRUCTION_ERROR)):
        (reply,) = replies(bus, packet)
        assert proto.decode_status(reply).code is code
