"""Dynamixel X-series (XM430) servos on one Protocol 2.0 bus, for the probe manipulator.

:class:`DynamixelBus` does single transactions (ping, read, write, sync/bulk read, sync write,
reboot) over a composed :class:`~drivers.serial_link.SerialLink`, retrying timeouts and CRC
errors a bounded number of times before raising a typed error. :class:`DynamixelChain` is the
manipulator's view: N servos driven with one Sync Write of goals and one Sync Read of states per
control cycle, in SI units, with the bus watchdog armed so a frozen host stops the robot.
"""

from __future__ import annotations

import abc
import asyncio
import math
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from drivers import dynamixel_protocol as proto
from drivers.dynamixel_protocol import (
    BROADCAST_ID,
    HEADER,
    CrcMismatch,
    DynamixelError,
    Instruction,
    PacketError,
    StatusErrorCode,
    StatusPacket,
)
from drivers.serial_link import LinkError, SerialLink


@dataclass(frozen=True)
class Register:
    address: int
    size: int


class XM430:
    """The XM430 control-table registers medge uses (address, size in bytes)."""

    MODEL_NUMBER = Register(0, 2)
    FIRMWARE_VERSION = Register(6, 1)
    ID = Register(7, 1)
    BAUD_RATE = Register(8, 1)
    RETURN_DELAY_TIME = Register(9, 1)
    OPERATING_MODE = Register(11, 1)
    TEMPERATURE_LIMIT = Register(31, 1)
    MAX_POSITION_LIMIT = Register(48, 4)
    MIN_POSITION_LIMIT = Register(52, 4)
    SHUTDOWN = Register(63, 1)
    TORQUE_ENABLE = Register(64, 1)
    HARDWARE_ERROR_STATUS = Register(70, 1)
    BUS_WATCHDOG = Register(98, 1)
    PROFILE_ACCELERATION = Register(108, 4)
    PROFILE_VELOCITY = Register(112, 4)
    GOAL_POSITION = Register(116, 4)
    MOVING = Register(122, 1)
    PRESENT_CURRENT = Register(126, 2)
    PRESENT_VELOCITY = Register(128, 4)
    PRESENT_POSITION = Register(132, 4)
    PRESENT_INPUT_VOLTAGE = Register(144, 2)
    PRESENT_TEMPERATURE = Register(146, 1)


OPERATING_MODE_POSITION = 3
WATCHDOG_UNIT_S = 0.020
WATCHDOG_TRIPPED = 0xFF  # -1 as the unsigned byte on the wire

# Units (xm430_w350.model): 4096 ticks per turn centred at 2048; 0.229 rpm; 2.69 mA; 0.1 V.
TICKS_PER_RAD = 4096 / (2 * math.pi)
CENTRE_TICKS = 2048
VELOCITY_UNIT_RAD_S = 0.0239691227
CURRENT_UNIT_A = 0.00269
VOLTAGE_UNIT_V = 0.1
PROFILE_ACCELERATION_UNIT_RAD_S2 = 214.577 * 2 * math.pi / 3600  # rev/min² → rad/s²

HARDWARE_ERROR_BITS = {0: "input voltage", 2: "overheating", 3: "motor encoder",
                       4: "electrical shock", 5: "overload"}

# Present Current(126) .. Present Temperature(146): one contiguous block read per cycle.
_STATE_BLOCK = Register(126, 21)
_STATE_LAYOUT = struct.Struct("<hii8xHB")


def rad_to_ticks(angle_rad: float) -> int:
    return round(angle_rad * TICKS_PER_RAD) + CENTRE_TICKS


def ticks_to_rad(ticks: int) -> float:
    return (ticks - CENTRE_TICKS) / TICKS_PER_RAD


def velocity_to_rad_s(units: int) -> float:
    return units * VELOCITY_UNIT_RAD_S


def rad_s_to_velocity(rad_s: float) -> int:
    return round(rad_s / VELOCITY_UNIT_RAD_S)


def current_to_amp(units: int) -> float:
    return units * CURRENT_UNIT_A


def describe_hardware_error(status: int) -> str:
    names = [name for bit, name in HARDWARE_ERROR_BITS.items() if status & (1 << bit)]
    return ", ".join(names) or "none"


class DynamixelTimeout(DynamixelError, TimeoutError):
    """A servo did not answer (after the allowed retries)."""


class DynamixelLinkError(DynamixelError):
    """The bus adapter is gone (unplugged, closed)."""


class ServoStatusError(DynamixelError):
    """A servo answered with a non-zero error code in its status packet."""

    def __init__(self, servo_id: int, instruction: Instruction, code: StatusErrorCode) -> None:
        self.servo_id = servo_id
        self.instruction = instruction
        self.code = code
        super().__init__(f"servo {servo_id}: {instruction.name} failed: {code.name}")


def _to_signed(value: int, size: int) -> int:
    bits = 8 * size
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def _link_error(url: str, exc: OSError) -> DynamixelLinkError:
    """A LinkError names the URL already (the operator saw it twice); a bare ConnectionError
    does not."""
    return DynamixelLinkError(str(exc) if isinstance(exc, LinkError) else f"{url}: {exc}")


def encode_value(register: Register, value: int) -> bytes:
    """Little-endian bytes for ``value``; negative values are sent as two's complement."""
    return (value % (1 << (8 * register.size))).to_bytes(register.size, "little")


class DynamixelBus:
    """Transactions on one half-duplex Protocol 2.0 bus; one at a time (an asyncio lock)."""

    def __init__(self, link: SerialLink, *, timeout_s: float = 0.05, retries: int = 2) -> None:
        if retries < 0 or timeout_s <= 0:
            raise ValueError("retries must be >= 0 and timeout_s > 0")
        self.link = link
        self.timeout_s = timeout_s
        self.retries = retries
        self.retried = 0
        """Transactions repeated after a timeout or CRC error (for health telemetry)."""
        self._lock = asyncio.Lock()
        self._last_sent_at: float | None = None
        self._longest_silence = 0.0

    async def _receive(self, expected_id: int, instruction: Instruction,
                       reply_length: int | None) -> StatusPacket:
        """Read the next status packet from ``expected_id``, skipping noise before a header
        and a good reply of another length than ``reply_length``: a late answer to an earlier
        transaction that timed out (Protocol 2.0 has no sequence numbers; without this, one
        late state reply failed the next, shorter, read and latched an E-stop)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    await self.link.read_until(HEADER, limit=4096)
                    prefix = HEADER + await self.link.read_exactly(3)
                    try:
                        total = proto.packet_length(prefix)
                    except PacketError:
                        continue  # a header-like byte run inside noise; resynchronise
                    packet = prefix + await self.link.read_exactly(total - len(prefix))
                    status = proto.decode_status(packet)
                    stale = (reply_length is not None and status.code is StatusErrorCode.NONE
                             and len(status.params) != reply_length)
                    if status.servo_id == expected_id and not stale:
                        return status
        except TimeoutError:
            raise DynamixelTimeout(
                f"servo {expected_id}: no status for {instruction.name} within "
                f"{self.timeout_s * 1000:.0f} ms"
            ) from None
        except (LinkError, ConnectionError) as exc:
            raise _link_error(self.link.url, exc) from exc

    async def _transact(
        self, servo_id: int, instruction: Instruction, params: bytes, reply_ids: Sequence[int],
        reply_length: int | None = None,
    ) -> list[StatusPacket]:
        """Send one instruction and collect one status packet per id in ``reply_ids`` (with
        ``reply_length`` parameter bytes, if given)."""
        packet = proto.encode_instruction(servo_id, instruction, params)
        async with self._lock:
            for attempt in range(self.retries + 1):
                self.link.discard_input()
                self._note_sending()
                try:
                    await self.link.write(packet)
                    replies = [await self._receive(rid, instruction, reply_length)
                               for rid in reply_ids]
                except (LinkError, ConnectionError) as exc:
                    raise _link_error(self.link.url, exc) from exc
                except (DynamixelTimeout, CrcMismatch):
                    if attempt == self.retries:
                        raise
                    self.retried += 1
                    continue
                crc_rejected = [r for r in replies if r.code is StatusErrorCode.CRC_ERROR]
                if crc_rejected and attempt < self.retries:
                    self.retried += 1  # the servo saw our packet garbled: send it again
                    continue
                for reply in replies:
                    if reply.code is not StatusErrorCode.NONE:
                        raise ServoStatusError(reply.servo_id, instruction, reply.code)
                return replies
        raise AssertionError("unreachable")  # pragma: no cover

    def _note_sending(self) -> None:
        now = time.monotonic()
        if self._last_sent_at is not None:
            self._longest_silence = max(self._longest_silence, now - self._last_sent_at)
        self._last_sent_at = now

    def take_longest_silence(self) -> float:
        """The longest time between two packets sent since the last call (what the servos' Bus
        Watchdog measures), and start over."""
        silence, self._longest_silence = self._longest_silence, 0.0
        return silence

    async def ping(self, servo_id: int) -> tuple[int, int]:
        """Return (model number, firmware version)."""
        (reply,) = await self._transact(servo_id, Instruction.PING, b"", [servo_id])
        if len(reply.params) != 3:
            raise PacketError(f"servo {servo_id}: ping reply has {len(reply.params)} params")
        model, firmware = struct.unpack("<HB", reply.params)
        return model, firmware

    async def read_bytes(self, servo_id: int, address: int, length: int) -> StatusPacket:
        params = proto.read_params(address, length)
        (reply,) = await self._transact(servo_id, Instruction.READ, params, [servo_id], length)
        if len(reply.params) != length:
            raise PacketError(f"servo {servo_id}: read {len(reply.params)} of {length} bytes")
        return reply

    async def read(self, servo_id: int, register: Register, *, signed: bool = False) -> int:
        reply = await self.read_bytes(servo_id, register.address, register.size)
        value = int.from_bytes(reply.params, "little")
        return _to_signed(value, register.size) if signed else value

    async def write(self, servo_id: int, register: Register, value: int) -> None:
        params = proto.write_params(register.address, encode_value(register, value))
        replies = [] if servo_id == BROADCAST_ID else [servo_id]
        await self._transact(servo_id, Instruction.WRITE, params, replies)

    async def sync_read(
        self, address: int, length: int, servo_ids: Sequence[int]
    ) -> dict[int, StatusPacket]:
        params = proto.sync_read_params(address, length, servo_ids)
        replies = await self._transact(BROADCAST_ID, Instruction.SYNC_READ, params, servo_ids,
                                       length)
        for reply in replies:
            if len(reply.params) != length:
                raise PacketError(f"servo {reply.servo_id}: sync read returned "
                                  f"{len(reply.params)} of {length} bytes")
        return {reply.servo_id: reply for reply in replies}

    async def sync_write(self, register: Register, values: Mapping[int, int]) -> None:
        data = {servo_id: encode_value(register, value) for servo_id, value in values.items()}
        params = proto.sync_write_params(register.address, register.size, data)
        await self._transact(BROADCAST_ID, Instruction.SYNC_WRITE, params, [])

    async def bulk_read(
        self, requests: Sequence[tuple[int, Register]]
    ) -> dict[int, StatusPacket]:
        triples = [(servo_id, reg.address, reg.size) for servo_id, reg in requests]
        params = proto.bulk_read_params(triples)
        ids = [servo_id for servo_id, _ in requests]
        replies = await self._transact(BROADCAST_ID, Instruction.BULK_READ, params, ids)
        return {reply.servo_id: reply for reply in replies}

    async def reboot(self, servo_id: int) -> None:
        """Reboot one servo: the only way to clear a latched hardware error."""
        await self._transact(servo_id, Instruction.REBOOT, b"", [servo_id])

    async def reopen(self) -> None:
        """Close the link and open it again (an adapter replugged), between transactions: a
        read still pending on the old connection cannot mark the new one closed."""
        async with self._lock:
            await self.link.close()
            try:
                await self.link.connect()
            except (LinkError, ConnectionError) as exc:
                raise _link_error(self.link.url, exc) from exc


@dataclass(frozen=True)
class ServoState:
    servo_id: int
    position_rad: float
    velocity_rad_s: float
    current_a: float
    voltage_v: float
    temperature_c: int
    hardware_error: int
    """Hardware Error Status bits (0 unless the status packet carried the alert bit)."""

    @property
    def faulted(self) -> bool:
        return self.hardware_error != 0


class JointServos(abc.ABC):
    """A fixed group of position-controlled joint actuators, in SI units.

    Public methods validate and delegate to the ``_do_*`` hooks that a backend implements.
    """

    @property
    @abc.abstractmethod
    def joint_count(self) -> int: ...

    async def enable(self, *, watchdog_s: float) -> None:
        """Torque on, position mode, device watchdog armed to ``watchdog_s`` (0 = off)."""
        if watchdog_s < 0:
            raise ValueError(f"watchdog_s must be >= 0, got {watchdog_s}")
        await self._do_enable(watchdog_s)

    async def disable(self) -> None:
        await self._do_disable()

    async def read_states(self) -> list[ServoState]:
        return await self._do_read_states()

    async def write_goals(self, positions_rad: Sequence[float]) -> None:
        if len(positions_rad) != self.joint_count:
            raise ValueError(f"{len(positions_rad)} goals for {self.joint_count} joints")
        if not all(math.isfinite(p) for p in positions_rad):
            raise ValueError(f"non-finite goal in {list(positions_rad)}")
        await self._do_write_goals(positions_rad)

    def take_longest_silence(self) -> float:
        """The longest the device watchdog went without hearing from us since the last call
        (0 if the backend cannot tell)."""
        return 0.0

    async def tripped_watchdogs(self) -> list[int]:
        """The servos whose device watchdog has tripped (they hold still and ignore goals
        until re-enabled), as the servos themselves report it; [] if the backend cannot tell.
        Our own silence does not show every trip: the servos count from the packets they
        *received*, and a bus or bridge that held ours back trips them all the same."""
        return await self._do_tripped_watchdogs()

    async def _do_tripped_watchdogs(self) -> list[int]:
        return []

    async def clear_faults(self) -> list[int]:
        """Clear latched hardware errors (a reboot on Dynamixel); return the ids that had one.

        Torque stays off on those joints: call :meth:`enable` again afterwards.
        """
        return await self._do_clear_faults()

    @abc.abstractmethod
    async def _do_enable(self, watchdog_s: float) -> None: ...

    @abc.abstractmethod
    async def _do_clear_faults(self) -> list[int]: ...

    @abc.abstractmethod
    async def _do_disable(self) -> None: ...

    @abc.abstractmethod
    async def _do_read_states(self) -> list[ServoState]: ...

    @abc.abstractmethod
    async def _do_write_goals(self, positions_rad: Sequence[float]) -> None: ...


class DynamixelChain(JointServos):
    """XM430 servos ``servo_ids`` (joint order) on one bus."""

    def __init__(
        self,
        bus: DynamixelBus,
        servo_ids: Sequence[int],
        *,
        profile_velocity_rad_s: float = 0.0,
        profile_acceleration_rad_s2: float = 0.0,
    ) -> None:
        if len(set(servo_ids)) != len(servo_ids) or not servo_ids:
            raise ValueError(f"servo ids must be distinct and non-empty: {list(servo_ids)}")
        self.bus = bus
        self.servo_ids = list(servo_ids)
        self.profile_velocity = rad_s_to_velocity(profile_velocity_rad_s)
        self.profile_acceleration = round(
            profile_acceleration_rad_s2 / PROFILE_ACCELERATION_UNIT_RAD_S2)

    @property
    def joint_count(self) -> int:
        return len(self.servo_ids)

    def take_longest_silence(self) -> float:
        return self.bus.take_longest_silence()

    async def _sync_all(self, register: Register, value: int) -> None:
        await self.bus.sync_write(register, dict.fromkeys(self.servo_ids, value))

    async def _do_enable(self, watchdog_s: float) -> None:
        """Configure with torque off (EEPROM is locked while torque is on), then torque on.

        Goals are first set to the present positions so enabling never jumps.
        """
        await self._sync_all(XM430.TORQUE_ENABLE, 0)
        await self._sync_all(XM430.BUS_WATCHDOG, 0)  # also clears a tripped watchdog
        await self._sync_all(XM430.OPERATING_MODE, OPERATING_MODE_POSITION)
        await self._sync_all(XM430.PROFILE_ACCELERATION, self.profile_acceleration)
        await self._sync_all(XM430.PROFILE_VELOCITY, self.profile_velocity)
        states = await self.read_states()
        await self.write_goals([s.position_rad for s in states])
        await self._sync_all(XM430.TORQUE_ENABLE, 1)
        units = math.ceil(watchdog_s / WATCHDOG_UNIT_S - 1e-9)
        if units > 127:
            raise ValueError(f"watchdog {watchdog_s} s exceeds 127 x 20 ms")
        if units:
            await self._sync_all(XM430.BUS_WATCHDOG, units)

    async def _do_disable(self) -> None:
        await self._sync_all(XM430.TORQUE_ENABLE, 0)

    async def _do_tripped_watchdogs(self) -> list[int]:
        register = XM430.BUS_WATCHDOG
        replies = await self.bus.sync_read(register.address, register.size, self.servo_ids)
        return [servo_id for servo_id in self.servo_ids
                if replies[servo_id].params[0] == WATCHDOG_TRIPPED]

    async def _do_clear_faults(self) -> list[int]:
        faulted = [state.servo_id for state in await self.read_states() if state.faulted]
        for servo_id in faulted:
            await self.bus.reboot(servo_id)
        return faulted

    async def _do_read_states(self) -> list[ServoState]:
        """One Sync Read of the present-value block; Hardware Error Status only on an alert."""
        replies = await self.bus.sync_read(_STATE_BLOCK.address, _STATE_BLOCK.size,
                                           self.servo_ids)
        states = []
        for servo_id in self.servo_ids:
            reply = replies[servo_id]
            current, velocity, position, voltage, temperature = _STATE_LAYOUT.unpack(reply.params)
            hardware_error = 0
            if reply.alert:
                hardware_error = await self.bus.read(servo_id, XM430.HARDWARE_ERROR_STATUS)
            states.append(ServoState(
                servo_id=servo_id,
                position_rad=ticks_to_rad(position),
                velocity_rad_s=velocity_to_rad_s(velocity),
                current_a=current_to_amp(current),
                voltage_v=voltage * VOLTAGE_UNIT_V,
                temperature_c=temperature,
                hardware_error=hardware_error,
            ))
        return states

    async def _do_write_goals(self, positions_rad: Sequence[float]) -> None:
        goals = {sid: rad_to_ticks(p) for sid, p in zip(self.servo_ids, positions_rad, strict=True)}
        await self.bus.sync_write(XM430.GOAL_POSITION, goals)
