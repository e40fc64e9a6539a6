"""The ASTM urine simulator (sender) against a scripted host, and the driver against it."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from drivers.astm import AstmUrineAnalyzer, probe
from drivers.astm_link import ACK, ENQ, EOT, NAK, STX, AstmTimers
from drivers.astm_records import parse_records
from drivers.measurement import DeviceIdentity, Measurement
from drivers.serial_link import LinkError, SerialLink
from firmware_sim import astm_urine, urine_strip, uroflow
from firmware_sim.link import Endpoint, Faults, SimulatorServer

FAST = AstmTimers(frame=3.0, frame_complete=0.5)
PADS = {"urine.ph", "urine.sg", "urine.leukocytes", "urine.nitrite", "urine.blood",
        "urine.protein", "urine.glucose", "urine.ketones", "urine.bilirubin",
        "urine.urobilinogen"}


def sim_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=5)
    astm_urine.add_arguments(parser)
    return parser.parse_args(["--first-after", "0", "--ack-timeout", "0.3", "--busy-retry", "0.1",
                              "--contention-delay", "0.05", *argv])


@asynccontextmanager
async def connected(
    device: astm_urine.AstmUrineDevice,
    where: str = "tcp://127.0.0.1:0",
    faults: Faults | None = None,
) -> AsyncIterator[SerialLink]:
    server = SimulatorServer(device.serve, Endpoint.parse(where), faults)
    async with server, SerialLink.open(server.address) as link:
        yield link


async def take(analyzer: AstmUrineAnalyzer, count: int) -> list[Measurement]:
    async def collect() -> list[Measurement]:
        return [await analyzer.next_measurement() for _ in range(count)]

    return await asyncio.wait_for(collect(), 30)


async def take_after_reconnect(address: str) -> Measurement:
    """One measurement over a new link, retried while the simulator still serves the old one
    (one host at a time, like a serial port)."""
    for _attempt in range(50):
        try:
            async with SerialLink.open(address) as link:
                (measurement,) = await take(AstmUrineAnalyzer(link, timers=FAST), 1)
                return measurement
        except LinkError:
            await asyncio.sleep(0.1)
    raise AssertionError("the simulator never accepted a new connection")


def specimen(measurement: Measurement) -> str:
    assert measurement.raw is not None
    found = re.search(rb"\rO\|1\|(S\d+)\|", measurement.raw)
    assert found is not None
    return found[1].decode()


@pytest.mark.parametrize(("where", "frames"), [("tcp://127.0.0.1:0", "record"), ("pty", "message")])
async def test_driver_reads_strips_from_simulator(where: str, frames: str) -> None:
    device = astm_urine.AstmUrineDevice(sim_args("--every", "0.2", "--frames", frames))
    async with connected(device, where) as link:
        measurements = await take(AstmUrineAnalyzer(link, timers=FAST), 3)
    assert [specimen(m) for m in measurements] == ["S0001", "S0002", "S0003"]
    for measurement in measurements:
        assert {r.quantity for r in measurement.readings} == PADS
        assert measurement.device_id == "SN0001"
        assert measurement.device_kind == "urine-astm"
        assert measurement.received_at.tzinfo is UTC


async def test_device_clock_years_off_is_kept_as_reported() -> None:
    ten_years = 10 * 365.25 * 86400
    device = astm_urine.AstmUrineDevice(sim_args("--clock-offset", str(-ten_years)))
    async with connected(device) as link:
        (measurement,) = await take(AstmUrineAnalyzer(link, timers=FAST), 1)
    assert measurement.device_time is not None
    skew = measurement.received_at.replace(tzinfo=None) - measurement.device_time
    assert abs(skew - timedelta(seconds=ten_years)) < timedelta(minutes=5)
    assert abs(measurement.received_at - datetime.now(UTC)) < timedelta(minutes=5)


def test_clock_offset_beyond_the_calendar_is_refused() -> None:
    with pytest.raises(SystemExit):
        sim_args("--clock-offset", str(9000 * 365 * 86400))


@pytest.mark.parametrize(
    "faults",
    [Faults(corrupt_rate=0.002, seed=11), Faults(drop_rate=0.002, seed=12)],
    ids=["corrupt", "drop"],
)
async def test_faulty_line_delivers_strips_intact_in_order(faults: Faults) -> None:
    """Bad frames are NAKed and re-sent. The E1381 byte-sum checksum cannot see two flips that
    cancel out; such a message is then rejected by the record parser, counted, never altered."""
    device = astm_urine.AstmUrineDevice(sim_args("--every", "0.1"))
    async with connected(device, faults=faults) as link:
        analyzer = AstmUrineAnalyzer(link, timers=FAST)
        measurements = await take(analyzer, 8)
    numbers = [int(specimen(m)[1:]) for m in measurements]
    assert numbers == sorted(numbers)
    assert len(measurements) + analyzer.rejected == numbers[-1]
    assert analyzer.link_stats["rejected_frames"] > 0  # the faults did hit
    rng = random.Random(5)
    strips = [urine_strip.random_strip(rng) for _ in range(numbers[-1])]
    for number, measurement in zip(numbers, measurements, strict=True):
        assert measurement.raw is not None
        sent = [(p.code, astm_urine.astm_value(p)) for p in strips[number - 1]]
        got = [(r.components(3)[3], r.field(4)) for r in parse_records(measurement.raw)
               if r.type == "R"]
        assert got == sent


async def test_stalled_analyzer_recovers_without_losing_a_strip() -> None:
    faults = Faults()
    device = astm_urine.AstmUrineDevice(sim_args("--every", "60"))
    async with connected(device, faults=faults) as link:
        assert await link.read_exactly(1, timeout=5) == ENQ
        faults.stall()  # hung firmware: our ACK is lost, the analyzer says nothing more
        await link.write(ACK)
        with pytest.raises(TimeoutError):
            await link.read(timeout=0.5)
        faults.stall(False)
        (measurement,) = await take(AstmUrineAnalyzer(link, timers=FAST), 1)
    assert specimen(measurement) == "S0001"


async def test_unplug_mid_session_then_replug_delivers_the_strip() -> None:
    faults = Faults()
    device = astm_urine.AstmUrineDevice(sim_args("--every", "60"))
    async with SimulatorServer(device.serve, Endpoint.parse("tcp://127.0.0.1:0"), faults) as srv:
        async with SerialLink.open(srv.address) as link:
            assert await link.read_exactly(1, timeout=5) == ENQ
            await link.write(ACK)
            await link.read_exactly(10, timeout=5)  # half of the first frame…
            faults.disconnect()  # …and the cable is pulled
            with pytest.raises(LinkError):
                await link.read_exactly(1000, timeout=5)
        async with SerialLink.open(srv.address) as link:
            (measurement,) = await take(AstmUrineAnalyzer(link, timers=FAST), 1)
    assert specimen(measurement) == "S0001"


async def read_frame_or_control(link: SerialLink) -> bytes:
    first = await link.read_exactly(1, timeout=5)
    if first == STX:
        return first + await link.read_until(b"\n", timeout=5)
    return first


@pytest.mark.parametrize("host_answer", [NAK, b""], ids=["nak", "silence"])
async def test_simulator_retransmits_six_times_then_aborts(host_answer: bytes) -> None:
    device = astm_urine.AstmUrineDevice(sim_args("--every", "60"))
    async with connected(device) as link:
        assert await read_frame_or_control(link) == ENQ
        await link.write(ACK)
        sent = []
        while (data := await read_frame_or_control(link)) != EOT:
            sent.append(data)
            if host_answer:
                await link.write(host_answer)
        assert len(sent) == 6 and len(set(sent)) == 1 and sent[0][1:2] == b"1"
        # the result stayed in memory: the next session sends it again
        assert await read_frame_or_control(link) == ENQ
        await link.write(ACK)
        assert await read_frame_or_control(link) == sent[0]
    assert device.aborted_sessions == 1


async def test_simulator_waits_after_busy_and_contention() -> None:
    device = astm_urine.AstmUrineDevice(sim_args("--every", "60", "--ack-timeout", "10"))
    async with connected(device) as link:
        assert await read_frame_or_control(link) == ENQ
        await link.write(NAK)  # busy
        assert await read_frame_or_control(link) == ENQ
        await link.write(ENQ)  # contention: the instrument wins and retries
        assert await read_frame_or_control(link) == ENQ
        await link.write(ACK)
        frames = []
        while (data := await read_frame_or_control(link)) != EOT:
            frames.append(data)
            await link.write(ACK)
    assert [f[1] - ord("0") for f in frames] == [1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6]


async def test_simulator_refuses_host_enq_while_idle() -> None:
    device = astm_urine.AstmUrineDevice(sim_args("--every", "60", "--first-after", "60"))
    async with connected(device) as link:
        await link.write(ENQ)
        assert await link.read_exactly(1, timeout=5) == NAK


@pytest.mark.parametrize("first_after", ["0", "60"], ids=["analyzer-sending", "analyzer-idle"])
async def test_probe_confirms_an_astm_analyzer_and_takes_no_result(first_after: str) -> None:
    device = astm_urine.AstmUrineDevice(sim_args("--every", "60", "--first-after", first_after))
    server = SimulatorServer(device.serve, Endpoint.parse("pty"))  # stays plugged in between
    async with server:
        assert await probe(server.address, 2.0) == DeviceIdentity("astm-e1381")
        async with SerialLink.open(server.address) as link:
            if first_after == "0":  # the result is still there for the driver
                (measurement,) = await take(AstmUrineAnalyzer(link, timers=FAST), 1)
                assert specimen(measurement) == "S0001"


async def test_probe_refuses_a_device_that_does_not_speak_e1381() -> None:
    uroflow_scale = uroflow.UroflowScaleDevice(uroflow_args())
    server = SimulatorServer(uroflow_scale.serve, Endpoint.parse("tcp://127.0.0.1:0"))
    async with server:
        assert await probe(server.address, 0.5) is None
    assert await probe("socket://127.0.0.1:1", 0.5) is None


def uroflow_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    uroflow.add_arguments(parser)
    return parser.parse_args([])


async def test_gateway_crash_before_storing_leaves_the_strip_with_the_analyzer() -> None:
    """Power cut between receiving a strip and storing it: the consumer never asks for the next
    message, so the terminator is never ACKed and the analyzer sends the strip again."""
    device = astm_urine.AstmUrineDevice(sim_args("--every", "60"))
    server = SimulatorServer(device.serve, Endpoint.parse("tcp://127.0.0.1:0"))
    async with server:
        async with SerialLink.open(server.address) as link:
            (lost,) = await take(AstmUrineAnalyzer(link, timers=FAST), 1)
        again = await take_after_reconnect(server.address)  # the gateway restarted
    assert specimen(lost) == specimen(again) == "S0001"
    assert lost.readings == again.readings


async def test_handed_over_log_records_a_strip_once_every_frame_was_acknowledged(
    tmp_path: Path,
) -> None:
    log = tmp_path / "handed-over.jsonl"
    device = astm_urine.AstmUrineDevice(sim_args("--every", "0.3", "--handed-over-log", str(log)))
    async with connected(device) as link:
        assert await read_frame_or_control(link) == ENQ
        await link.write(ACK)
        while await read_frame_or_control(link) != EOT:
            await link.write(NAK)  # six failures: the session is aborted, the strip kept
        assert await read_frame_or_control(link) == ENQ
        assert not log.exists()
        await link.write(ACK)
        frames = []
        while (data := await read_frame_or_control(link)) != EOT:
            frames.append(data)
            await link.write(ACK)
        # the next strip's session begins only after strip 1 left the memory (and the log)
        assert await read_frame_or_control(link) == ENQ
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    order = next(frame for frame in frames if frame[2:4] == b"O|")
    assert order.split(b"|")[2] == b"S0001"
    assert entry == {"strip": 1, "device_time": order.split(b"|")[7].decode(),  # O field 8
                     "time_format": "%Y%m%d%H%M%S"}
