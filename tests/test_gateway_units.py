"""Gateway pieces without a broker: observation mapping, device clocks, enrolment, the status
board, page and CLI, and config errors."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.R4B.observation import Observation

from daemons.gateway import enrolment
from daemons.gateway.clock import ClockTracker, localize
from daemons.gateway.daemon import CONFIG, publish_due
from daemons.gateway.devices import DeviceRunner, DeviceSection
from daemons.gateway.observations import Context, codes_from_strings, observations
from daemons.gateway.status_page import StatusBoard, StatusPage
from drivers.measurement import Measurement, Reading, Samples
from medge import cli, config

NOW = datetime(2026, 11, 22, 9, 30, tzinfo=UTC)
REPO = Path(__file__).resolve().parent.parent


def ctx(patient: str | None = "p-1", **kw: Any) -> Context:
    return Context(device_ref="urine-astm:SN1", patient=patient, **kw)


def strip() -> Measurement:
    taken = datetime(2026, 11, 22, 9, 29, 50, tzinfo=UTC)
    return Measurement("urine-astm", "SN1", (
        Reading("urine.ph", 6.5, "[pH]", device_time=taken),
        Reading("urine.sg", 1.030, "1", comparator=">=", device_time=taken),
        Reading("urine.leukocytes", 70.0, "{Leu}/uL", text="1+", ordinal=2,
                flags=frozenset({"abnormal"}), device_time=taken),
        Reading("urine.nitrite", None, "", text="pos", ordinal=2, device_time=taken),
        Reading("urine.blood", None, "", text="+/-", ordinal=1, device_time=taken),
    ), received_at=NOW, device_time=taken)


def by_code(bodies: list[dict[str, Any]], code: str) -> dict[str, Any]:
    return next(b for b in bodies if any(c["code"] == code for c in b["code"]["coding"]))


def test_strip_results_keep_token_grade_and_concentration_apart() -> None:
    bodies = observations(strip(), ctx())
    for body in bodies:
        Observation.model_validate(body)
    ph = by_code(bodies, "5803-2")
    assert ph["valueQuantity"]["value"] == 6.5 and ph["category"][0]["coding"][0]["code"] \
        == "laboratory"
    assert by_code(bodies, "5811-5")["valueQuantity"]["comparator"] == ">="
    leu = by_code(bodies, "5799-2")
    assert leu["valueCodeableConcept"]["coding"][0]["code"] == "260347006"  # "+"
    assert leu["valueCodeableConcept"]["text"] == "1+"
    assert leu["component"][0]["valueQuantity"] == {
        "value": 70.0, "unit": "{Leu}/uL", "system": "http://unitsofmeasure.org",
        "code": "{Leu}/uL"}
    assert leu["interpretation"][0]["coding"][0]["code"] == "A"
    nitrite = by_code(bodies, "5802-4")
    assert nitrite["valueCodeableConcept"]["coding"][0]["code"] == "10828004"  # Positive
    assert by_code(bodies, "5794-3")["valueCodeableConcept"]["text"] == "+/-"
    assert all(b["subject"] == {"reference": "Patient/p-1"} and b["status"] == "final"
               for b in bodies)


def test_identifier_is_stable_for_the_same_reading_and_differs_for_another() -> None:
    first = observations(strip(), ctx())
    again = observations(strip(), ctx())
    assert [b["identifier"] for b in first] == [b["identifier"] for b in again]
    assert len({b["identifier"][0]["value"] for b in first}) == len(first)


def test_unpaired_data_has_no_subject_is_preliminary_and_tagged() -> None:
    for body in observations(strip(), ctx(patient=None)):
        assert "subject" not in body and body["status"] == "preliminary"
        assert body["meta"]["tag"] == [{"system": "urn:medge:flag", "code": "unpaired"}]


def test_oximeter_without_signal_gives_data_absent_and_device_flags_as_tags() -> None:
    m = Measurement("cms50", "SIM1", (
        Reading("spo2", None, "%", text="no signal", flags=frozenset({"finger_out"})),
        Reading("pulse_rate", 72.0, "/min"),
    ), received_at=NOW, samples=(Samples("pleth", "1", timedelta(seconds=1 / 60),
                                         (10.0, 20.0, 30.0)),))
    bodies = observations(m, ctx(clock_skewed=True))
    for body in bodies:
        Observation.model_validate(body)
    spo2 = by_code(bodies, "59408-5")
    assert "valueQuantity" not in spo2
    assert spo2["dataAbsentReason"]["text"] == "no signal"
    assert {t["code"] for t in spo2["meta"]["tag"]} == {"finger_out", "clock-skew"}
    assert by_code(bodies, "150452")["valueSampledData"]["data"] == "10 20 30"
    assert len(observations(m, ctx(), with_samples=False)) == 2


def test_a_bare_number_without_unit_is_dimensionless_not_lost() -> None:
    m = Measurement("x", "", (Reading("vent.ie_ratio", 0.5, ""),), received_at=NOW)
    body = observations(m, ctx())[0]
    assert body["valueQuantity"]["value"] == 0.5 and body["valueQuantity"]["code"] == "1"


def test_unknown_quantities_get_local_codes_and_register_map_codes_are_added() -> None:
    m = Measurement("ventilator", "V1", (Reading("vent.pressure", 12.5, "cm[H2O]"),
                                         Reading("vent.peep", 5.0, "cm[H2O]")),
                    received_at=NOW)
    extra = codes_from_strings([("vent.peep", "LOINC:76248-4 MDC:152720"),
                                ("vent.pressure", "MDC:151957")])
    bodies = observations(m, ctx(extra_codes=extra))
    assert [c["code"] for c in bodies[0]["code"]["coding"]] == ["151957"]
    assert [c["code"] for c in bodies[1]["code"]["coding"]] == ["76248-4", "152720"]
    plain = observations(m, ctx())
    assert plain[0]["code"]["coding"] == [{"system": "urn:medge:code", "code": "vent.pressure"}]
    with pytest.raises(ValueError, match="FOO:1"):
        codes_from_strings([("x", "FOO:1")])


def test_clock_tracker_estimates_the_error_and_flags_skew_without_reordering() -> None:
    tracker = ClockTracker(skew_threshold_s=300)
    years_behind = timedelta(days=7 * 365)
    for delay in (5.0, 0.5, 2.0):  # results arrive 0.5-5 s after they were measured
        received = NOW + timedelta(minutes=1)
        m = Measurement("x", "", (Reading("urine.ph", 6.0, "[pH]"),), received_at=received,
                        device_time=received - years_behind - timedelta(seconds=delay))
        offset = tracker.observe(m)
    assert offset == pytest.approx(years_behind.total_seconds() + 0.5)
    assert tracker.skewed
    # a stored result sent an hour late keeps its own (corrected) time
    late = Measurement("x", "", (Reading("urine.ph", 6.0, "[pH]"),), received_at=NOW,
                       device_time=NOW - years_behind - timedelta(hours=1))
    assert tracker.observe(late) == pytest.approx(offset)
    body = observations(late, ctx(clock_offset_s=offset))[0]
    assert body["effectiveDateTime"].startswith("2026-11-22T08:30")
    assert body["extension"][0]["valueDateTime"].startswith("2019")


def test_localize_reads_naive_device_times_in_the_device_zone() -> None:
    naive = datetime(2026, 7, 1, 10, 0)
    m = Measurement("x", "", (Reading("urine.ph", 6.0, "[pH]", device_time=naive),),
                    received_at=NOW, device_time=naive)
    fixed = localize(m, ZoneInfo("Europe/Berlin"))
    assert fixed.device_time == datetime(2026, 7, 1, 8, 0, tzinfo=UTC)
    assert fixed.readings[0].device_time == fixed.device_time


# -- enrolment and the CLI ----------------------------------------------------------------


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[node]\nsite = "home"\nnode = "gw-9"\nstate_dir = "{tmp_path / "state"}"\n'
        '[[gateway.devices]]\nname = "oximeter"\ndriver = "cms50"\n'
        'port = "socket://127.0.0.1:9"\n')
    return path


def test_pair_writes_the_enrolment_atomically_and_status_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    assert cli.main(["gateway", "pair", "--config", str(path), "--patient", "pz-81",
                     "--device", "cms50:SIM0001", "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["patient"] == "pz-81" and written["devices"] == ["cms50:SIM0001"]
    state = tmp_path / "state"
    assert [p.name for p in state.iterdir()] == ["gateway-enrolment.json"]  # no temp left
    current = enrolment.load(state)
    assert current is not None
    assert current.subject_for("cms50", "SIM0001") == "pz-81"
    assert current.subject_for("cms50", "OTHER") is None

    assert cli.main(["gateway", "status", "--config", str(path)]) == 3
    assert "no status yet" in capsys.readouterr().err
    board = StatusBoard("gw-9")
    board.add("oximeter", "cms50")
    board.taken("oximeter", NOW)
    board.paired = True
    (state / "gateway-status.json").write_text(json.dumps(board.snapshot()))
    assert cli.main(["gateway", "status", "--config", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["running"] and shown["devices"][0]["last_taken"] == "2026-11-22T09:30:00+00:00"
    board.stopped = True
    (state / "gateway-status.json").write_text(json.dumps(board.snapshot()))
    assert cli.main(["gateway", "status", "--config", str(path)]) == 3
    assert "NOT RUNNING" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--patient", "Jane Doe"], "pseudonym"),
    (["--patient", "p1", "--device", "cms50"], "KIND:SERIAL"),
])
def test_pair_refuses_bad_input_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], message: str) -> None:
    path = write_config(tmp_path)
    assert cli.main(["gateway", "pair", "--config", str(path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "state" / "gateway-enrolment.json").exists()


@pytest.mark.parametrize("content", ["{not json", "[]", '{"devices": []}',
                                     '{"patient": "a b"}'])
def test_a_corrupt_enrolment_is_reported_and_data_goes_out_unpaired(tmp_path: Path,
                                                                    content: str) -> None:
    (tmp_path / "gateway-enrolment.json").write_text(content)
    with pytest.raises(enrolment.EnrolmentError, match="gateway-enrolment.json"):
        enrolment.load(tmp_path)
    watcher = enrolment.EnrolmentWatcher(tmp_path)
    watcher.refresh()
    assert watcher.current is None and watcher.error


def test_enrolment_watcher_picks_up_a_new_pairing(tmp_path: Path) -> None:
    watcher = enrolment.EnrolmentWatcher(tmp_path)
    assert not watcher.refresh() and watcher.current is None
    enrolment.save(tmp_path, enrolment.make("p-2", []))
    assert watcher.refresh() and watcher.current and watcher.current.patient == "p-2"
    assert not watcher.refresh()


# -- status board and page ----------------------------------------------------------------


def test_delivered_follows_the_outbox_floor_per_stream() -> None:
    board = StatusBoard("gw")
    board.add("oxi", "cms50")
    for seq in (1, 2, 3):
        board.emitted("oxi", seq, NOW + timedelta(minutes=seq))
    board.delivered_up_to({"oxi/obs": 3})  # 3 and later still unacked
    status = board.devices["oxi"]
    assert status.last_delivered == NOW + timedelta(minutes=2) and status.waiting == 1
    board.delivered_up_to({})
    assert status.last_delivered == NOW + timedelta(minutes=3) and status.waiting == 0


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /nope HTTP/1.0\r\n\r\n", b"404"),
    (b"DELETE / HTTP/1.0\r\n\r\n", b"405"),
    (b"garbage\r\n\r\n", b"400"),
    (b"\x00\xff" * 10 + b"\r\n\r\n", b"400"),
    (b"GET / HTTP/1.0\r\n", b"400"),  # never finished: times out or closes
])
async def test_status_page_answers_bad_requests_cleanly(request_bytes: bytes,
                                                        status: bytes) -> None:
    page = StatusPage(StatusBoard("gw"), "127.0.0.1", 0)
    url = await page.start()
    try:
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request_bytes)
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
    finally:
        await page.close()
    assert answer.split(b" ")[1] == status


# -- configuration --------------------------------------------------------------------------


def base(devices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"node": {"site": "h", "node": "g"}, "gateway": {"devices": devices}}


@pytest.mark.parametrize(("devices", "key", "reason"), [
    ([], "gateway.devices", "at least 1"),
    ([{"name": "a", "driver": "urine-astm", "port": "auto"}], "gateway.devices[0]", "probe"),
    ([{"name": "a", "driver": "cms50", "port": "auto"},
      {"name": "b", "driver": "cms50", "port": "auto"}], "gateway", "told apart"),
    ([{"name": "a", "driver": "modbus", "port": "/dev/ttyUSB0"}], "gateway.devices[0]", "map"),
    ([{"name": "a", "driver": "modbus", "port": "/dev/ttyUSB0", "map": "/nonexistent.toml"}],
     "gateway.devices[0]", "not found"),
    ([{"name": "a", "driver": "thermometer", "port": "/dev/ttyUSB0"}],
     "gateway.devices[0].driver", "must be one of"),
    ([{"name": "a b", "driver": "cms50", "port": "/dev/ttyUSB0"}], "gateway.devices[0]", "name"),
    ([{"name": "a", "driver": "cms50", "port": "x"}] * 2, "gateway", "used twice"),
    ([{"name": "a", "driver": "cms50", "port": "x", "stale_warn_min": 30,
       "stale_urgent_min": 15}], "gateway.devices[0]", "stale_urgent_min"),
    ([{"name": "a", "driver": "cms50", "port": "x", "clock_timezone": "Moon/Base"}],
     "gateway.devices[0]", "clock_timezone"),
])
def test_bad_gateway_configs_name_the_key_and_reason(devices: list[dict[str, Any]], key: str,
                                                     reason: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.from_mapping(base(devices), CONFIG, source="gateway.toml")
    assert info.value.key.startswith(key) and reason in str(info.value)


def test_the_shipped_example_config_is_valid() -> None:
    cfg = config.load(REPO / "config" / "gateway.toml", CONFIG)
    assert {d.driver for d in cfg.gateway.devices} == {
        "cms50", "modbus", "urine-astm", "urine-printout", "uroflow"}
    assert os.path.isabs(str(cfg.gateway.devices[1].map))


def test_readings_are_published_at_their_pace_and_after_the_clock_steps_back() -> None:
    last: dict[str, datetime] = {}
    t0 = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
    assert publish_due(last, "oximeter", 6.0, t0)
    assert not publish_due(last, "oximeter", 6.0, t0 + timedelta(seconds=5))
    assert publish_due(last, "oximeter", 6.0, t0 + timedelta(seconds=6))
    back = t0 - timedelta(hours=1)  # NTP steps the clock back an hour
    assert publish_due(last, "oximeter", 6.0, back)
    assert not publish_due(last, "oximeter", 6.0, back + timedelta(seconds=1))
    assert publish_due(last, "urine", 0.0, t0)  # every strip, whatever the clock does
    assert publish_due(last, "urine", 0.0, back)
    assert publish_due(last, "urine", 0.0, back)


def test_no_data_levels_follow_the_monotonic_clock_not_the_wall_clock() -> None:
    """A box without a real-time clock boots at a stale wall time and NTP steps it by hours:
    judged on the wall clock, every device got a "no data for 600 min" alarm at once."""
    elapsed = [1000.0]

    async def ignore(*_: Any) -> None:
        pass

    runner = DeviceRunner(DeviceSection("scale", "urine-printout", "socket://127.0.0.1:9"),
                          ignore, ignore, monotonic=lambda: elapsed[0])
    levels = []
    for minutes in (14.9, 15.0, 29.9, 30.0, 30.5):
        elapsed[0] = 1000.0 + minutes * 60
        levels.append(runner.check_stale())
    assert levels == [None, "warn", None, "urgent", None]
    assert runner.minutes_without_data() == pytest.approx(30.5)
