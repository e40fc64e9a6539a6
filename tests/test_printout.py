"""Printout-dialect urine analyzers: the reference captures (copied from protocols.md §5.2/§5.3)
as golden tests, pad token parsing, and the driver against scripted devices and the simulator."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from drivers.measurement import Measurement
from drivers.serial_link import LinkError, SerialLink
from drivers.urinalysis import Grade, UrinalysisError, pad_for, parse_pad
from drivers.urine_printout import (
    NAK,
    PrintoutChecksumError,
    PrintoutError,
    PrintoutUrineAnalyzer,
    parse_report,
)
from firmware_sim import printout_urine
from firmware_sim.link import DeviceLink, Endpoint, Faults, SimulatorServer
from tests.test_astm_link import raw_device

RECEIVED = datetime(2026, 11, 22, 1, 0, tzinfo=UTC)

CLINITEK_LINES = [
    b"6510  01.02 9703031111",
    b"008 HELL GELB     ",
    b"GLU  NEGATIV        ",
    b"BIL  NEGATIV        ",
    b"KET  NEGATIV        ",
    b"SG   >=1.030        ",
    b"pH   5.0            ",
    b"PRO  NEGATIV        ",
    b"UBG  0.2 mg/dL      ",
    b"NIT  NEGATIV        ",
    b"OBL* Ca 10 Ery/uL   ",
    b"LEU  0 Leu/uL       ",
]
CLINITEK_CAPTURE = b"\r\n" + b"".join(line + b"\r\n" for line in CLINITEK_LINES) + b"4C"
"""Between STX and ETX, verbatim from the reference (CR LF line ends, published checksum 4C)."""

CONSULT_CAPTURE = (
    b" ID:10\r\n Date:15-05-2026 16:51\r\n Operator: 100\r\n No. 100002\r\n"
    b" LEU       -              neg\r\n NIT       -              neg\r\n"
    b" URO       -       0.2  mg/dL\r\n"
    b" PRO       -              neg\r\n pH               6.0\r\n BLO       -              neg\r\n"
    b" SG         1.010\r\n KET       -              neg\r\n BIL       -              neg\r\n"
    b" GLU       -              neg\r\n"
)


def by_quantity(measurement: Measurement) -> dict[str, tuple[object, ...]]:
    return {r.quantity: (r.value, r.unit, r.text, r.ordinal, r.flags, r.comparator)
            for r in measurement.readings}


def test_clinitek_capture_is_golden() -> None:
    measurement = parse_report(CLINITEK_CAPTURE, RECEIVED)
    assert measurement.device_time == datetime(1997, 3, 3, 11, 11)
    assert measurement.device_kind == "urine-printout"
    none: frozenset[str] = frozenset()
    assert by_quantity(measurement) == {
        "urine.glucose": (None, "", "NEGATIV", 0, none, None),
        "urine.bilirubin": (None, "", "NEGATIV", 0, none, None),
        "urine.ketones": (None, "", "NEGATIV", 0, none, None),
        "urine.sg": (1.030, "1", None, None, none, ">="),
        "urine.ph": (5.0, "[pH]", None, None, none, None),
        "urine.protein": (None, "", "NEGATIV", 0, none, None),
        "urine.urobilinogen": (0.2, "mg/dL", None, Grade.NEGATIVE, none, None),
        "urine.nitrite": (None, "", "NEGATIV", 0, none, None),
        "urine.blood": (10.0, "{Ery}/uL", None, Grade.TRACE, {"abnormal", "approximate"}, None),
        "urine.leukocytes": (0.0, "{Leu}/uL", None, Grade.NEGATIVE, none, None),
    }


def test_clinitek_checksum_is_checked() -> None:
    with pytest.raises(PrintoutChecksumError, match="4D"):
        parse_report(CLINITEK_CAPTURE.replace(b"4C", b"4D"), RECEIVED)
    with pytest.raises(PrintoutChecksumError):
        parse_report(CLINITEK_CAPTURE.replace(b"5.0", b"5.5"), RECEIVED)


def test_consult120_capture_is_golden() -> None:
    measurement = parse_report(CONSULT_CAPTURE, RECEIVED)
    assert measurement.device_time == datetime(2026, 5, 15, 16, 51)
    assert measurement.device_id == ""  # the keypad "ID:10" is never an identity
    readings = by_quantity(measurement)
    assert len(readings) == 10
    assert readings["urine.ph"][:2] == (6.0, "[pH]")
    assert readings["urine.sg"][:2] == (1.010, "1")
    assert readings["urine.urobilinogen"][:4] == (0.2, "mg/dL", "-", 0)
    assert readings["urine.leukocytes"][:4] == (None, "", "- neg", 0)


@pytest.mark.parametrize(
    ("line", "quantity", "value", "unit", "ordinal"),
    [  # the positive control lines of the reference, and the spellings of other dialects
        ("*LEU 3+ 500 Leu/uL", "urine.leukocytes", 500.0, "{Leu}/uL", Grade.THREE_PLUS),
        ("*NIT + pos", "urine.nitrite", None, "", Grade.ONE_PLUS),
        ("*PRO 3+ 300 mg/dL", "urine.protein", 300.0, "mg/dL", Grade.THREE_PLUS),
        ("pH 7.5", "urine.ph", 7.5, "[pH]", None),
        ("*BLO 3+ 200 Ery/uL", "urine.blood", 200.0, "{Ery}/uL", Grade.THREE_PLUS),
        ("KET +- 5 mg/dL", "urine.ketones", 5.0, "mg/dL", Grade.TRACE),
        ("*BIL 2+ 2 mg/dL", "urine.bilirubin", 2.0, "mg/dL", Grade.TWO_PLUS),
        ("*GLU 3+ 1000 mg/dL", "urine.glucose", 1000.0, "mg/dL", Grade.THREE_PLUS),
        ("BLD +++ 250 RBC/ul", "urine.blood", 250.0, "{Ery}/uL", Grade.THREE_PLUS),
        ("p.H 9.0", "urine.ph", 9.0, "[pH]", None),
        ("pH   6,5", "urine.ph", 6.5, "[pH]", None),
        ("UBG  0,2 mg/dL", "urine.urobilinogen", 0.2, "mg/dL", Grade.NEGATIVE),
        ("LEU +/- 15 Leu/uL", "urine.leukocytes", 15.0, "{Leu}/uL", Grade.TRACE),
        ("PRO 100 mg/dL", "urine.protein", 100.0, "mg/dL", Grade.TWO_PLUS),
    ],
)
def test_result_lines(
    line: str, quantity: str, value: float | None, unit: str, ordinal: int | None
) -> None:
    report = b" Date:01-01-2026 00:00\r\n " + line.encode() + b"\r\n"
    (reading,) = parse_report(report, RECEIVED).readings
    assert (reading.quantity, reading.value, reading.unit, reading.ordinal) == (
        quantity, value, unit, ordinal)
    assert ("abnormal" in reading.flags) == line.startswith("*")


@pytest.mark.parametrize(
    ("report", "reason"),
    [
        (b"pH acid\r\n", "unexpected token 'acid'"),
        (b"pH -\r\n", "needs a number"),
        (b"NIT + neg\r\n", "contradictory"),
        (b"LEU\r\n", "not a `LABEL value`"),
        (b"Date:31-02-2026 10:00\r\npH 6.0\r\n", "bad date/time"),
        (b"ASC 20 mg/dL\r\n", "no pad results"),
        (b"\r\n \r\n", "empty report"),
        (b"6510  01.02 9713031111\r\n008 X\r\npH 5.0\r\n", "without its checksum"),
        (b"LEU 3+ 500 furlongs\r\n", "unexpected token 'furlongs'"),
    ],
)
def test_bad_reports_raise_typed_errors_naming_the_line(report: bytes, reason: str) -> None:
    with pytest.raises(PrintoutError, match=reason):
        parse_report(report, RECEIVED)


def test_unknown_pad_code_is_named() -> None:
    with pytest.raises(UrinalysisError, match="'XYZ'"):
        pad_for("XYZ")
    assert parse_pad(pad_for("sg"), ["≥1.030"]).comparator == ">="


# --- the driver on a link -------------------------------------------------------------------

TCP = Endpoint.parse("tcp://127.0.0.1:0")


@asynccontextmanager
async def scripted_device(
    report_timeout: float = 2.0,
) -> AsyncIterator[tuple[PrintoutUrineAnalyzer, DeviceLink]]:
    async with raw_device() as (host, device):
        yield PrintoutUrineAnalyzer(host, report_timeout=report_timeout, max_report=600), device


def framed(body: bytes) -> bytes:
    return b"\x02" + body + b"\x03"


async def test_driver_resynchronises_after_garbage_half_reports_and_overflow() -> None:
    async with scripted_device() as (analyzer, device):
        await device.write(b"\x00\xffnoise" + b"\x02" + CONSULT_CAPTURE[:50])  # lost its end
        await device.write(framed(CONSULT_CAPTURE))
        await device.write(b"\x02" + b"x" * 700)  # never ends
        await device.write(framed(CLINITEK_CAPTURE))
        first = await asyncio.wait_for(analyzer.next_measurement(), 5)
        second = await asyncio.wait_for(analyzer.next_measurement(), 5)
    assert first.raw == CONSULT_CAPTURE and second.raw == CLINITEK_CAPTURE
    assert analyzer.rejected == 1
    assert analyzer.garbage_bytes >= 58


async def test_report_without_etx_is_dropped_after_the_timeout() -> None:
    async with scripted_device(report_timeout=0.2) as (analyzer, device):
        task = asyncio.create_task(analyzer.next_measurement())
        await device.write(b"\x02" + CONSULT_CAPTURE[:40])
        # Both ends share this event loop: the driver's earlier deadline fires first.
        await asyncio.sleep(0.4)
        await device.write(CONSULT_CAPTURE[40:] + b"\x03" + framed(CONSULT_CAPTURE))
        measurement = await asyncio.wait_for(task, 5)
    assert measurement.raw == CONSULT_CAPTURE
    assert analyzer.rejected == 1


@pytest.mark.parametrize(
    ("first", "reprint"),
    [  # a garbled report is NAKed and the clean reprint taken; should the checksum rule be
       # wrong for some firmware, an identical reprint proves the line clean and is accepted
        (CLINITEK_CAPTURE.replace(b"5.0", b"5.5"), CLINITEK_CAPTURE),
        (CLINITEK_CAPTURE.replace(b"4C", b"4D"), CLINITEK_CAPTURE.replace(b"4C", b"4D")),
    ],
    ids=["garbled", "checksum-rule-disagrees"],
)
async def test_bad_checksum_is_naked_and_the_reprint_accepted(first: bytes, reprint: bytes) -> None:
    async with scripted_device() as (analyzer, device):
        task = asyncio.create_task(analyzer.next_measurement())
        await device.write(framed(first))
        assert await asyncio.wait_for(device.read(), 5) == NAK
        await device.write(framed(reprint))
        measurement = await asyncio.wait_for(task, 5)
    assert measurement.raw == reprint


async def test_unplugged_mid_report_raises_link_error() -> None:
    async with scripted_device() as (analyzer, device):
        task = asyncio.create_task(analyzer.next_measurement())
        await device.write(b"\x02" + CONSULT_CAPTURE[:30])
        device.closed = True
        await analyzer._link.close()
        with pytest.raises(LinkError):
            await asyncio.wait_for(task, 5)


# --- the driver against the simulator -------------------------------------------------------


def sim_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=2)
    printout_urine.add_arguments(parser)
    return parser.parse_args(["--first-after", "0", "--nak-window", "0.2", *argv])


async def take(analyzer: PrintoutUrineAnalyzer, count: int) -> list[Measurement]:
    async def collect() -> list[Measurement]:
        return [await analyzer.next_measurement() for _ in range(count)]

    return await asyncio.wait_for(collect(), 30)


@pytest.mark.parametrize(
    ("dialect", "where"), [("consult120", "tcp://127.0.0.1:0"), ("clinitek50", "pty")])
async def test_driver_reads_reports_from_simulator(dialect: str, where: str) -> None:
    device = printout_urine.PrintoutUrineDevice(sim_args("--dialect", dialect, "--every", "0.1"))
    server = SimulatorServer(device.serve, Endpoint.parse(where))
    async with server, SerialLink.open(server.address) as link:
        measurements = await take(PrintoutUrineAnalyzer(link), 3)
    for measurement in measurements:
        assert len(measurement.readings) == 10
        assert measurement.device_time is not None
        assert abs(measurement.device_time - datetime.now(UTC).replace(tzinfo=None)) < timedelta(
            minutes=5)


async def test_simulated_clinitek_reprints_after_nak_and_survives_corruption() -> None:
    faults = Faults(corrupt_rate=0.002, seed=3)
    device = printout_urine.PrintoutUrineDevice(
        sim_args("--dialect", "clinitek50", "--every", "0.05"))
    server = SimulatorServer(device.serve, TCP, faults)
    async with server, SerialLink.open(server.address) as link:
        analyzer = PrintoutUrineAnalyzer(link)
        measurements = await take(analyzer, 6)
    assert analyzer.rejected > 0  # corrupted reports were NAKed, reprinted, none lost …
    assert sorted(m.raw.split(b"\r\n")[2][:3] if m.raw else b"" for m in measurements) == [
        b"%03d" % n for n in range(1, 7)]  # a NAK that comes late makes a late reprint
    for measurement in measurements:  # … and what came through is intact
        assert measurement.raw is not None
        assert parse_report(measurement.raw, RECEIVED).readings == measurement.readings
        assert len(measurement.readings) == 10


async def test_device_clock_years_off_is_kept_as_reported() -> None:
    five_years = 5 * 365 * 86400
    device = printout_urine.PrintoutUrineDevice(sim_args("--clock-offset", str(five_years)))
    server = SimulatorServer(device.serve, TCP)
    async with server, SerialLink.open(server.address) as link:
        (measurement,) = await take(PrintoutUrineAnalyzer(link), 1)
    assert measurement.device_time is not None
    ahead = measurement.device_time - measurement.received_at.replace(tzinfo=None)
    assert abs(ahead - timedelta(seconds=five_years)) < timedelta(minutes=5)


@pytest.mark.parametrize("dialect", ["consult120", "clinitek50"])
async def test_handed_over_log_records_each_printed_report_as_printed(
    dialect: str, tmp_path: Path,
) -> None:
    log = tmp_path / "handed-over.jsonl"
    device = printout_urine.PrintoutUrineDevice(
        sim_args("--dialect", dialect, "--every", "0.1", "--handed-over-log", str(log)))
    server = SimulatorServer(device.serve, TCP)
    async with server, SerialLink.open(server.address) as link:
        measurements = await take(PrintoutUrineAnalyzer(link), 3)
    # a report is logged once written, before the next one is: the first two are there
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["strip"] for e in entries[:2]] == [1, 2]
    for entry, measurement in zip(entries[:2], measurements, strict=False):
        assert measurement.device_time is not None
        assert datetime.strptime(entry["device_time"], entry["time_format"]) == \
            measurement.device_time
        assert measurement.raw is not None and entry["device_time"].encode() in measurement.raw


async def test_a_host_that_hangs_up_ends_the_session_and_no_report_is_lost() -> None:
    """A connection opened and closed at once (a port probe) must neither hold the line nor
    swallow the next report: it ends the session, and the report waits for the next host."""
    device = printout_urine.PrintoutUrineDevice(sim_args("--first-after", "1", "--every", "60"))
    async with SimulatorServer(device.serve, TCP) as server:
        host, port = server.address.removeprefix("socket://").rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port))
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(5):
            while not (server.connections and server._active and server._active.done()):
                await asyncio.sleep(0.01)
        assert device.strips.count == 0  # the session ended before the first strip was due
        async with SerialLink.open(server.address) as link:
            (measurement,) = await take(PrintoutUrineAnalyzer(link), 1)
    assert measurement.raw is not None and b"No. 100001" in measurement.raw
