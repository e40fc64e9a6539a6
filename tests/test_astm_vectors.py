"""Golden vectors of protocols.md §4.4 (copied here; checksums verified there with §4.2), checked
against both independent codecs: the driver's receiver and the simulator's sender."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from drivers import astm_link
from drivers.astm import measurements_from_message
from drivers.astm_records import AstmRecordError, parse_records
from firmware_sim import astm_urine, urine_strip

GOLDEN_FRAMES = [
    b"\x021H|\\^&|||UA-SIM^1.0^SN0001|||||||P|LIS2-A2|20250301083000\r\x03D0\r\n",
    b"\x022P|1||PAT-0001\r\x030A\r\n",
    b"\x023O|1|S0001||^^^UA10|R||20250301082500||||N||||URINE\r\x030B\r\n",
    b"\x024R|1|^^^PH|6.5|[pH]|5.0 to 8.0|N||F||||20250301083000\r\x03EA\r\n",
    b"\x025R|2|^^^SG|1.015|||N||F||||20250301083000\r\x038E\r\n",
    b"\x026R|3|^^^LEU|neg|{Leu}/uL||N||F||||20250301083000\r\x032F\r\n",
    b"\x027L|1|N\r\x030A\r\n",
]
GOLDEN_RECORDS = [frame[2:-5] for frame in GOLDEN_FRAMES]
"""The record texts (each ending in CR) carried by the golden frames."""
GOLDEN_MESSAGE = b"".join(GOLDEN_RECORDS)
ONE_FRAME_LENGTH = 277
"""The reference: the same 7 records in one frame are 277 chars (> 247), so they need 2 frames."""
RECEIVED = datetime(2026, 11, 22, 1, 0, tzinfo=UTC)


@pytest.mark.parametrize("frame", GOLDEN_FRAMES)
def test_driver_decodes_golden_frame(frame: bytes) -> None:
    decoded = astm_link.decode_frame(frame)
    assert decoded.final
    assert decoded.number == GOLDEN_FRAMES.index(frame) + 1
    assert decoded.text == frame[2:-5]
    assert astm_link.checksum(frame[1:-4]) == frame[-4:-2]


def test_simulator_encodes_golden_frames_byte_for_byte() -> None:
    assert astm_urine.build_frames(GOLDEN_RECORDS) == GOLDEN_FRAMES


def test_whole_message_is_split_into_two_frames_both_ways() -> None:
    assert len(GOLDEN_MESSAGE) + 7 == ONE_FRAME_LENGTH
    frames = astm_urine.build_frames(GOLDEN_RECORDS, one_record_per_frame=False)
    assert [len(f) for f in frames] == [247, ONE_FRAME_LENGTH - 240]
    decoded = [astm_link.decode_frame(f) for f in frames]
    assert [(f.number, f.final) for f in decoded] == [(1, False), (2, True)]
    assert b"".join(f.text for f in decoded) == GOLDEN_MESSAGE


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (GOLDEN_FRAMES[1].replace(b"0A\r\n", b"0B\r\n"), "checksum"),
        (GOLDEN_FRAMES[1].replace(b"\x03", b"\x04"), "ETX or ETB"),
        (GOLDEN_FRAMES[1][:-2], "STX"),
        (b"\x028P|1\r\x03" + astm_link.checksum(b"8P|1\r\x03") + b"\r\n", "frame number"),
        (b"\x021P|\x051\r\x03" + astm_link.checksum(b"1P|\x051\r\x03") + b"\r\n", "restricted"),
        (b"\x021" + b"x" * 241 + b"\x03" + astm_link.checksum(b"1" + b"x" * 241 + b"\x03")
         + b"\r\n", "exceeds"),
    ],
)
def test_driver_rejects_bad_frames_with_a_reason(frame: bytes, reason: str) -> None:
    with pytest.raises(astm_link.AstmFrameError, match=reason):
        astm_link.decode_frame(frame)


def test_golden_message_becomes_one_measurement() -> None:
    (measurement,) = measurements_from_message(GOLDEN_MESSAGE, RECEIVED)
    assert measurement.device_id == "SN0001"
    assert measurement.device_time == datetime(2025, 3, 1, 8, 25)
    assert measurement.received_at == RECEIVED
    ph, sg, leu = measurement.readings
    assert (ph.quantity, ph.value, ph.unit, ph.ordinal) == ("urine.ph", 6.5, "[pH]", None)
    assert (sg.quantity, sg.value, sg.unit) == ("urine.sg", 1.015, "1")
    assert (leu.quantity, leu.value, leu.text, leu.ordinal) == ("urine.leukocytes", None, "neg", 0)
    assert ph.device_time == datetime(2025, 3, 1, 8, 30)
    assert not ph.flags


def test_frame_number_prefix_is_stripped_from_whole_message_frames() -> None:
    records = parse_records(b"1" + GOLDEN_MESSAGE)
    assert [r.type for r in records] == ["H", "P", "O", "R", "R", "R", "L"]


def test_delimiters_come_from_the_header() -> None:
    message = (b"H;~!$;;;UA!1!X9\rP;1\rO;1;S1;;!!!UA10\r"
               b"R;1;!!!NIT;pos;;;A;;F\rR;2;!!!GLU;1+!250;mg/dL;;A;;F\rL;1;N\r")
    (measurement,) = measurements_from_message(message, RECEIVED)
    assert measurement.device_id == "X9"
    nitrite, glucose = measurement.readings
    assert (nitrite.text, nitrite.ordinal, nitrite.flags) == ("pos", 2, {"abnormal", "astm:A"})
    assert (glucose.value, glucose.unit, glucose.text) == (250.0, "mg/dL", "1+")


def test_escape_sequences_are_decoded() -> None:
    records = parse_records(b"H|\\^&\rC|1|I|a&F&b&S&c&R&d&E&e|G\rL|1|N\r")
    assert records[1].text(4) == "a|b^c\\d&e"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"P|1\rL|1\r", "header"),
        (b"H|\\^&\rZ|1\r", "unknown record type"),
        (b"H|\\^&\rR|1|^^^PH|6.5\r", "outside an order"),
        (b"H|\\^&\rO|1\rR|1|^^^PH|acid\r", "unexpected token 'acid'"),
        (b"H|\\^&\rO|1\rR|1|^^^PH|6.5|||||||||2025-03-01\r", "bad date/time"),
        (b"H|\\^&\rO|1\rR|1|^^^PH|6.5|furlongs\r", "unknown unit"),
        (b"H||||\rL|1\r", "delimiters"),
        (b"H|\\^&\xff\r", "non-ASCII"),
    ],
)
def test_bad_messages_raise_a_typed_error_naming_the_fault(message: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as raised:
        measurements_from_message(message, RECEIVED)
    assert isinstance(raised.value, AstmRecordError)


def test_simulated_strip_message_decodes_to_ten_pads() -> None:
    import random

    pads = urine_strip.random_strip(random.Random(3))
    records = astm_urine.strip_message("SN9", 7, datetime(2031, 1, 2, 3, 4, 5), pads)
    (measurement,) = measurements_from_message(b"".join(records), RECEIVED)
    assert len(measurement.readings) == 10
    assert measurement.device_time == datetime(2031, 1, 2, 3, 4, 5)
    for pad, reading in zip(pads, measurement.readings, strict=True):
        assert ("abnormal" in reading.flags) == pad.abnormal
