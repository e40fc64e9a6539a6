"""Five XM430 servos on one half-duplex Dynamixel Protocol 2.0 bus (the probe manipulator).

The servo side, written independently of ``drivers/``: its own CRC (the bitwise form), byte
stuffing and packet parser. Each :class:`SimServo` has a 256-byte control table with the XM430
layout and access rules (read-only registers and the EEPROM area while torque is on → Access
Error; goals outside the position limits → Data Limit Error), Return Delay Time and Status
Return Level, position control along a trapezoidal profile (Profile Velocity/Acceleration),
first-order thermal model, latched hardware errors (overload, overheating) that switch torque
off until a Reboot, and the Bus Watchdog (address 98, 20 ms units): host silent → hard stop,
register reads -1 and goal writes fail with Data Range Error until 98 is written 0.

:class:`DynamixelSim` holds the bus; ``serve(link)`` is the :mod:`firmware_sim.link` handler,
``run()`` advances physics in real time and records a :class:`MotionSample` log for tests;
``--motion-log PATH`` also writes the motion to a file (:class:`MotionLogFile`) for a checker in
another process (bench/chaos_robot.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_sim.force import ForceSim
from firmware_sim.link import (
    DeviceLink,
    Endpoint,
    Faults,
    Handler,
    HostDisconnected,
    SimulatorServer,
)
from firmware_sim.probe_world import ProbeWorld

HELP = "five Dynamixel XM430 servos (Protocol 2.0) of the ultrasound probe manipulator"

_HEADER = bytes((0xFF, 0xFF, 0xFD, 0x00))
_BROADCAST = 0xFE
_STATUS = 0x55
_ALERT = 0x80

# error codes (status packet ERR low bits)
RESULT_FAIL, INSTRUCTION_ERROR, CRC_ERROR, DATA_RANGE, DATA_LENGTH, DATA_LIMIT, ACCESS = range(1, 8)

# hardware error status bits (address 70)
HW_INPUT_VOLTAGE, HW_OVERHEATING, HW_ENCODER, HW_ELECTRICAL_SHOCK, HW_OVERLOAD = 0, 2, 3, 4, 5

MODEL_XM430_W350 = 1020
FIRMWARE = 46
TICKS_PER_TURN = 4096
RPM_UNIT = 0.229
ACCEL_UNIT_REV_MIN2 = 214.577
CURRENT_UNIT_MA = 2.69
MOTOR_MAX_ACCEL_RAD_S2 = 150.0  # what "profile 0" (unlimited) amounts to on a real motor
STALL_TORQUE_NM = 4.1
TORQUE_CONSTANT_NM_PER_A = 1.78  # 4.1 N·m at 2.3 A stall
OVERLOAD_TIME_S = 0.4
AMBIENT_C = 30.0
THERMAL_TIME_CONSTANT_S = 120.0
HEATING_C_PER_A2 = 25.0  # steady-state rise per A² of current

UART_FIFO_BYTES = 128
"""Host bytes the servos' UART holds: a servo handles packets as they arrive and loses what
overruns its receive buffer. A simulator process that falls behind (SIGSTOP, a starved CPU)
finds seconds of host packets queued in its TCP socket instead; executing them late would move
the simulated robot long after the host sent the goals, which no RS-485 bus can do, so only the
newest ``UART_FIFO_BYTES`` of a backlog are kept (an overrun, counted)."""

_TABLE_SIZE = 256
_EEPROM_END = 64
_READ_ONLY = set(range(0, 7)) | {70} | set(range(120, 148))
_WATCHDOG_ADDR = 98
_GOAL_AREA = range(100, 120)  # Goal PWM .. Goal Position (incl. profiles), locked after a trip


def crc16(data: bytes) -> int:
    """Bitwise CRC-16 (poly 0x8005, init 0, unreflected), as protocols.md §3.2 gives it."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def status_packet(servo_id: int, error: int, params: bytes = b"") -> bytes:
    body = bytearray([_STATUS, error]) + params
    stuffed = bytes(body).replace(b"\xff\xff\xfd", b"\xff\xff\xfd\xfd")
    packet = _HEADER + bytes([servo_id]) + struct.pack("<H", len(stuffed) + 2) + stuffed
    return packet + struct.pack("<H", crc16(packet))


@dataclass(frozen=True)
class Packet:
    servo_id: int
    instruction: int
    params: bytes
    crc_ok: bool


class PacketReader:
    """Accumulates host bytes and yields instruction packets (noise before a header is skipped)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        self.buffer += data
        packets: list[Packet] = []
        while True:
            start = self.buffer.find(_HEADER)
            if start < 0:
                del self.buffer[: max(0, len(self.buffer) - 3)]
                return packets
            del self.buffer[:start]
            if len(self.buffer) < 7:
                return packets
            length = self.buffer[5] | self.buffer[6] << 8
            if length < 3 or length > 1024:
                del self.buffer[:1]
                continue
            if len(self.buffer) < 7 + length:
                return packets
            raw = bytes(self.buffer[: 7 + length])
            del self.buffer[: 7 + length]
            crc_ok = crc16(raw[:-2]) == (raw[-2] | raw[-1] << 8)
            body = raw[7:-2].replace(b"\xff\xff\xfd\xfd", b"\xff\xff\xfd")
            packets.append(Packet(raw[4], body[0], body[1:], crc_ok))


def _signed(value: int, size: int) -> int:
    bits = 8 * size
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _ticks_to_rad(ticks: int) -> float:
    return (ticks - 2048) * 2 * math.pi / TICKS_PER_TURN


class SimServo:
    """One XM430: control table, motion profile, temperature, hardware errors, bus watchdog."""

    def __init__(self, servo_id: int, position_rad: float = 0.0) -> None:
        self.table = bytearray(_TABLE_SIZE)
        self.position = position_rad
        self.velocity = 0.0
        self.external_torque_nm = 0.0
        """Load injected by tests; beyond stall torque the servo overloads."""
        self.contact_torque_nm = 0.0
        """Load from the probe pressing on the patient (see ``DynamixelSim.loads``)."""
        self.temperature = AMBIENT_C
        self.input_voltage_v = 12.0
        self.current_a = 0.0
        self._overloaded_for = 0.0
        self._silent_for = 0.0
        self._reset_table(servo_id, eeprom=True)

    # --- control table -------------------------------------------------------------------

    def get(self, address: int, size: int) -> int:
        return int.from_bytes(self.table[address : address + size], "little")

    def put(self, address: int, size: int, value: int) -> None:
        self.table[address : address + size] = (value % (1 << (8 * size))).to_bytes(size, "little")

    def _reset_table(self, servo_id: int, *, eeprom: bool) -> None:
        if eeprom:
            self.table[:_EEPROM_END] = bytes(_EEPROM_END)
            for address, size, value in (
                (0, 2, MODEL_XM430_W350), (6, 1, FIRMWARE), (7, 1, servo_id), (8, 1, 1),
                (9, 1, 250), (11, 1, 3), (13, 1, 2), (31, 1, 80), (32, 2, 160), (34, 2, 95),
                (36, 2, 885), (38, 2, 1193), (44, 4, 200), (48, 4, 4095), (52, 4, 0),
                (63, 1, 0x34),
            ):
                self.put(address, size, value)
        self.table[_EEPROM_END:] = bytes(_TABLE_SIZE - _EEPROM_END)
        self.put(68, 1, 2)  # status return level: reply to everything
        self.put(84, 2, 800)
        self.put(116, 4, self.ticks)
        self._refresh_present()

    @property
    def servo_id(self) -> int:
        return self.table[7]

    @property
    def torque_on(self) -> bool:
        return self.table[64] == 1

    @property
    def hardware_error(self) -> int:
        return self.table[70]

    @property
    def watchdog_tripped(self) -> bool:
        return self.table[_WATCHDOG_ADDR] == 0xFF

    @property
    def ticks(self) -> int:
        return round(self.position * TICKS_PER_TURN / (2 * math.pi)) + 2048

    @property
    def return_delay_s(self) -> float:
        return self.table[9] * 2e-6

    def error_byte(self, code: int = 0) -> int:
        return code | (_ALERT if self.hardware_error else 0)

    def read(self, address: int, length: int) -> tuple[int, bytes]:
        if length == 0 or address + length > _TABLE_SIZE:
            return DATA_LENGTH, b""
        self._refresh_present()
        return 0, bytes(self.table[address : address + length])

    def write(self, address: int, data: bytes) -> int:
        """Apply a Write; return the status error code (0 = done)."""
        end = address + len(data)
        if not data or end > _TABLE_SIZE:
            return DATA_LENGTH
        touched = range(address, end)
        if any(a in _READ_ONLY for a in touched):
            return ACCESS
        if self.torque_on and address < _EEPROM_END:
            return ACCESS  # the EEPROM area is locked while torque is on
        if self.watchdog_tripped and any(a in _GOAL_AREA for a in touched):
            return DATA_RANGE  # goals are read-only until 98 is cleared
        shadow = bytearray(self.table)
        shadow[address:end] = data
        if 116 in touched or 119 in touched:
            goal = _signed(int.from_bytes(shadow[116:120], "little"), 4)
            if not self.get(52, 4) <= goal <= self.get(48, 4):
                return DATA_LIMIT
        if _WATCHDOG_ADDR in touched and shadow[_WATCHDOG_ADDR] > 127:
            return DATA_RANGE
        if 64 in touched and shadow[64] > 1:
            return DATA_RANGE
        if 64 in touched and shadow[64] == 1 and self.hardware_error:
            return RESULT_FAIL  # torque stays off until a Reboot clears the error
        if 64 in touched and shadow[64] == 1 and not self.torque_on and 116 not in touched:
            shadow[116:120] = (self.ticks % (1 << 32)).to_bytes(4, "little")  # no jump on enable
        self.table[:] = shadow
        return 0

    def reboot(self) -> None:
        """Reset RAM (clearing hardware errors, torque, watchdog); EEPROM and position stay."""
        self.velocity = 0.0
        self._overloaded_for = 0.0
        self._reset_table(self.servo_id, eeprom=False)

    def heard_from_host(self) -> None:
        self._silent_for = 0.0

    # --- physics -------------------------------------------------------------------------

    def _limits(self) -> tuple[float, float]:
        """Profile velocity (rad/s) and acceleration (rad/s²); 0 means as fast as possible."""
        rad_s_per_unit = RPM_UNIT * 2 * math.pi / 60
        velocity_limit = self.get(44, 4) * rad_s_per_unit
        profile_v = self.get(112, 4) * rad_s_per_unit
        profile_a = self.get(108, 4) * ACCEL_UNIT_REV_MIN2 * 2 * math.pi / 3600
        v_max = min(profile_v, velocity_limit) if profile_v else velocity_limit
        a_max = min(profile_a, MOTOR_MAX_ACCEL_RAD_S2) if profile_a else MOTOR_MAX_ACCEL_RAD_S2
        return v_max, a_max

    def trip(self, bit: int) -> None:
        """Latch a hardware error and cut torque, if the Shutdown register enables ``bit``."""
        if self.table[63] & (1 << bit):
            self.table[70] |= 1 << bit
            self.table[64] = 0

    @property
    def load_torque_nm(self) -> float:
        return self.external_torque_nm + self.contact_torque_nm

    def step(self, dt: float) -> None:
        before = self.velocity
        if self.torque_on:
            self._watchdog(dt)
        if self.torque_on:
            self._track_goal(dt)
        else:
            self.velocity = 0.0  # no gravity in this model: an unpowered joint stays put
        accel = (self.velocity - before) / dt
        load = self.load_torque_nm + 0.002 * accel + 0.05 * self.velocity
        self.current_a = load / TORQUE_CONSTANT_NM_PER_A if self.torque_on else 0.0
        self._overloaded_for = (
            self._overloaded_for + dt if abs(self.load_torque_nm) > STALL_TORQUE_NM else 0.0)
        if self._overloaded_for > OVERLOAD_TIME_S:
            self.trip(HW_OVERLOAD)
        target = AMBIENT_C + HEATING_C_PER_A2 * self.current_a**2
        self.temperature += (target - self.temperature) * dt / THERMAL_TIME_CONSTANT_S
        if self.temperature > self.table[31]:
            self.trip(HW_OVERHEATING)

    def _watchdog(self, dt: float) -> None:
        units = self.table[_WATCHDOG_ADDR]
        if not 1 <= units <= 127:
            return
        self._silent_for += dt
        if self._silent_for > units * 0.020:
            self.table[_WATCHDOG_ADDR] = 0xFF
            self.velocity = 0.0  # profiles "applied as 0": a hard stop where it stands
            self.put(116, 4, self.ticks)
            self.position = _ticks_to_rad(self.ticks)  # hold that tick

    def _track_goal(self, dt: float) -> None:
        if abs(self.load_torque_nm) > STALL_TORQUE_NM:
            self.velocity = 0.0  # blocked
            return
        v_max, a_max = self._limits()
        goal = _ticks_to_rad(_signed(self.get(116, 4), 4))
        error = goal - self.position
        wanted = math.copysign(min(v_max, math.sqrt(2 * a_max * abs(error))), error)
        change = max(-a_max * dt, min(a_max * dt, wanted - self.velocity))
        self.velocity += change
        step = self.velocity * dt
        if abs(step) >= abs(error) and abs(self.velocity) <= a_max * dt * 2:
            self.position, self.velocity = goal, 0.0
        else:
            self.position += step

    def _refresh_present(self) -> None:
        self.put(122, 1, int(abs(self.velocity) > 1e-3))
        self.put(126, 2, round(self.current_a * 1000 / CURRENT_UNIT_MA))
        self.put(128, 4, round(self.velocity / (RPM_UNIT * 2 * math.pi / 60)))
        self.put(132, 4, self.ticks)
        self.put(144, 2, round(self.input_voltage_v * 10))
        self.put(146, 1, round(self.temperature))


@dataclass(frozen=True)
class MotionSample:
    time: float
    positions: tuple[float, ...]
    velocities: tuple[float, ...]
    torque_on: tuple[bool, ...]


class MotionLogFile:
    """The servos' motion as JSON lines, flushed line by line, so that another process can
    check it (the robot must never move without a fresh enabled setpoint) even after this one
    is killed.

    Every physics step is looked at, but a line is written only when a servo starts or stops
    moving (its position changed in that step) or its Bus Watchdog trips or clears
    (``"event": "change"``), and every ``every_s`` while any servo moves (``"sample"``): at rest
    nothing is written, so hours of teleoperation stay small. Each line carries the step's
    time ``t`` (the simulator's clock: ``time.monotonic()``, system-wide on Linux) and per servo
    ``moving`` (0/1), ``pos`` (present position, rad), ``goal`` (goal position written, rad)
    and ``tripped`` (watchdog, 0/1). The first line (``"open"``) names the process and the
    servo IDs; a restarted simulator appends after it.
    """

    def __init__(self, path: Path, servos: Sequence[SimServo], now: float,
                 every_s: float = 0.1) -> None:
        self.every_s = every_s
        self._file = path.open("a", encoding="utf-8")
        self._positions = [servo.position for servo in servos]
        self._flags: tuple[tuple[bool, ...], tuple[bool, ...]] | None = None
        self._next_sample = now
        self._write({"event": "open", "t": now, "pid": os.getpid(),
                     "ids": [servo.servo_id for servo in servos]}, servos, ())

    def step(self, now: float, servos: Sequence[SimServo]) -> None:
        moved = tuple(servo.position != before
                      for servo, before in zip(servos, self._positions, strict=True))
        self._positions = [servo.position for servo in servos]
        flags = (moved, tuple(servo.watchdog_tripped for servo in servos))
        if flags != self._flags:
            self._flags = flags
            self._write({"event": "change", "t": now}, servos, moved)
            self._next_sample = now + self.every_s
        elif any(moved) and now >= self._next_sample:
            self._write({"event": "sample", "t": now}, servos, moved)
            self._next_sample = now + self.every_s

    def _write(self, record: dict[str, Any], servos: Sequence[SimServo],
               moved: Sequence[bool]) -> None:
        record["t"] = round(record["t"], 6)
        record["moving"] = [int(m) for m in moved]
        record["pos"] = [round(servo.position, 6) for servo in servos]
        record["goal"] = [round(_ticks_to_rad(_signed(servo.get(116, 4), 4)), 6)
                          for servo in servos]
        record["tripped"] = [int(servo.watchdog_tripped) for servo in servos]
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class DynamixelSim:
    """The bus: servos by ID, the host packet handler, and the physics clock."""

    def __init__(
        self,
        servo_ids: Iterable[int] = (1, 2, 3, 4, 5),
        *,
        clock: Callable[[], float] = time.monotonic,
        step_s: float = 0.001,
        log_size: int = 200_000,
    ) -> None:
        self.servos = [SimServo(servo_id) for servo_id in servo_ids]
        self.clock = clock
        self.step_s = step_s
        self.motion_log: collections.deque[MotionSample] = collections.deque(maxlen=log_size)
        self.loads: Callable[[], Sequence[float]] | None = None
        """Per-servo load torques from the world (e.g. ``ProbeWorld.servo_loads``)."""
        self.packets_received = 0
        self.crc_errors = 0
        self.overruns = 0
        """Backlogs cut to the newest ``UART_FIFO_BYTES`` (see there)."""
        self.last_packet_at: float | None = None
        """Simulation time of the last instruction packet (for watchdog timing checks)."""
        self.watchdog_trips: list[tuple[int, float]] = []
        """(servo id, simulation time) of every Bus Watchdog trip."""
        self.motion_file: MotionLogFile | None = None
        self._now = clock()

    def servo(self, servo_id: int) -> SimServo:
        for servo in self.servos:
            if servo.servo_id == servo_id:
                return servo
        raise KeyError(f"no servo {servo_id} on the bus")

    def positions(self) -> list[float]:
        return [servo.position for servo in self.servos]

    def advance(self) -> None:
        """Integrate physics up to now in fixed steps and log the motion."""
        now = self.clock()
        if self.loads is not None:
            for servo, torque in zip(self.servos, self.loads(), strict=True):
                servo.contact_torque_nm = torque
        while self._now + self.step_s <= now:
            self._now += self.step_s
            for servo in self.servos:
                tripped = servo.watchdog_tripped
                servo.step(self.step_s)
                if servo.watchdog_tripped and not tripped:
                    self.watchdog_trips.append((servo.servo_id, self._now))
            if self.motion_file is not None:
                self.motion_file.step(self._now, self.servos)
        self.motion_log.append(MotionSample(
            now,
            tuple(s.position for s in self.servos),
            tuple(s.velocity for s in self.servos),
            tuple(s.torque_on for s in self.servos),
        ))

    async def run(self, period_s: float = 0.002) -> None:
        """Advance physics in real time until cancelled."""
        while True:
            self.advance()
            await asyncio.sleep(period_s)

    @contextlib.asynccontextmanager
    async def serving(
        self, where: str = "tcp://127.0.0.1:0", faults: Faults | None = None
    ) -> AsyncIterator[SimulatorServer]:
        """Serve the bus on ``where`` with physics running (for tests and embedding)."""
        async with SimulatorServer(self.serve, Endpoint.parse(where), faults) as server:
            physics = asyncio.create_task(self.run(), name="dynamixel-sim-physics")
            try:
                yield server
            finally:
                physics.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await physics

    async def serve(self, link: DeviceLink) -> None:
        """The firmware_sim handler: one host connection to the bus."""
        reader = PacketReader()
        try:
            while True:
                data = await link.read()
                if len(data) > UART_FIFO_BYTES:
                    self.overruns += 1
                    reader.buffer.clear()
                    data = data[-UART_FIFO_BYTES:]
                for packet in reader.feed(data):
                    self.advance()
                    for reply, delay in self.handle(packet):
                        if delay:
                            await asyncio.sleep(delay)
                        await link.write(reply)
        except HostDisconnected:
            pass

    def handle(self, packet: Packet) -> list[tuple[bytes, float]]:
        """Execute one instruction packet; return the status packets (with return delays)."""
        self.packets_received += 1
        self.last_packet_at = self._now
        broadcast = packet.servo_id == _BROADCAST
        if not packet.crc_ok:
            self.crc_errors += 1
            if broadcast:
                return []
            return [self._reply(s, CRC_ERROR, b"")
                    for s in self.servos if s.servo_id == packet.servo_id]
        instruction, params = packet.instruction, packet.params
        if instruction == 0x82 and broadcast:
            return self._sync_read(params)
        if instruction == 0x83 and broadcast:
            self._sync_write(params)
            return []
        if instruction == 0x92 and broadcast:
            return self._bulk_read(params)
        targets = self.servos if broadcast else [
            s for s in self.servos if s.servo_id == packet.servo_id]
        replies = []
        for servo in targets:
            servo.heard_from_host()
            reply = self._unicast(servo, instruction, params)
            if reply is not None and (not broadcast or instruction == 0x01):
                replies.append(reply)
        return replies

    @staticmethod
    def _reply(servo: SimServo, code: int, params: bytes) -> tuple[bytes, float]:
        return status_packet(servo.servo_id, servo.error_byte(code), params), servo.return_delay_s

    def _unicast(
        self, servo: SimServo, instruction: int, params: bytes
    ) -> tuple[bytes, float] | None:
        level = servo.table[68]
        if instruction == 0x01:
            return self._reply(servo, 0, struct.pack("<HB", servo.get(0, 2), servo.table[6]))
        if instruction == 0x02:
            if len(params) != 4:
                return self._reply(servo, DATA_LENGTH, b"") if level >= 1 else None
            address, length = struct.unpack("<HH", params)
            code, data = servo.read(address, length)
            return self._reply(servo, code, data) if level >= 1 else None
        if instruction == 0x03:
            code = DATA_LENGTH if len(params) < 3 else servo.write(
                params[0] | params[1] << 8, params[2:])
        elif instruction == 0x08:
            servo.reboot()
            code = 0
        else:
            code = INSTRUCTION_ERROR
        return self._reply(servo, code, b"") if level >= 2 else None

    def _sync_read(self, params: bytes) -> list[tuple[bytes, float]]:
        if len(params) < 5:
            return []
        address, length = struct.unpack_from("<HH", params)
        return self._read_each((servo_id, address, length) for servo_id in params[4:])

    def _bulk_read(self, params: bytes) -> list[tuple[bytes, float]]:
        if len(params) % 5:
            return []
        return self._read_each(struct.iter_unpack("<BHH", params))

    def _read_each(self, requests: Iterable[tuple[int, int, int]]) -> list[tuple[bytes, float]]:
        replies = []
        for servo_id, address, length in requests:
            try:
                servo = self.servo(servo_id)
            except KeyError:
                continue  # an absent servo is silent; the host times out
            servo.heard_from_host()
            code, data = servo.read(address, length)
            replies.append(self._reply(servo, code, data))
        return replies

    def _sync_write(self, params: bytes) -> None:
        if len(params) < 4:
            return
        address, length = struct.unpack_from("<HH", params)
        entries = params[4:]
        stride = length + 1
        if length == 0 or len(entries) % stride:
            return
        for offset in range(0, len(entries), stride):
            try:
                servo = self.servo(entries[offset])
            except KeyError:
                continue
            servo.heard_from_host()
            servo.write(address, entries[offset + 1 : offset + stride])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ids", default="1,2,3,4,5",
                        help="comma-separated servo IDs on the bus (default 1,2,3,4,5)")
    force = parser.add_mutually_exclusive_group()
    force.add_argument("--force-listen", metavar="tcp://HOST:PORT", type=Endpoint.parse,
                       help="also serve the probe's load cell here, pressed by these servos "
                            "against the simulated patient (needs the 5 manipulator servos; "
                            "its address is printed as a second line 'force: ADDRESS')")
    force.add_argument("--force-pty", action="store_true",
                       help="the same load cell on a new pseudo-terminal")
    parser.add_argument("--motion-log", type=Path, metavar="PATH",
                        help="append the servos' motion to PATH as JSON lines (a line when a "
                             "servo starts or stops moving, and while moving every "
                             "--motion-log-every s; times are time.monotonic())")
    parser.add_argument("--motion-log-every", type=float, default=0.1, metavar="S",
                        help="sampling period of the motion log while a servo moves "
                             "(default 0.1)")


def create(args: argparse.Namespace) -> Handler:
    try:
        ids = [int(part) for part in args.ids.split(",")]
    except ValueError:
        raise SystemExit(f"--ids {args.ids!r}: expected comma-separated integers") from None
    if not ids or any(not 0 <= i <= 252 for i in ids) or len(set(ids)) != len(ids):
        raise SystemExit(f"--ids {args.ids!r}: distinct IDs within 0..252 expected")
    if (args.force_pty or args.force_listen) and len(ids) != 5:
        raise SystemExit("--force-*: the probe world needs exactly the 5 manipulator servos")
    if args.motion_log_every <= 0:
        raise SystemExit(f"--motion-log-every {args.motion_log_every}: must be > 0")
    sim = DynamixelSim(ids)
    if args.motion_log is not None:
        try:
            sim.motion_file = MotionLogFile(args.motion_log, sim.servos, sim.clock(),
                                            args.motion_log_every)
        except OSError as exc:
            raise SystemExit(f"--motion-log {args.motion_log}: {exc.strerror or exc}") from None
    args.dynamixel_sim = sim
    return sim.serve


async def background(args: argparse.Namespace, server: SimulatorServer) -> None:
    """Physics; with ``--force-*`` also the load cell sharing this bus's probe world."""
    del server
    sim: DynamixelSim = args.dynamixel_sim
    where = Endpoint("pty") if args.force_pty else args.force_listen
    try:
        if where is None:
            await sim.run()
            return
        world = ProbeWorld(sim.positions)
        sim.loads = world.servo_loads
        load_cell = ForceSim(lambda: world.contact_force()[0])
        async with SimulatorServer(load_cell.serve, where) as force_server:
            print(f"force: {force_server.address}", flush=True)
            await sim.run()
    finally:
        if sim.motion_file is not None:
            sim.motion_file.close()
