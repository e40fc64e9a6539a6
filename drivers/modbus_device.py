"""Modbus RTU respiratory equipment (home ventilators, oxygen concentrators) driven by a
register map in TOML, so a new model needs a map file and no code (docs/respiratory-modbus.md).

The wire codec is pymodbus 3 (its RTU framer and PDU classes); the bytes travel over our own
:class:`~drivers.serial_link.SerialLink`, so the same driver talks to a USB-RS485 adapter, a
pty or a ``socket://`` URL with the timeouts and typed errors every other driver has. (pymodbus'
own ``AsyncModbusSerialClient`` also accepts ``socket://`` because it opens ports with
``serial.serial_for_url``, but it brings a second reconnect policy we do not want here.)

Failures are typed: :class:`ModbusTimeout` (no answer), :class:`ModbusFrameError` (only
garbled answers: CRC, truncation), :class:`ModbusDeviceException` (the device answered with an
exception code, e.g. 02 illegal data address) and :class:`~medge.config.ConfigError` for a bad
map. Timeouts and garbled answers are retried; exception responses are not (they are answers).
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

from drivers.measurement import Measurement, Reading
from drivers.serial_link import LinkError, SerialLink, SerialSettings
from medge import config
from medge.config import bounds

RegisterType = Literal["int16", "uint16", "int32", "uint32", "float32"]
Table = Literal["holding", "input"]
MAX_READ = 125
"""Registers per read request (Modbus limit for FC 03/04)."""
WIDTH = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
EXCEPTION_NAMES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value",
    4: "slave device failure", 5: "acknowledge", 6: "slave device busy",
}


class ModbusError(Exception):
    """A Modbus transaction failed."""


class ModbusTimeout(ModbusError, TimeoutError):
    """The device did not answer at all."""


class ModbusFrameError(ModbusError):
    """Only garbled bytes came back (bad CRC, truncated or malformed frame)."""


class ModbusDeviceException(ModbusError):
    """The device answered with a Modbus exception response."""

    def __init__(self, what: str, code: int) -> None:
        self.code = code
        self.name = EXCEPTION_NAMES.get(code, "unknown exception")
        super().__init__(f"{what}: exception {code:02d} ({self.name})")


# -- register map ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AlarmBit:
    bit: int = field(metadata=bounds(min=0, max=31))
    name: str = field(metadata=bounds(min=1))
    code: str = ""
    """MDC event code, e.g. ``"MDC:197172"`` (MDC_EVT_VENT_DISCONN)."""


@dataclass(frozen=True)
class RegisterSpec:
    """One value: where it is, how it is encoded, what it means."""

    quantity: str = field(metadata=bounds(min=1))
    address: int = field(metadata=bounds(min=0, max=65535))
    """0-based wire address (the manual's "register 40001" is holding address 0)."""
    table: Table = "input"
    type: RegisterType = "uint16"
    scale: float = 1.0
    unit: str = "1"
    code: str = ""
    """LOINC and/or MDC code(s), e.g. ``"LOINC:76248-4 MDC:152720"``."""
    kind: Literal["value", "alarm_bits"] = "value"
    alarms: tuple[AlarmBit, ...] = ()

    @property
    def width(self) -> int:
        return WIDTH[self.type]

    @property
    def decimals(self) -> int:
        """Digits the scale gives the value (0.1 → 1), so 136 × 0.1 reads 13.6, not 13.600…01."""
        exponent = Decimal(repr(self.scale)).normalize().as_tuple().exponent
        return max(0, -exponent) if isinstance(exponent, int) else 0

    def validate(self) -> None:
        if self.address + self.width > 65536:
            raise ValueError(f"{self.quantity}: {self.type} at {self.address} runs past 65535")
        if self.kind == "alarm_bits":
            if self.type == "float32":
                raise ValueError(f"{self.quantity}: alarm bits need an integer type")
            if not self.alarms:
                raise ValueError(f"{self.quantity}: alarm_bits register without alarms")
            bits = [a.bit for a in self.alarms]
            if len(set(bits)) != len(bits):
                raise ValueError(f"{self.quantity}: alarm bit defined twice")
            if max(bits) >= 16 * self.width:
                raise ValueError(f"{self.quantity}: bit {max(bits)} beyond a {self.type}")
        elif self.alarms:
            raise ValueError(f"{self.quantity}: alarms given but kind is not alarm_bits")
        if self.scale == 0:
            raise ValueError(f"{self.quantity}: scale must not be 0")


@dataclass(frozen=True)
class DeviceSpec:
    model: str
    kind: str = "ventilator"
    """Device family reported as ``Measurement.device_kind``."""
    unit: int = field(default=1, metadata=bounds(min=1, max=247))
    baudrate: int = field(default=19200, metadata=bounds(min=1200, max=921600))
    parity: Literal["N", "E", "O"] = "E"
    stopbits: Literal[1, 2] = 1
    word_order: Literal["big", "little"] = "big"
    """32-bit values: ``big`` = high word in the lower address (varies by vendor)."""
    poll_interval: float = field(default=1.0, metadata=bounds(min=0.01))
    response_timeout: float = field(default=0.5, metadata=bounds(min=0.01, max=30))
    retries: int = field(default=2, metadata=bounds(min=0, max=10))
    identity_address: int | None = field(default=None, metadata=bounds(min=0, max=65535))
    """Holding register with a model code; when set, the discovery probe checks it, since
    Modbus itself cannot tell two devices that both answer at the same addresses apart."""
    identity_value: int = field(default=0, metadata=bounds(min=0, max=65535))
    max_gap: int = field(default=0, metadata=bounds(min=0, max=32))
    """Unmapped registers one read may span; 0 (only contiguous reads) suits devices that
    reject addresses they do not define, more saves requests on devices that tolerate holes."""

    @property
    def serial_settings(self) -> SerialSettings:
        return SerialSettings(self.baudrate, 8, self.parity, self.stopbits)


@dataclass(frozen=True)
class RegisterMap:
    device: DeviceSpec
    registers: tuple[RegisterSpec, ...] = field(metadata=bounds(min=1))

    def validate(self) -> None:
        quantities = [r.quantity for r in self.registers]
        if duplicate := next((q for q in quantities if quantities.count(q) > 1), None):
            raise ValueError(f"registers: quantity {duplicate!r} mapped twice")
        for table in ("holding", "input"):
            taken: dict[int, str] = {}
            for spec in (r for r in self.registers if r.table == table):
                for address in range(spec.address, spec.address + spec.width):
                    if address in taken:
                        raise ValueError(f"registers: {spec.quantity} overlaps "
                                         f"{taken[address]} at {table} address {address}")
                    taken[address] = spec.quantity

    def blocks(self) -> list[tuple[Table, int, int]]:
        """Contiguous reads ``(table, address, count)`` covering every register, small gaps
        included, so one poll costs a few requests rather than one per value."""
        found: list[tuple[Table, int, int]] = []
        for table in ("holding", "input"):
            specs = sorted((r for r in self.registers if r.table == table), key=lambda r: r.address)
            start = end = -1
            for spec in specs:
                fits = spec.address + spec.width - start <= MAX_READ
                if start >= 0 and spec.address - end <= self.device.max_gap and fits:
                    end = max(end, spec.address + spec.width)
                    continue
                if start >= 0:
                    found.append((table, start, end - start))
                start, end = spec.address, spec.address + spec.width
            if start >= 0:
                found.append((table, start, end - start))
        return found


def load_map(path: str | Path) -> RegisterMap:
    """Read a register map; any problem raises ``ConfigError`` naming the file and key."""
    return config.load(path, RegisterMap)


def decode_value(spec: RegisterSpec, words: Sequence[int], word_order: str) -> int | float:
    """Registers → raw number (before scaling), honouring the vendor's word order."""
    if spec.width == 1:
        raw = struct.pack(">H", words[0])
    else:
        high, low = (words[0], words[1]) if word_order == "big" else (words[1], words[0])
        raw = struct.pack(">HH", high, low)
    fmt = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
    value: int | float = struct.unpack(fmt[spec.type], raw)[0]
    return value


def encode_value(spec: RegisterSpec, value: float, word_order: str) -> list[int]:
    """Engineering value → registers, for writing settings."""
    raw_number = value / spec.scale
    fmt = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
    try:
        packed = struct.pack(
            fmt[spec.type], raw_number if spec.type == "float32" else round(raw_number)
        )
    except struct.error as exc:
        raise ValueError(f"{spec.quantity}: {value} does not fit a {spec.type}") from exc
    words = list(struct.unpack(f">{spec.width}H", packed))
    return words if word_order == "big" or spec.width == 1 else words[::-1]


def to_reading(spec: RegisterSpec, words: Sequence[int], word_order: str) -> Reading:
    number = decode_value(spec, words, word_order)
    if spec.kind == "alarm_bits":
        active = sorted(a.name for a in spec.alarms if int(number) >> a.bit & 1)
        return Reading(spec.quantity, float(number), "1", text=",".join(active) or "none",
                       flags=frozenset(active))
    if not math.isfinite(number):  # NaN/inf: a float32 register saying "no value"
        return Reading(spec.quantity, None, spec.unit, text="no value", flags=frozenset({"nan"}))
    if isinstance(number, float):  # a float32 carries ~7 significant digits, no more
        value = float(f"{number * spec.scale:.7g}")
    else:
        value = round(number * spec.scale, spec.decimals)
    return Reading(spec.quantity, value, spec.unit)


# -- RTU client ------------------------------------------------------------------------------


def frame_gap(baudrate: int) -> float:
    """t3.5 in seconds: 3.5 characters of 11 bits up to 19200 bit/s, a fixed 1.75 ms above
    (Modbus serial-line guide; protocols.md §10.3)."""
    return 0.00175 if baudrate > 19200 else 35.0 / baudrate


class ModbusRtuClient:
    """Request/response over a composed :class:`SerialLink` using pymodbus' RTU codec."""

    def __init__(
        self, link: SerialLink, unit: int = 1, *, response_timeout: float = 0.5, retries: int = 2
    ) -> None:
        self.link = link
        self.unit = unit
        self.response_timeout = response_timeout
        self.retries = retries
        self._framer = FramerRTU(DecodePDU(is_server=False))
        self.garbage_bytes = 0
        """Bytes discarded while hunting for a valid response (link-quality figure)."""
        self.frame_gap = frame_gap(link.settings.baudrate)
        self._quiet_from = 0.0

    async def read_registers(self, table: Table, address: int, count: int) -> list[int]:
        request_class = (
            ReadHoldingRegistersRequest if table == "holding" else ReadInputRegistersRequest
        )
        request = request_class(address=address, count=count, dev_id=self.unit)
        response = await self._transact(request, f"read {table} {address}+{count}")
        registers = list(response.registers)
        if len(registers) != count:
            raise ModbusFrameError(
                f"{self._where()}: asked for {count} registers, got {len(registers)}"
            )
        return registers

    async def write_registers(self, address: int, values: Sequence[int]) -> None:
        what = f"write {address}+{len(values)}"
        request: ModbusPDU
        if len(values) == 1:
            request = WriteSingleRegisterRequest(address=address, registers=list(values),
                                                 dev_id=self.unit)
        else:
            request = WriteMultipleRegistersRequest(address=address, registers=list(values),
                                                    dev_id=self.unit)
        await self._transact(request, what)

    def _where(self) -> str:
        return f"{self.link.url} unit {self.unit}"

    async def _transact(self, request: ModbusPDU, what: str) -> ModbusPDU:
        try:
            frame = self._framer.buildFrame(request)
        except ValueError as exc:
            raise ModbusError(f"{self._where()}: {what}: {exc}") from exc
        failure: ModbusError | None = None
        for _ in range(self.retries + 1):
            # The line must be silent for t3.5 between frames, or the device merges them.
            await asyncio.sleep(max(0.0, self._quiet_from + self.frame_gap - time.monotonic()))
            self.link.discard_input()  # a late answer to an earlier try must not match this one
            await self.link.write(frame)
            try:
                response = await self._receive(request.function_code, what)
            except (ModbusTimeout, ModbusFrameError) as exc:
                failure = exc
                continue
            finally:
                self._quiet_from = time.monotonic()
            if isinstance(response, ExceptionResponse):
                raise ModbusDeviceException(f"{self._where()}: {what}", response.exception_code)
            return response
        assert failure is not None
        raise failure

    async def _receive(self, function_code: int, what: str) -> ModbusPDU:
        buffer = bytearray()
        garbage_before = self.garbage_bytes
        deadline = time.monotonic() + self.response_timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                buffer += await self.link.read(timeout=max(remaining, 0.0))
            except TimeoutError:
                if buffer or self.garbage_bytes > garbage_before:
                    raise ModbusFrameError(f"{self._where()}: {what}: only garbled bytes "
                                           f"({len(buffer)} pending)") from None
                raise ModbusTimeout(f"{self._where()}: {what}: no answer within "
                                    f"{self.response_timeout:g} s") from None
            if (pdu := self.extract(buffer, function_code)) is not None:
                return pdu

    def extract(self, buffer: bytearray, function_code: int) -> ModbusPDU | None:
        """Take this unit's answer to ``function_code`` out of ``buffer``, dropping the garbage
        before it (counted in ``garbage_bytes``); ``None`` while no whole answer is there."""
        while buffer:
            used, unit, _, pdu_bytes = self._framer.decode(bytes(buffer))
            if not used:
                return None  # incomplete: wait for more bytes
            if not pdu_bytes:  # CRC failed at some candidate start: hunt one byte further
                del buffer[:1]
                self.garbage_bytes += 1
                continue
            pdu = self._framer.decoder.decode(pdu_bytes)
            if pdu is None or unit != self.unit or pdu.function_code & 0x7F != function_code:
                self.garbage_bytes += len(buffer)  # a valid frame, but not our answer
                buffer.clear()
                return None
            return pdu
        return None


# -- device ----------------------------------------------------------------------------------


class ModbusDevice:
    """A respiratory device described by a :class:`RegisterMap`.

    ``poll()`` reads every mapped register (in as few requests as the map allows) into one
    Measurement; ``measurements()`` repeats that every ``poll_interval``. ``write()`` changes a
    setting given by quantity, encoded as the map says.
    """

    def __init__(self, link: SerialLink, register_map: RegisterMap, *, device_id: str = "") -> None:
        self.map = register_map
        self.device_id = device_id
        spec = register_map.device
        self.client = ModbusRtuClient(
            link, spec.unit, response_timeout=spec.response_timeout, retries=spec.retries
        )

    async def poll(self) -> Measurement:
        words: dict[tuple[str, int], int] = {}
        raw = bytearray()
        for table, address, count in self.map.blocks():
            values = await self.client.read_registers(table, address, count)
            words.update({(table, address + i): v for i, v in enumerate(values)})
            raw += struct.pack(f">{count}H", *values)
        order = self.map.device.word_order
        readings = tuple(
            to_reading(spec, [words[spec.table, spec.address + i] for i in range(spec.width)],
                       order)
            for spec in self.map.registers
        )
        return Measurement(
            device_kind=self.map.device.kind, device_id=self.device_id, readings=readings,
            received_at=datetime.now(UTC), raw=bytes(raw),
        )

    async def measurements(self) -> AsyncIterator[Measurement]:
        """Poll forever at the map's interval; errors propagate to the caller's retry policy."""
        interval = self.map.device.poll_interval
        next_poll = time.monotonic()
        while True:
            yield await self.poll()
            next_poll = max(next_poll + interval, time.monotonic())
            await asyncio.sleep(next_poll - time.monotonic())

    async def write(self, quantity: str, value: float) -> None:
        spec = next((r for r in self.map.registers if r.quantity == quantity), None)
        if spec is None:
            raise KeyError(f"{quantity!r} is not in the register map of {self.map.device.model}")
        if spec.table != "holding" or spec.kind != "value":
            raise ValueError(f"{quantity}: only holding value registers can be written")
        await self.client.write_registers(
            spec.address, encode_value(spec, value, self.map.device.word_order)
        )


async def probe(url: str, register_map: RegisterMap, answer_within: float = 1.0) -> str | None:
    """Is this model on ``url``? Checks the identity register when the map names one, else
    reads every block of the map. Returns the model name or ``None``."""
    spec = register_map.device
    try:
        async with SerialLink.open(url, spec.serial_settings) as link:
            client = ModbusRtuClient(link, spec.unit, response_timeout=answer_within, retries=0)
            if spec.identity_address is not None:
                (code,) = await client.read_registers("holding", spec.identity_address, 1)
                return spec.model if code == spec.identity_value else None
            for table, address, count in register_map.blocks():
                await client.read_registers(table, address, count)
    except (ModbusError, LinkError):
        return None
    return spec.model
