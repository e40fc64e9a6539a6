"""Gravimetric uroflowmetry scale streaming its load cell (protocol in docs/uroflow.md).

A beaker on a load cell, tared at power-on. Every ``--every`` seconds of device time the patient
voids: a bell-shaped (gamma) flow curve with a random volume (150-400 mL) and Qmax (15-30 mL/s),
plus load-cell noise, and now and then a knock on the scale (a short spike of a few hundred
grams). The beaker is emptied 3 s before the next void. The scale streams ``$UFW`` weight lines
at ``--rate`` Hz and a ``$UFT`` clock/identity line on connection and every 10 s.

``--speed`` runs the device faster than real time (its tick counter and clock included), so a
one-minute void can be replayed in a second by tests and benchmarks. The stream (and device time)
only runs while a host is connected, like a scale powered from the host's USB port.
Independent of ``drivers/uroflow.py`` on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from firmware_sim.link import DeviceLink, Handler
from firmware_sim.sim_options import add_clock_offset, ends_on_unplug, non_negative, positive

HELP = "uroflowmetry scale streaming load-cell weight lines ($UFW/$UFT, >= 10 Hz)"

SHAPE_K = 2.5
"""Gamma-curve shape: flow ∝ (t/tp)^k · e^(k(1 - t/tp)), skewed like a normal void."""
CLOCK_EVERY_S = 10.0


def nmea_line(payload: str) -> bytes:
    checksum = 0
    for char in payload.encode():
        checksum ^= char
    return f"${payload}*{checksum:02X}\r\n".encode()


@dataclass(frozen=True)
class Void:
    start_s: float
    qmax: float
    peak_s: float
    volume: float

    @classmethod
    def random(cls, rng: random.Random, start_s: float) -> Void:
        volume, qmax = rng.uniform(150, 400), rng.uniform(15, 30)
        # ∫ flow dt = qmax · tp · e^k · Γ(k+1) / k^(k+1)
        area = math.exp(SHAPE_K) * math.gamma(SHAPE_K + 1) / SHAPE_K ** (SHAPE_K + 1)
        return cls(start_s, qmax, volume / (qmax * area), volume)

    def voided(self, t: float) -> float:
        """Millilitres voided by device time ``t`` (closed form of the gamma integral)."""
        x = max(0.0, t - self.start_s) / self.peak_s * SHAPE_K
        # regularised lower incomplete gamma P(k+1, x) by its series
        term = total = 1.0 / (SHAPE_K + 1)
        for n in range(1, 200):
            term *= x / (SHAPE_K + 1 + n)
            total += term
            if term < 1e-12 * total:
                break
        fraction = min(1.0, total * x ** (SHAPE_K + 1) * math.exp(-x) / math.gamma(SHAPE_K + 1))
        return float(self.volume * fraction)

    @property
    def end_s(self) -> float:
        return self.start_s + self.peak_s * 6.0  # flow < 0.1 % of Qmax by then


@dataclass(frozen=True)
class Knock:
    at_s: float
    duration_s: float
    grams: float


class UroflowScaleDevice:
    def __init__(self, args: argparse.Namespace) -> None:
        self.rate: float = args.rate
        self.every: float = args.every
        self.speed: float = args.speed
        self.serial: str = args.serial
        self.noise: float = args.noise_grams
        self.knock_rate: float = args.knock_rate
        self.density: float = args.density
        self.tick_start: int = args.tick_start
        self.clock_offset = timedelta(seconds=args.clock_offset)
        self.rng = random.Random(getattr(args, "seed", None))
        self.powered_on = datetime.now(UTC).replace(tzinfo=None)
        self.t = 0.0
        """Device seconds since power-on."""
        self.voids: list[Void] = []
        self.history: deque[Void] = deque(maxlen=100)
        """The last voids produced, for tests and benchmarks to compare against."""
        self.knocks: list[Knock] = []
        self._next_void_s: float = args.first_after

    def device_time(self) -> datetime:
        return self.powered_on + self.clock_offset + timedelta(seconds=self.t)

    def tick(self) -> int:
        return (self.tick_start + round(self.t * 1000)) % (1 << 32)

    def _plan(self) -> None:
        if self.t < self._next_void_s:
            return
        void = Void.random(self.rng, self._next_void_s)
        self.history.append(void)
        self.voids = [v for v in self.voids if v.start_s > self.t - self.every] + [void]
        self.knocks = [k for k in self.knocks if k.at_s > self.t - self.every]
        if self.rng.random() < self.knock_rate:
            during = self.rng.uniform(void.start_s, void.start_s + 2.5 * void.peak_s)
            self.knocks.append(
                Knock(during, self.rng.uniform(0.1, 0.3), self.rng.uniform(150, 600)))
        self._next_void_s += self.every

    def weight(self) -> float:
        """Grams on the cell now: the current beaker (emptied before each void), noise, knocks."""
        grams = 0.0
        for void in self.voids:
            if void.start_s - 3.0 <= self.t < void.start_s + self.every - 3.0:
                grams = void.voided(self.t) * self.density
        for knock in self.knocks:
            if knock.at_s <= self.t < knock.at_s + knock.duration_s:
                grams += knock.grams
        return grams + self.rng.gauss(0.0, self.noise)

    def clock_line(self) -> bytes:
        return nmea_line(f"UFT,{self.tick()},{self.device_time():%Y%m%d%H%M%S},"
                         f"{self.serial},{self.rate:g}")

    @ends_on_unplug
    async def serve(self, link: DeviceLink) -> None:
        period = 1.0 / self.rate
        wall_start, device_start = time.monotonic(), self.t
        next_clock = self.t
        while True:
            due = device_start + (time.monotonic() - wall_start) * self.speed
            batch = bytearray()
            while self.t + period <= due:
                self.t += period
                self._plan()
                if self.t >= next_clock:
                    batch += self.clock_line()
                    next_clock = self.t + CLOCK_EVERY_S
                batch += nmea_line(f"UFW,{self.tick()},{self.weight():.1f}")
            if batch:
                await link.write(bytes(batch))
            await asyncio.sleep(max(period / self.speed, 0.01))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=positive, default=10.0, metavar="HZ",
                        help="weight samples per second (default 10)")
    parser.add_argument("--every", type=positive, default=600.0, metavar="SECONDS",
                        help="a void every SECONDS of device time (default 600; keep > 90)")
    parser.add_argument("--first-after", type=non_negative, default=2.0, metavar="SECONDS",
                        help="first void this long after power-on (default 2)")
    parser.add_argument("--speed", type=positive, default=1.0, metavar="FACTOR",
                        help="run device time FACTOR times faster than real time (default 1)")
    parser.add_argument("--serial", default="UF0001", help="scale serial number (default UF0001)")
    parser.add_argument("--noise-grams", type=non_negative, default=0.3, metavar="G",
                        help="load-cell noise, standard deviation in grams (default 0.3)")
    parser.add_argument("--knock-rate", type=non_negative, default=0.3, metavar="P",
                        help="probability of a knock on the scale per void (default 0.3)")
    parser.add_argument("--density", type=positive, default=1.0, metavar="G_PER_ML",
                        help="urine density (default 1.0 g/mL)")
    parser.add_argument("--tick-start", type=int, default=0, metavar="MS",
                        help="tick counter at power-on, 0..2^32-1, to test the wrap (default 0)")
    add_clock_offset(parser)


def create(args: argparse.Namespace) -> Handler:
    return UroflowScaleDevice(args).serve
