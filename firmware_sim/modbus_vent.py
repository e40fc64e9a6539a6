"""Home ventilator / oxygen concentrator simulator: a Modbus RTU server (unit 1 by default).

The registers are laid out by a TOML register map (the format of ``config/ventilators/``, read
here with its own small reader) and filled from a breathing model: pressure and flow follow
an inspiration/expiration cycle at the set rate, per-breath values (PIP, PEEP, tidal volume,
minute volume, leak, FiO2) are updated, and alarm bits are raised by episodes — disconnection
(pressure near zero, huge leak, no expired volume) and apnoea (no breaths) — or forced with
``--alarm``. Holding registers are settings: writing the rate changes the breathing.

The Modbus RTU codec (CRC-16/MODBUS, FC 03/04/06/16, exception responses) is written here from
protocols.md §10, independently of pymodbus, which the driver uses.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import struct
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_sim.link import DeviceLink, Handler
from firmware_sim.scenario import episode, non_negative, positive

HELP = "home ventilator / O2 concentrator: Modbus RTU server driven by a TOML register map"
DEFAULT_MAP = Path(__file__).resolve().parent.parent / "config/ventilators/home-ventilator.toml"
FRAME_SILENCE_S = 0.1
"""An incomplete request older than this is dropped (t3.5, relaxed for ptys and TCP)."""
ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE = 1, 2, 3
PACK = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}


def crc16(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def with_crc(frame: bytes) -> bytes:
    return frame + crc16(frame).to_bytes(2, "little")


class MapError(ValueError):
    """The register map cannot be served."""


@dataclass(frozen=True)
class Slot:
    """One mapped value as the simulator needs it."""

    quantity: str
    table: str
    address: int
    kind: str
    width: int
    pack: str
    scale: float
    alarm_bits: dict[str, int]


def read_map(path: Path) -> tuple[dict[str, Any], list[Slot]]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
        slots = []
        for entry in document["registers"]:
            type_name = entry.get("type", "uint16")
            slots.append(Slot(
                quantity=entry["quantity"], table=entry.get("table", "input"),
                address=int(entry["address"]), kind=entry.get("kind", "value"),
                width=struct.calcsize(PACK[type_name]) // 2, pack=PACK[type_name],
                scale=float(entry.get("scale", 1.0)),
                alarm_bits={a["name"]: int(a["bit"]) for a in entry.get("alarms", [])},
            ))
        return document.get("device", {}), slots
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MapError(f"{path}: cannot use register map: {exc!r}") from exc


@dataclass
class Respiration:
    """Breathing and device state; ``settings`` mirror the holding registers."""

    settings: dict[str, float] = field(default_factory=lambda: {
        "vent.set.ipap": 15.0, "vent.set.epap": 5.0, "vent.set.resp_rate": 16.0,
        "vent.set.tidal_volume": 450.0, "o2.set.flow": 2.0,
    })
    o2_flow: float = 0.0
    leak: float = 22.0
    disconnect_every: float = 0.0
    disconnect_for: float = 15.0
    apnoea_every: float = 0.0
    apnoea_for: float = 25.0
    forced_alarms: frozenset[str] = frozenset()

    def values(self, t: float) -> tuple[dict[str, float], set[str]]:
        """Every simulated quantity at time ``t`` (seconds since power-on) and active alarms."""
        s = self.settings
        ipap, epap = s["vent.set.ipap"], s["vent.set.epap"]
        rate = max(s["vent.set.resp_rate"], 1.0)
        period = 60.0 / rate
        t_in = period / 3
        into = t % period
        ripple = 1 + 0.03 * math.sin(2 * math.pi * t / 47.0)
        tidal = s["vent.set.tidal_volume"] * ripple
        peak_in = tidal / 1000 * 60 / (0.3 * (1 - math.exp(-t_in / 0.3)))
        if into < t_in:
            pressure = epap + (ipap - epap) * (1 - math.exp(-into / 0.1))
            flow = peak_in * math.exp(-into / 0.3)
        else:
            after = into - t_in
            pressure = epap + (ipap - epap) * math.exp(-after / 0.15)
            flow = -peak_in * 0.8 * math.exp(-after / 0.4)
        fio2 = min(21.0 + 4.0 * self.o2_flow, 60.0)
        v = {
            "vent.pressure": pressure, "vent.flow": flow, "vent.pip": ipap, "vent.peep": epap,
            "vent.tidal_volume": tidal, "vent.resp_rate": rate,
            "vent.minute_volume": tidal * rate / 1000, "vent.leak": self.leak * ripple,
            "vent.fio2": fio2, "vent.o2_flow": self.o2_flow,
            "o2.concentration": 93.0 + 0.5 * math.sin(2 * math.pi * t / 300.0),
            "o2.flow": s["o2.set.flow"], "o2.temperature": 32.0 + t / 3600,
            "o2.operating_hours": 12_345 + t / 3600,
        }
        alarms = set(self.forced_alarms)
        if episode(self.disconnect_every, self.disconnect_for, t) is not None:
            v.update({"vent.pressure": 0.4, "vent.flow": 90.0, "vent.pip": 1.0,
                      "vent.peep": 0.3, "vent.tidal_volume": 0.0, "vent.minute_volume": 0.0,
                      "vent.leak": 120.0})
            alarms |= {"disconnection", "high_leak", "low_pressure", "low_minute_volume"}
        elif episode(self.apnoea_every, self.apnoea_for, t) is not None:
            v.update({"vent.pressure": epap, "vent.flow": 0.0, "vent.tidal_volume": 0.0,
                      "vent.resp_rate": 0.0, "vent.minute_volume": 0.0})
            alarms |= {"apnoea", "low_minute_volume"}
        if fio2 < 21.0:
            alarms.add("low_fio2")
        return v, alarms


class ModbusVentSimulator:
    """Serves one register map; register contents are recomputed every ``every`` seconds."""

    def __init__(self, map_path: Path = DEFAULT_MAP, *, unit: int | None = None,
                 every: float = 0.1, model: Respiration | None = None) -> None:
        device, self.slots = read_map(map_path)
        self.unit = unit if unit is not None else int(device.get("unit", 1))
        self.big_endian_words = device.get("word_order", "big") == "big"
        self.every = every
        self.model = model or Respiration()
        self.started = time.monotonic()
        self.requests = 0
        probe, _ = self.model.values(0.0)
        unknown = [s.quantity for s in self.slots
                   if s.kind == "value" and s.quantity not in probe | self.model.settings]
        if unknown:
            raise MapError(f"{map_path}: quantities not simulated: {', '.join(unknown)}")
        self.holding: dict[int, int] = {}
        if "identity_address" in device:
            self.holding[int(device["identity_address"])] = int(device.get("identity_value", 0))
        for slot in self.slots:
            if slot.table == "holding":
                self._store(self.holding, slot, self.model.settings.get(slot.quantity, 0.0))

    def _words(self, slot: Slot, raw: float) -> list[int]:
        packed = struct.pack(slot.pack, raw if slot.pack == ">f" else round(raw))
        words = list(struct.unpack(f">{slot.width}H", packed))
        return words if self.big_endian_words else words[::-1]

    def _store(self, bank: dict[int, int], slot: Slot, value: float, scaled: bool = True) -> None:
        raw = value / slot.scale if scaled else value
        for offset, word in enumerate(self._words(slot, raw)):
            bank[slot.address + offset] = word

    def input_registers(self) -> dict[int, int]:
        elapsed = time.monotonic() - self.started
        t = math.floor(elapsed / self.every) * self.every
        values, alarms = self.model.values(t)
        bank: dict[int, int] = {}
        for slot in (s for s in self.slots if s.table == "input"):
            if slot.kind == "alarm_bits":
                bits = sum(1 << bit for name, bit in slot.alarm_bits.items() if name in alarms)
                self._store(bank, slot, bits, scaled=False)
            else:
                self._store(bank, slot, values[slot.quantity])
        return bank

    def _apply_writes(self, address: int, words: list[int]) -> None:
        for offset, word in enumerate(words):
            self.holding[address + offset] = word
        for slot in (s for s in self.slots if s.table == "holding"):
            overlaps = slot.address < address + len(words) and address < slot.address + slot.width
            if overlaps:
                regs = [self.holding[slot.address + i] for i in range(slot.width)]
                if not self.big_endian_words:
                    regs.reverse()
                number = struct.unpack(slot.pack, struct.pack(f">{slot.width}H", *regs))[0]
                self.model.settings[slot.quantity] = number * slot.scale

    def answer(self, request: bytes) -> bytes | None:
        """The response to one CRC-checked request (without CRC), or ``None`` for silence."""
        unit, function = request[0], request[1]
        if unit not in (self.unit, 0):
            return None
        self.requests += 1
        reply = self._execute(function, request[2:])
        return None if unit == 0 else bytes([unit]) + reply

    def _execute(self, function: int, data: bytes) -> bytes:
        def error(code: int) -> bytes:
            return bytes([function | 0x80, code])

        if function in (3, 4):
            address, count = struct.unpack(">HH", data[:4])
            if not 1 <= count <= 125:
                return error(ILLEGAL_VALUE)
            bank = self.holding if function == 3 else self.input_registers()
            if any(a not in bank for a in range(address, address + count)):
                return error(ILLEGAL_ADDRESS)
            words = [bank[a] for a in range(address, address + count)]
            return bytes([function, 2 * count]) + struct.pack(f">{count}H", *words)
        if function == 6:
            address, value = struct.unpack(">HH", data[:4])
            if address not in self.holding:
                return error(ILLEGAL_ADDRESS)
            self._apply_writes(address, [value])
            return bytes([function]) + data[:4]
        if function == 16:
            address, count, size = struct.unpack(">HHB", data[:5])
            if not 1 <= count <= 123 or size != 2 * count or len(data) != 5 + size:
                return error(ILLEGAL_VALUE)
            if any(a not in self.holding for a in range(address, address + count)):
                return error(ILLEGAL_ADDRESS)
            self._apply_writes(address, list(struct.unpack(f">{count}H", data[5:5 + size])))
            return bytes([function]) + data[:4]
        return error(ILLEGAL_FUNCTION)

    async def handle(self, link: DeviceLink) -> None:
        buffer = bytearray()
        while True:
            try:
                async with asyncio.timeout(FRAME_SILENCE_S if buffer else None):
                    buffer += await link.read()
            except TimeoutError:
                buffer.clear()  # silence after a fragment: the frame is abandoned
                continue
            while (size := request_size(buffer)) and len(buffer) >= size:
                if crc16(bytes(buffer[:size])) != 0:
                    del buffer[:1]  # not a frame start (or corrupted): hunt further
                    continue
                reply = self.answer(bytes(buffer[: size - 2]))
                del buffer[:size]
                if reply is not None:
                    await link.write(with_crc(reply))


def request_size(buffer: bytearray) -> int:
    """Length of the request starting the buffer, 0 if not known yet.

    Unknown function codes are taken as "the whole buffer", relying on the line's silence:
    a frame that passes the CRC as a whole is answered with exception 01.
    """
    if len(buffer) < 4:
        return 0
    function = buffer[1]
    if function in (3, 4, 6):
        return 8
    if function == 16:
        return 9 + buffer[6] if len(buffer) >= 7 else 0
    return len(buffer)


def unit_address(text: str) -> int:
    """argparse type: a Modbus unit address a device can have (1..247)."""
    if not text.isdigit() or not 1 <= int(text) <= 247:
        raise argparse.ArgumentTypeError(f"{text}: a unit address is 1..247")
    return int(text)


def servable_map(text: str) -> Path:
    """argparse type: a register map this simulator can fill."""
    try:
        ModbusVentSimulator(Path(text))
    except MapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return Path(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--map", type=servable_map, default=DEFAULT_MAP, metavar="TOML",
                        help="register map to serve (default config/ventilators/"
                        "home-ventilator.toml; oxygen-concentrator.toml is the other shipped)")
    parser.add_argument("--unit", type=unit_address, default=None,
                        help="Modbus unit (slave) address (default: the map's, normally 1)")
    parser.add_argument("--every", type=positive, default=0.1, metavar="SECONDS",
                        help="how often the device refreshes its live registers (default 0.1)")
    parser.add_argument("--ipap", type=positive, default=15.0, help="cmH2O (default 15)")
    parser.add_argument("--epap", type=non_negative, default=5.0, help="PEEP, cmH2O (default 5)")
    parser.add_argument("--rate", type=positive, default=16.0, help="breaths/min (default 16)")
    parser.add_argument("--tidal-volume", type=positive, default=450.0, help="mL (default 450)")
    parser.add_argument("--o2-flow", type=non_negative, default=0.0,
                        help="O2 bled into the circuit, L/min (default 0)")
    parser.add_argument("--leak", type=non_negative, default=22.0,
                        help="intentional leak, L/min (default 22)")
    parser.add_argument("--disconnect-every", type=non_negative, default=0.0, metavar="S",
                        help="a patient disconnection every S seconds, 0 = never (default 0)")
    parser.add_argument("--disconnect-for", type=non_negative, default=15.0, metavar="S",
                        help="disconnection length (default 15)")
    parser.add_argument("--apnoea-every", type=non_negative, default=0.0, metavar="S",
                        help="an apnoea episode every S seconds, 0 = never (default 0)")
    parser.add_argument("--apnoea-for", type=non_negative, default=25.0, metavar="S",
                        help="apnoea length (default 25)")
    parser.add_argument("--alarm", action="append", default=[], metavar="NAME",
                        help="raise this alarm bit permanently (repeatable), e.g. power_failure")


def create(args: argparse.Namespace) -> Handler:
    model = Respiration(
        o2_flow=args.o2_flow, leak=args.leak, disconnect_every=args.disconnect_every,
        disconnect_for=args.disconnect_for, apnoea_every=args.apnoea_every,
        apnoea_for=args.apnoea_for, forced_alarms=frozenset(args.alarm),
    )
    model.settings.update({"vent.set.ipap": args.ipap, "vent.set.epap": args.epap,
                           "vent.set.resp_rate": args.rate,
                           "vent.set.tidal_volume": args.tidal_volume})
    simulator = ModbusVentSimulator(args.map, unit=args.unit, every=args.every, model=model)
    known = {name for slot in simulator.slots for name in slot.alarm_bits}
    if unknown := set(args.alarm) - known:
        raise ValueError(f"--alarm {', '.join(sorted(unknown))}: not in the map "
                         f"(known: {', '.join(sorted(known))})")
    return simulator.handle
