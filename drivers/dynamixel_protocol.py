"""Dynamixel Protocol 2.0 packet codec (host side): framing, byte stuffing, CRC-16, parameters.

Pure functions, no I/O, so every byte the driver sends or accepts is checked against the
published golden vectors (docs/dynamixel.md, protocols.md §3.5) without a bus.

Packet layout (little-endian throughout)::

    instruction: FF FF FD 00 | ID | LEN_L LEN_H | INST        | PARAM... | CRC_L CRC_H
    status:      FF FF FD 00 | ID | LEN_L LEN_H | 0x55 | ERR  | PARAM... | CRC_L CRC_H

LEN counts the instruction byte, the (stuffed) parameters and the two CRC bytes; the CRC covers
everything from the first ``FF`` through the last stuffed parameter byte.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

HEADER = b"\xff\xff\xfd\x00"
BROADCAST_ID = 0xFE
MAX_ID = 0xFC
STATUS_INSTRUCTION = 0x55
ALERT_BIT = 0x80
_PREFIX_LEN = 7  # header(4) + id(1) + len(2)
_MAX_PACKET = 1024


class Instruction(enum.IntEnum):
    PING = 0x01
    READ = 0x02
    WRITE = 0x03
    REG_WRITE = 0x04
    ACTION = 0x05
    FACTORY_RESET = 0x06
    REBOOT = 0x08
    CLEAR = 0x10
    SYNC_READ = 0x82
    SYNC_WRITE = 0x83
    BULK_READ = 0x92
    BULK_WRITE = 0x93


class StatusErrorCode(enum.IntEnum):
    """Low 7 bits of a status packet's ERR byte."""

    NONE = 0
    RESULT_FAIL = 1
    INSTRUCTION_ERROR = 2
    CRC_ERROR = 3
    DATA_RANGE_ERROR = 4
    DATA_LENGTH_ERROR = 5
    DATA_LIMIT_ERROR = 6
    ACCESS_ERROR = 7


class DynamixelError(Exception):
    """Base class for everything the Dynamixel codec or driver reports."""


class PacketError(DynamixelError):
    """Bytes that are not a well-formed Protocol 2.0 packet (bad header, length, CRC)."""


class CrcMismatch(PacketError):
    """The packet's CRC does not match its contents (line noise)."""


def _make_crc_table() -> tuple[int, ...]:
    table = []
    for index in range(256):
        crc = index << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def crc16(data: bytes) -> int:
    """CRC-16/BUYPASS (poly 0x8005, init 0, unreflected), table-driven like the ROBOTIS SDK."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) ^ _CRC_TABLE[((crc >> 8) ^ byte) & 0xFF]) & 0xFFFF
    return crc


def stuff(payload: bytes) -> bytes:
    """Insert ``FD`` after every ``FF FF FD`` so a header cannot appear inside a packet."""
    return payload.replace(b"\xff\xff\xfd", b"\xff\xff\xfd\xfd")


def unstuff(payload: bytes) -> bytes:
    return payload.replace(b"\xff\xff\xfd\xfd", b"\xff\xff\xfd")


def encode_instruction(servo_id: int, instruction: int, params: bytes = b"") -> bytes:
    """One complete instruction packet for ``servo_id`` (or :data:`BROADCAST_ID`)."""
    if not 0 <= servo_id <= MAX_ID and servo_id != BROADCAST_ID:
        raise ValueError(f"servo id {servo_id} outside 0..{MAX_ID} (or broadcast {BROADCAST_ID})")
    body = stuff(bytes([instruction]) + params)
    if len(body) + 2 > _MAX_PACKET:
        raise ValueError(f"packet of {len(body) + 2} bytes exceeds {_MAX_PACKET}")
    packet = HEADER + bytes([servo_id]) + struct.pack("<H", len(body) + 2) + body
    return packet + struct.pack("<H", crc16(packet))


@dataclass(frozen=True)
class StatusPacket:
    servo_id: int
    error: int
    """The raw ERR byte: bit 7 = hardware alert, low 7 bits = :class:`StatusErrorCode`."""
    params: bytes

    @property
    def alert(self) -> bool:
        """The servo has a hardware error latched (read Hardware Error Status, address 70)."""
        return bool(self.error & ALERT_BIT)

    @property
    def code(self) -> StatusErrorCode:
        try:
            return StatusErrorCode(self.error & 0x7F)
        except ValueError:
            return StatusErrorCode.RESULT_FAIL


def find_header(buffer: bytes | bytearray) -> int:
    """Index of the first packet header in ``buffer``, or -1."""
    return bytes(buffer).find(HEADER)


def packet_length(prefix: bytes) -> int:
    """Total packet size announced by the first 7 bytes (header, ID, LEN)."""
    if len(prefix) < _PREFIX_LEN or prefix[:4] != HEADER:
        raise PacketError(f"not a packet header: {prefix[:_PREFIX_LEN].hex(' ')}")
    length = int(struct.unpack_from("<H", prefix, 5)[0])
    if not 3 <= length <= _MAX_PACKET:
        raise PacketError(f"implausible LEN {length} in {prefix.hex(' ')}")
    return _PREFIX_LEN + length


def decode_status(packet: bytes) -> StatusPacket:
    """Check and decode one complete status packet (CRC over the stuffed bytes, then unstuff)."""
    total = packet_length(packet[:_PREFIX_LEN])
    if len(packet) != total:
        raise PacketError(f"status packet is {len(packet)} bytes, LEN announces {total}")
    expected = crc16(packet[:-2])
    received = struct.unpack_from("<H", packet, total - 2)[0]
    if expected != received:
        raise CrcMismatch(f"CRC {received:04X} != computed {expected:04X} in {packet.hex(' ')}")
    body = unstuff(packet[_PREFIX_LEN:-2])
    if len(body) < 2 or body[0] != STATUS_INSTRUCTION:
        raise PacketError(f"not a status packet (instruction {body[:1].hex()}): {packet.hex(' ')}")
    return StatusPacket(packet[4], body[1], body[2:])


# Parameter builders: one per instruction, little-endian as the protocol requires.


def read_params(address: int, length: int) -> bytes:
    return struct.pack("<HH", address, length)


def write_params(address: int, data: bytes) -> bytes:
    return struct.pack("<H", address) + data


def sync_read_params(address: int, length: int, servo_ids: Iterable[int]) -> bytes:
    return struct.pack("<HH", address, length) + bytes(servo_ids)


def sync_write_params(address: int, length: int, data_by_id: Mapping[int, bytes]) -> bytes:
    parts = [struct.pack("<HH", address, length)]
    for servo_id, data in data_by_id.items():
        if len(data) != length:
            raise ValueError(f"sync write to id {servo_id}: {len(data)} bytes, expected {length}")
        parts.append(bytes([servo_id]) + data)
    return b"".join(parts)


def bulk_read_params(requests: Iterable[tuple[int, int, int]]) -> bytes:
    """``requests`` = (servo id, address, length) triples, each id at most once."""
    return b"".join(struct.pack("<BHH", servo_id, address, length)
                    for servo_id, address, length in requests)
