"""Uroflowmetry: the line protocol, the ICS analysis against curves with known parameters, and
the scale driver against scripted streams and the simulator (knocks, corruption, tick wrap,
a device clock years off, a lifted beaker, gaps, unplugging)."""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from drivers.measurement import DeviceIdentity, Measurement
from drivers.serial_link import LinkError, SerialLink
from drivers.uroflow import (
    ClockLine,
    UroflowLineError,
    UroflowScale,
    VoidDetection,
    WeightSample,
    parse_line,
    probe,
)
from drivers.uroflow_analysis import FlowSettings, VoidRejected, analyse_void
from firmware_sim import astm_urine, uroflow
from firmware_sim.link import DeviceLink, Endpoint, Faults, SimulatorServer
from tests.test_astm_link import raw_device

RATE = 10.0
TCP = Endpoint.parse("tcp://127.0.0.1:0")


def line(payload: str) -> bytes:
    """Encode a line independently of both ends: NMEA XOR checksum."""
    checksum = 0
    for char in payload.encode():
        checksum ^= char
    return b"$" + payload.encode() + b"*%02X\r\n" % checksum


# --- line protocol --------------------------------------------------------------------------


def test_lines_decode() -> None:
    assert parse_line(line("UFW,4294967295,-1.5")) == WeightSample(4294967295, -1.5)
    assert parse_line(line("UFT,7,20260102030405,UF9,12.5")) == ClockLine(
        7, datetime(2026, 1, 2, 3, 4, 5), "UF9", 12.5)
    assert parse_line(uroflow.nmea_line("UFW,100,12.3")) == WeightSample(100, 12.3)


def test_documented_examples() -> None:
    assert parse_line(b"$UFW,123400,251.3*6B\r\n") == WeightSample(123400, 251.3)
    assert parse_line(b"$UFT,123400,20261122083000,UF0001,10*5D\r\n") == ClockLine(
        123400, datetime(2026, 11, 22, 8, 30), "UF0001", 10.0)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (line("UFW,1,2.0")[:-4] + b"00\r\n", "checksum"),
        (b"garbage\r\n", r"not a \$"),
        (line("UFW,4294967296,2.0"), "outside"),
        (line("UFW,1,heavy"), "could not convert"),
        (line("UFT,1,20261340000000,UF1,10"), "does not match|unconverted|month"),
        (line("UFT,1,20260101000000,UF1,0"), "rate"),
        (line("UFX,1,2"), "unknown line type"),
        (line("UFW,1"), "unknown line type"),
    ],
)
def test_bad_lines_raise_typed_errors(raw: bytes, reason: str) -> None:
    with pytest.raises(UroflowLineError, match=reason):
        parse_line(raw)


# --- analysis against known curves ----------------------------------------------------------


def gamma_flow(t: np.ndarray, start: float, qmax: float, peak: float, k: float = 2.5) -> np.ndarray:
    x = np.clip(t - start, 0, None) / peak
    return np.asarray(qmax * x**k * np.exp(k * (1 - x)))


def weight_trace(flow: np.ndarray, noise: float = 0.3, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.cumsum(flow) / RATE + rng.normal(0, noise, len(flow))


def crossing_times(t: np.ndarray, flow: np.ndarray, threshold: float) -> tuple[float, float]:
    above = np.flatnonzero(flow > threshold)
    return float(t[above[0]]), float(t[above[-1]])


def test_bell_void_parameters_match_the_known_curve() -> None:
    t = np.arange(0, 70, 1 / RATE)
    flow = gamma_flow(t, start=5, qmax=22, peak=9)
    result = analyse_void(t, weight_trace(flow), RATE)
    onset, end = crossing_times(t, flow, 1.0)
    assert result.voided_volume_ml == pytest.approx(flow.sum() / RATE, rel=0.01)
    assert result.qmax_ml_s == pytest.approx(22, rel=0.03)
    assert result.flow_start_s == pytest.approx(onset, abs=0.5)
    assert result.time_to_qmax_s == pytest.approx(5 + 9 - onset, abs=0.5)
    assert result.voiding_time_s == pytest.approx(end - onset, abs=1.0)
    assert result.flow_time_s == pytest.approx(result.voiding_time_s, abs=0.3)
    assert result.qave_ml_s == pytest.approx(result.voided_volume_ml / result.flow_time_s)
    assert max(result.curve_ml_s) == pytest.approx(result.qmax_ml_s, abs=0.01)
    assert result.knocks == 0


def test_knocks_and_short_spikes_do_not_change_qmax() -> None:
    t = np.arange(0, 70, 1 / RATE)
    flow = gamma_flow(t, start=5, qmax=22, peak=9)
    clean = analyse_void(t, weight_trace(flow), RATE)
    knocked = weight_trace(flow)
    knocked[120:123] += 450  # a knock at the peak, 0.3 s
    knocked[300:301] -= 200  # a jolt downwards
    result = analyse_void(t, knocked, RATE)
    assert result.knocks == 2
    assert result.qmax_ml_s == pytest.approx(clean.qmax_ml_s, rel=0.02)
    assert result.voided_volume_ml == pytest.approx(clean.voided_volume_ml, rel=0.01)


def test_flow_spike_shorter_than_two_seconds_is_smoothed_away() -> None:
    """ICS: Qmax from the smoothed curve; a 1 s straining burst must not define it."""
    t = np.arange(0, 70, 1 / RATE)
    flow = gamma_flow(t, start=5, qmax=20, peak=9)
    flow[200:210] += 25  # 1 s burst to 45 mL/s
    result = analyse_void(t, weight_trace(flow), RATE)
    assert result.qmax_ml_s < 34


def test_interrupted_void_counts_voiding_time_including_the_pause() -> None:
    t = np.arange(0, 90, 1 / RATE)
    flow = gamma_flow(t, start=5, qmax=15, peak=5) + gamma_flow(t, start=40, qmax=15, peak=5)
    result = analyse_void(t, weight_trace(flow), RATE)
    first_end = crossing_times(t[t < 35], flow[t < 35], 1.0)[1]
    second_start = crossing_times(t[t >= 35], flow[t >= 35], 1.0)[0]
    pause = second_start - first_end
    assert pause > 5
    assert result.voiding_time_s - result.flow_time_s == pytest.approx(pause, abs=1.0)


def test_irregular_sampling_is_resampled() -> None:
    rng = np.random.default_rng(4)
    t = np.cumsum(rng.uniform(0.05, 0.15, 700))
    flow = gamma_flow(t, start=5, qmax=20, peak=8)
    grams = np.cumsum(flow * np.diff(t, prepend=0.0))
    result = analyse_void(t, grams, RATE)
    assert result.qmax_ml_s == pytest.approx(20, rel=0.04)


@pytest.mark.parametrize(
    ("grams", "reason"),
    [
        (np.r_[np.zeros(50), np.full(100, 500.0)], "not physiological"),
        (np.r_[np.zeros(50), np.linspace(0, 10, 100), np.full(50, 10.0)], "voided volume"),
        (np.zeros(200), "no flow"),
        (np.zeros(3), ">= 4 samples"),
    ],
)
def test_implausible_traces_are_rejected(grams: np.ndarray, reason: str) -> None:
    with pytest.raises(VoidRejected, match=reason):
        analyse_void(np.arange(len(grams)) / RATE, grams, RATE)


def test_unordered_times_are_rejected() -> None:
    with pytest.raises(VoidRejected, match="increasing"):
        analyse_void(np.array([0.0, 0.2, 0.1, 0.3]), np.zeros(4), RATE)


# --- the driver on a scripted stream --------------------------------------------------------


@asynccontextmanager
async def scripted_scale(
    detection: VoidDetection | None = None,
) -> AsyncIterator[tuple[UroflowScale, DeviceLink]]:
    async with raw_device() as (host, device):
        yield UroflowScale(host, detection=detection or VoidDetection(end_quiet_s=4)), device


def stream(grams: np.ndarray, first_tick: int = 0, clock: str = "20300101120000") -> bytes:
    out = bytearray(line(f"UFT,{first_tick},{clock},UF7,10"))
    for index, value in enumerate(grams):
        out += line(f"UFW,{(first_tick + 100 * (index + 1)) % (1 << 32)},{value:.1f}")
    return bytes(out)


def void_grams(seconds: float = 70) -> np.ndarray:
    t = np.arange(0, seconds, 1 / RATE)
    return weight_trace(gamma_flow(t, start=5, qmax=20, peak=8))


async def test_scripted_void_with_garbage_and_tick_wrap() -> None:
    grams = void_grams()
    data = stream(grams, first_tick=(1 << 32) - 20_000)
    boundary = data.index(b"\n", 4000) + 1
    noisy = (data[:3000] + b"\x00\xff garbage $UFW,1*\r\n" + data[3000:boundary]
             + b"\xfe\x00junk" + data[boundary:])  # junk glued to a good line costs nothing
    async with scripted_scale() as (scale, device):
        await device.write(noisy)
        measurement = await asyncio.wait_for(scale.next_measurement(), 10)
    assert scale.rejected == 2  # the garbage, and the line it was spliced into
    assert measurement.device_id == "UF7"
    qmax = measurement.reading("uroflow.qmax")
    volume = measurement.reading("uroflow.voided_volume")
    assert qmax is not None and qmax.value == pytest.approx(20, rel=0.03)
    assert volume is not None and volume.value == pytest.approx(grams[-10:].mean(), rel=0.01)
    assert measurement.device_time is not None  # clock line + ticks → onset ≈ 5.5 s after it
    assert measurement.device_time - datetime(2030, 1, 1, 12) == pytest.approx(
        timedelta(seconds=5.5), abs=timedelta(seconds=1))


async def test_lifted_beaker_and_stream_gap_drop_the_void() -> None:
    grams = void_grams(40)
    lifted = np.r_[grams[:150], np.full(100, -150.0)]  # beaker taken away mid-void
    async with scripted_scale() as (scale, device):
        await device.write(stream(lifted))
        with_gap = stream(grams)  # then a void whose stream stops for 5 s in the middle
        lines = with_gap.split(b"\r\n")
        await device.write(b"\r\n".join([*lines[:150], *lines[200:]]))
        await device.write(stream(void_grams(), first_tick=10_000_000))
        measurement = await asyncio.wait_for(scale.next_measurement(), 10)
    assert scale.rejected_voids == 2
    volume = measurement.reading("uroflow.voided_volume")
    assert volume is not None and volume.value is not None and volume.value > 200


async def test_unplugged_mid_void_raises_link_error() -> None:
    async with scripted_scale() as (scale, device):
        task = asyncio.create_task(scale.next_measurement())
        await device.write(stream(void_grams())[:2500])
        device.closed = True
        await scale._link.close()
        with pytest.raises(LinkError):
            await asyncio.wait_for(task, 5)


# --- the driver against the simulator -------------------------------------------------------


def sim_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=8)
    uroflow.add_arguments(parser)
    return parser.parse_args(["--speed", "100", "--every", "100", *argv])


async def voids_from(
    device: uroflow.UroflowScaleDevice, count: int, where: Endpoint = TCP,
    faults: Faults | None = None,
) -> tuple[UroflowScale, list[Measurement]]:
    server = SimulatorServer(device.serve, where, faults)
    async with server, SerialLink.open(server.address) as link:
        scale = UroflowScale(link)

        async def collect() -> list[Measurement]:
            return [await scale.next_measurement() for _ in range(count)]

        return scale, await asyncio.wait_for(collect(), 60)


def assert_matches_simulated(device: uroflow.UroflowScaleDevice, voids: list[Measurement]) -> None:
    truth = list(device.history)[: len(voids)]
    for void, measurement in zip(truth, voids, strict=True):
        volume = measurement.reading("uroflow.voided_volume")
        qmax = measurement.reading("uroflow.qmax")
        assert volume is not None and qmax is not None
        assert volume.value == pytest.approx(void.volume, rel=0.03)
        assert qmax.value == pytest.approx(void.qmax, rel=0.06)
        (curve,) = measurement.samples
        assert curve.period == timedelta(seconds=0.1) and curve.unit == "mL/s"
        assert max(curve.values) == pytest.approx(qmax.value, abs=0.01)
        assert math.isclose(len(curve.values) / 10, measurement.readings[3].value or 0, abs_tol=2.5)


@pytest.mark.parametrize("where", ["tcp://127.0.0.1:0", "pty"])
async def test_driver_measures_simulated_voids_despite_knocks(where: str) -> None:
    device = uroflow.UroflowScaleDevice(sim_args("--knock-rate", "1"))
    _, voids = await voids_from(device, 2, Endpoint.parse(where))
    assert_matches_simulated(device, voids)
    assert any("artefact_removed" in v.readings[1].flags for v in voids)
    assert {v.device_id for v in voids} == {"UF0001"}


async def test_corrupted_stream_and_tick_wrap() -> None:
    device = uroflow.UroflowScaleDevice(sim_args("--tick-start", str((1 << 32) - 30_000)))
    scale, voids = await voids_from(device, 2, faults=Faults(corrupt_rate=0.0005, seed=2))
    assert scale.rejected > 0
    assert_matches_simulated(device, voids)


async def test_device_clock_years_off_is_kept_as_reported() -> None:
    twenty_years = 20 * 365.25 * 86400
    device = uroflow.UroflowScaleDevice(sim_args("--clock-offset", str(-twenty_years)))
    _, (void,) = await voids_from(device, 1)
    assert void.device_time is not None
    behind = void.received_at.replace(tzinfo=None) - void.device_time
    assert behind == pytest.approx(timedelta(seconds=twenty_years), abs=timedelta(hours=1))
    assert void.received_at.tzinfo is UTC
    assert void.samples[0].start is not None and void.samples[0].start <= void.device_time


def test_flow_settings_are_configurable() -> None:
    t = np.arange(0, 70, 1 / RATE)
    grams = weight_trace(gamma_flow(t, start=5, qmax=22, peak=9)) * 1.02
    dense = analyse_void(t, grams, RATE, FlowSettings(density_g_per_ml=1.02))
    assert dense.voided_volume_ml == pytest.approx(analyse_void(
        t, grams / 1.02, RATE).voided_volume_ml, rel=1e-6)


async def test_probe_listens_for_the_scale() -> None:
    device = uroflow.UroflowScaleDevice(sim_args())
    server = SimulatorServer(device.serve, TCP)
    async with server:
        assert await probe(server.address, 2.0) == DeviceIdentity("uroflow-scale", "UF0001")
    analyzer = astm_urine.AstmUrineDevice(astm_args())
    server = SimulatorServer(analyzer.serve, TCP)
    async with server:  # an ASTM analyzer: ENQ, no lines
        assert await probe(server.address, 0.5) is None


def astm_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    astm_urine.add_arguments(parser)
    return parser.parse_args(["--first-after", "0", "--ack-timeout", "0.1"])
