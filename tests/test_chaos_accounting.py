"""The pure logic of bench/chaos and bench/soak: loss accounting across outboxes, the fault
schedule, the hospital subscriber's bookkeeping and recovery probes, the RSS slope."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.chaos import OutboxSnapshot, colliding_streams, interleave, read_outbox, tally
from bench.chaos_gateway import HandedOver, read_handed_over, unreached_strips
from bench.parts import Hospital
from bench.soak import slope_per_hour
from medge.outbox import Outbox
from medge.settings import OutboxSection
from medge.telemetry import DEVICE_CLOCK_EXTENSION
from medge.topics import Topics

TOPIC = "medge/v1/site/node/{device}/{kind}"


def envelope(stream: str, seq: int, msg_id: str, sent: float | None = None) -> bytes:
    sent_at = datetime.fromtimestamp(time.time() if sent is None else sent, UTC)
    return json.dumps({"msg_id": msg_id, "stream": stream, "seq": seq,
                       "sent_at": sent_at.isoformat(timespec="milliseconds"),
                       "body": {}}).encode()


def test_tally_counts_what_was_numbered_and_never_arrived_as_lost() -> None:
    outbox = OutboxSnapshot(last_seq={"a/obs": 5, "b/obs": 2}, queued={"a/obs": {5}}, dead=1)
    received = {"a/obs": {1, 2, 4}, "b/obs": {1, 2}, "other/obs": {1}}
    copies = [("a/obs", 2), ("a/obs", 1), ("b/obs", 3), ("other/obs", 4)]

    result = tally(outbox, received, copies)

    assert result.produced == 7
    assert result.delivered == 5
    assert result.missing == {"a/obs": [3]}  # seq 5 is still queued: not lost
    assert result.lost == 1
    assert result.queued == 1
    assert result.dead == 1
    assert result.duplicated == 3  # the other outbox's copies are not this one's


def test_tally_ignores_seqs_numbered_after_the_snapshot() -> None:
    outbox = OutboxSnapshot(last_seq={"a/obs": 2}, queued={}, dead=0)
    result = tally(outbox, {"a/obs": {1, 2, 3}}, [])
    assert (result.produced, result.delivered, result.lost) == (2, 2, 0)


async def test_a_real_outbox_reads_as_numbered_and_still_queued(tmp_path: Path) -> None:
    """The rig reads the daemons' outbox files with its own SQL: keep it true to the schema."""
    path = tmp_path / "gateway-outbox.sqlite3"
    async with Outbox(path, OutboxSection(), Topics("site", "node")) as outbox:
        records = [await outbox.append("spo2", "obs", {"n": n}) for n in range(3)]
        await outbox.append("spo2", "alert", {"alert": "low"})
        await outbox.ack([records[0].id, records[2].id])  # the broker acknowledged these

        snapshot = read_outbox(path)

    assert snapshot == OutboxSnapshot(last_seq={"spo2/obs": 3, "spo2/alert": 1},
                                      queued={"spo2/obs": {2}, "spo2/alert": {1}}, dead=0)
    result = tally(snapshot, {"spo2/obs": {1}}, [])
    assert result.missing == {"spo2/obs": [3]}  # acknowledged, never seen by the hospital


def test_streams_numbered_by_two_outboxes_are_reported() -> None:
    one = OutboxSnapshot({"x/obs": 1, "gateway/alert": 1}, {}, 0)
    two = OutboxSnapshot({"y/obs": 1, "gateway/alert": 3}, {}, 0)
    assert colliding_streams({"one": one, "two": two}) == {"gateway/alert"}
    assert colliding_streams({"one": one}) == set()


def test_interleave_takes_one_of_each_list_in_turn() -> None:
    assert interleave(["s1", "s2", "s3"], ["g1"], ["r1", "r2"]) == \
        ["s1", "g1", "r1", "s2", "r2", "s3"]
    assert interleave() == []


def test_hospital_counts_envelopes_and_keeps_health_apart() -> None:
    hospital = Hospital(port=1)
    hospital.take(TOPIC.format(device="spo2", kind="obs"), envelope("spo2/obs", 1, "m1"))
    hospital.take(TOPIC.format(device="spo2", kind="obs"), envelope("spo2/obs", 1, "m1"))
    hospital.take(TOPIC.format(device="gateway", kind="health"),
                  json.dumps({"daemon": "gateway", "tasks": 17}).encode())
    hospital.take("elsewhere/topic", b"{}")
    hospital.take(TOPIC.format(device="spo2", kind="obs"), b"not json")

    assert hospital.seen == {"m1": 2}
    assert hospital.by_stream == {"spo2/obs": {1}}
    assert hospital.stream_of == {"m1": "spo2/obs"}
    assert hospital.health["gateway"]["tasks"] == 17


async def test_arrival_waits_for_a_message_sent_after_the_fault() -> None:
    hospital = Hospital(port=1)
    topic = TOPIC.format(device="vent", kind="obs")
    ended = time.monotonic()
    waiting = asyncio.create_task(hospital.arrival_from(ended, {"vent", "spo2"}))
    # a copy the broker held from before the fault ended, and another device's: no recovery
    hospital.take(topic, envelope("vent/obs", 1, "m1", sent=time.time() - 5))
    hospital.take(TOPIC.format(device="urine", kind="obs"), envelope("urine/obs", 1, "m2"))
    await asyncio.sleep(0)
    assert not waiting.done()

    hospital.take(topic, envelope("vent/obs", 2, "m3"), now=ended + 1.5)

    assert await asyncio.wait_for(waiting, 5) == ended + 1.5
    assert await hospital.arrival(ended, "vent") == ended + 1.5  # already there: at once


async def test_a_timed_out_arrival_leaves_no_waiter_behind() -> None:
    hospital = Hospital(port=1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(hospital.arrival(time.monotonic(), "vent"), 0.01)
    assert not hospital._waiters


def test_rss_slope_is_per_hour() -> None:
    assert slope_per_hour([(0, 100.0), (1800, 101.0), (3600, 102.0)]) == pytest.approx(2.0)
    assert slope_per_hour([(0, 100.0)]) == 0.0


def strip_obs(stream: str, seq: int, msg_id: str, device_time: str | None,
              code: str = "5803-2") -> bytes:
    body: dict[str, object] = {"resourceType": "Observation",
                               "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                               "effectiveDateTime": "2026-12-06T10:00:00.000Z"}
    if device_time is not None:
        body["extension"] = [{"url": DEVICE_CLOCK_EXTENSION, "valueDateTime": device_time}]
    message = json.loads(envelope(stream, seq, msg_id))
    return json.dumps({**message, "body": body}).encode()


def test_hospital_counts_observations_by_device_clock_once_per_message() -> None:
    hospital = Hospital(port=1)
    urine = TOPIC.format(device="urine", kind="obs")
    hospital.take(urine, strip_obs("urine/obs", 1, "m1", "2026-12-06T11:15:00.000Z"))
    hospital.take(urine, strip_obs("urine/obs", 1, "m1", "2026-12-06T11:15:00.000Z"))  # again
    hospital.take(urine, strip_obs("urine/obs", 2, "m2", "2026-12-06T11:15:00.000Z", "5811-5"))
    hospital.take(urine, strip_obs("urine/obs", 3, "m3", "2026-12-06T11:15:00.000Z"))
    hospital.take(TOPIC.format(device="spo2", kind="obs"), strip_obs("spo2/obs", 1, "m4", None))
    hospital.take(TOPIC.format(device="urine", kind="alert"),
                  strip_obs("urine/alert", 1, "m5", "2026-12-06T11:15:00.000Z"))

    assert hospital.device_times == {"urine": {("2026-12-06T11:15:00.000Z", "5803-2"): 2,
                                               ("2026-12-06T11:15:00.000Z", "5811-5"): 1}}


def handed(strip: int, wire: str, fmt: str = "%d-%m-%Y %H:%M") -> HandedOver:
    return HandedOver(strip, wire, datetime.strptime(wire, fmt).replace(tzinfo=UTC))


def test_strips_sharing_a_device_time_are_matched_by_count() -> None:
    """Three strips printed in one minute, two reached the hospital (two pH observations, one
    of them for the third pad too): the third is missing; one at another minute arrived."""
    strips = [handed(1, "06-12-2026 11:15"), handed(2, "06-12-2026 11:15"),
              handed(3, "06-12-2026 11:15"), handed(4, "06-12-2026 11:16")]
    received = {("2026-12-06T11:15:00.000Z", "5803-2"): 2,
                ("2026-12-06T11:15:00.000Z", "5811-5"): 1,
                ("2026-12-06T11:16:00.000Z", "5803-2"): 1}

    assert unreached_strips(strips, received) == [strips[2]]
    assert unreached_strips(strips, {}) == strips
    assert unreached_strips([], received) == []


def test_strips_match_on_the_device_clock_not_the_corrected_time() -> None:
    """A device clock an hour ahead: the hospital's key is the device's time (as the
    extension carries it), the wire's second resolution (ASTM) included."""
    strip = handed(7, "20261206111500", "%Y%m%d%H%M%S")
    assert unreached_strips([strip], {("2026-12-06T11:15:00.000Z", "5803-2"): 1}) == []
    assert unreached_strips([strip], {("2026-12-06T10:15:00.000Z", "5803-2"): 1}) == [strip]
    assert unreached_strips([strip], {("not a time", "5803-2"): 1}) == [strip]


def test_handed_over_log_is_read_skipping_a_half_written_line(tmp_path: Path) -> None:
    log = tmp_path / "handed-over.jsonl"
    assert read_handed_over(log) == []
    log.write_text('{"strip": 1, "device_time": "06-12-2026 11:15", "time_format": '
                   '"%d-%m-%Y %H:%M"}\n{"strip": 2, "device_ti')

    assert read_handed_over(log) == [handed(1, "06-12-2026 11:15")]
