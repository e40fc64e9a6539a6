"""The gateway end to end: device simulators → drivers → gateway → real mosquitto → hospital.

Simulators run in-process (firmware_sim.link.SimulatorServer on loopback TCP), the hospital
is tests.helpers.Collector, every Observation is validated as FHIR R4 with fhir.resources.
The durability scenario runs the gateway as a separate process and SIGKILLs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.observation import Observation

from daemons.gateway import enrolment
from daemons.gateway.daemon import CONFIG, Gateway, GatewayConfig
from firmware_sim import SIMULATORS
from firmware_sim.link import Endpoint, Faults, SimulatorServer
from medge import config
from medge.runtime import Runtime
from tests.fixtures.broker import Mosquitto
from tests.helpers import Collector

REPO = Path(__file__).resolve().parent.parent
VENT_MAP = REPO / "config" / "ventilators" / "home-ventilator.toml"
PATIENT = "pseudo-7f3a"
DEVICE_TYPED_PATIENT = "PAT-0001"
"""What the ASTM simulator types into its P record: must never become the subject."""


@contextlib.asynccontextmanager
async def simulator(name: str, *argv: str, faults: Faults | None = None,
                    where: str = "tcp://127.0.0.1:0") -> AsyncIterator[tuple[SimulatorServer, Any]]:
    """A ``medge sim NAME`` in this process; yields the server and the handler's device."""
    module = importlib.import_module(SIMULATORS[name])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    handler = module.create(parser.parse_args(list(argv)))
    # A streaming simulator (uroflow) may still be writing when the gateway hangs up; its
    # session then ends in ConnectionResetError instead of HostDisconnected (reported).
    with contextlib.suppress(ConnectionResetError):
        async with SimulatorServer(handler, Endpoint.parse(where), faults) as server:
            yield server, getattr(handler, "__self__", None)


def gateway_settings(state_dir: Path, broker_port: int, devices: list[dict[str, Any]],
                     **rules: Any) -> dict[str, Any]:
    return {
        "node": {"site": "home-test", "node": "gw-1", "state_dir": str(state_dir)},
        "mqtt": {"port": broker_port, "reconnect_min": 0.05, "reconnect_max": 0.5,
                 "keepalive": 5},
        "gateway": {"devices": devices, "rules": rules, "tick_s": 0.1,
                    "status": {"port": 0, "refresh_s": 0.2}},
    }


def gateway_config(*args: Any, **kwargs: Any) -> GatewayConfig:
    return config.from_mapping(gateway_settings(*args, **kwargs), CONFIG, source="test")


@contextlib.asynccontextmanager
async def running_gateway(cfg: GatewayConfig) -> AsyncIterator[Gateway]:
    async with Runtime(cfg, "gateway") as rt:
        gateway = Gateway(cfg, rt)
        await gateway.start()
        try:
            yield gateway
        finally:
            await gateway.stop()


def bodies(hospital: Collector, device: str, kind: str = "obs") -> list[dict[str, Any]]:
    return [m["body"] for t, m in hospital.messages if t.endswith(f"/{device}/{kind}")]


def codes(body: dict[str, Any]) -> set[str]:
    return {c["code"] for c in body["code"]["coding"]}


async def http_get(url: str, path: str, method: str = "GET") -> tuple[str, str]:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"{method} {path} HTTP/1.0\r\n\r\n".encode())
    await writer.drain()
    response = (await reader.read()).decode()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition("\r\n\r\n")
    return head.split("\r\n")[0], body


async def test_every_simulator_reaches_the_hospital_as_valid_fhir(
    broker: Mosquitto, tmp_path: Path
) -> None:
    enrolment.save(tmp_path, enrolment.make(
        PATIENT, ["cms50:SIM0001", "urine-astm:SN0001", "modbus:VENT-SIM-1"]))
    async with contextlib.AsyncExitStack() as stack:
        oxi, _ = await stack.enter_async_context(simulator("cms50"))
        vent, _ = await stack.enter_async_context(simulator("modbus-vent"))
        astm, _ = await stack.enter_async_context(
            simulator("astm-urine", "--every", "0.5", "--first-after", "0.1"))
        printout, _ = await stack.enter_async_context(
            simulator("printout-urine", "--every", "0.5", "--first-after", "0.1"))
        scale, _ = await stack.enter_async_context(
            simulator("uroflow", "--every", "100", "--speed", "40", "--first-after", "1"))
        cfg = gateway_config(tmp_path, broker.port, [
            {"name": "oximeter", "driver": "cms50", "port": oxi.address,
             "obs_interval_s": 0.5, "pleth_every_s": 1.0},
            {"name": "uroflow", "driver": "uroflow", "port": scale.address},
            {"name": "ventilator", "driver": "modbus", "port": vent.address,
             "map": str(VENT_MAP), "serial": "VENT-SIM-1", "obs_interval_s": 0.5},
            {"name": "urine", "driver": "urine-astm", "port": astm.address},
            {"name": "printout", "driver": "urine-printout", "port": printout.address},
        ])
        hospital = await stack.enter_async_context(Collector(broker.port))
        gateway = await stack.enter_async_context(running_gateway(cfg))

        def complete() -> bool:
            oximetry = bodies(hospital, "oximeter")
            return (any("valueSampledData" in b for b in oximetry)
                    and any("59408-5" in codes(b) for b in oximetry)
                    and len(bodies(hospital, "ventilator")) >= 20
                    and len(bodies(hospital, "urine")) >= 20
                    and len(bodies(hospital, "printout")) >= 10
                    and any("valueSampledData" in b for b in bodies(hospital, "uroflow")))

        await hospital.wait_for(complete, timeout=60)
        assert await gateway.rt.outbox.wait_empty(10)
        await gateway._write_status()
        status_line, page = await http_get(gateway.board.http_url or "", "/")
        json_line, status_json = await http_get(gateway.board.http_url or "", "/status.json")
        refused, _ = await http_get(gateway.board.http_url or "", "/", method="POST")

    observations = [m["body"] for t, m in hospital.messages if t.endswith("/obs")]
    for body in observations:
        Observation.model_validate(body)  # raises on anything that is not FHIR R4
    assert DEVICE_TYPED_PATIENT not in json.dumps(hospital.messages)

    paired = [b for d in ("oximeter", "ventilator", "urine") for b in bodies(hospital, d)]
    assert all(b["subject"] == {"reference": f"Patient/{PATIENT}"} for b in paired)
    assert all(b["status"] == "final" for b in paired)
    for body in bodies(hospital, "printout"):  # its serial is not in the enrolment
        assert "subject" not in body and body["status"] == "preliminary"
        assert {"system": "urn:medge:flag", "code": "unpaired"} in body["meta"]["tag"]

    spo2 = next(b for b in bodies(hospital, "oximeter") if "59408-5" in codes(b))
    assert {"59408-5", "2708-6", "150456"} <= codes(spo2)
    assert spo2["valueQuantity"]["code"] == "%" or "dataAbsentReason" in spo2
    pleth = next(b for b in bodies(hospital, "oximeter") if "valueSampledData" in b)
    assert pleth["valueSampledData"]["period"] == pytest.approx(1000 / 60, abs=1e-3)
    vent_codes = set().union(*(codes(b) for b in bodies(hospital, "ventilator")))
    assert {"9279-1", "33438-3", "151586", "76007-4", "152432"} <= vent_codes
    volume = next(b for b in bodies(hospital, "uroflow") if "9187-6" in codes(b))
    assert volume["valueQuantity"]["code"] == "mL" and volume["valueQuantity"]["value"] > 0
    curve = next(b for b in bodies(hospital, "uroflow") if "valueSampledData" in b)
    assert curve["code"]["coding"][0]["code"] == "uroflow.flow"
    assert len(curve["valueSampledData"]["data"].split()) > 10
    ph = next(b for b in bodies(hospital, "urine") if "5803-2" in codes(b))
    assert ph["valueQuantity"]["code"] == "[pH]"
    assert ph["extension"][0]["url"] == "urn:medge:fhir:extension:device-clock"

    assert status_line.endswith("200 OK") and json_line.endswith("200 OK")
    assert refused.endswith("405 Method Not Allowed")
    snapshot = json.loads(status_json)
    assert [d["device"] for d in snapshot["devices"]] == [
        "oximeter", "uroflow", "ventilator", "urine", "printout"]
    for device in snapshot["devices"]:
        assert device["last_taken"] and device["last_delivered"], device
        assert device["connection"] == "connected" and device["waiting"] == 0
        assert device["device"] in page
    for clinical in ("spo2", "SpO2", "pH", "[pH]", "/min"):  # times only, no values
        assert clinical not in page and clinical not in status_json


async def test_clinical_alerts_reach_the_hospital_with_the_enrolled_patient(
    broker: Mosquitto, tmp_path: Path
) -> None:
    enrolment.save(tmp_path, enrolment.make(PATIENT, []))
    async with contextlib.AsyncExitStack() as stack:
        oxi, _ = await stack.enter_async_context(
            simulator("cms50", "--spo2", "84", "--finger-out-every", "0"))
        vent, _ = await stack.enter_async_context(
            simulator("modbus-vent", "--alarm", "disconnection"))
        hospital = await stack.enter_async_context(Collector(broker.port))
        cfg = gateway_config(tmp_path, broker.port, [
            {"name": "oximeter", "driver": "cms50", "port": oxi.address},
            {"name": "ventilator", "driver": "modbus", "port": vent.address,
             "map": str(VENT_MAP)},
        ], spo2_low=88, spo2_sustain_s=2)
        await stack.enter_async_context(running_gateway(cfg))

        def raised(device: str, rule: str) -> bool:
            return any(a["alert"] == rule for a in bodies(hospital, device, "alert"))

        await hospital.wait_for(lambda: raised("oximeter", "spo2-low")
                                and raised("ventilator", "device-alarm:disconnection"))
    spo2 = next(a for a in bodies(hospital, "oximeter", "alert") if a["alert"] == "spo2-low")
    assert spo2["state"] == "active" and spo2["priority"] == "high"
    assert spo2["patient"] == PATIENT and spo2["category"] == "clinical"
    assert spo2["value"] < 88
    disconnection = next(a for a in bodies(hospital, "ventilator", "alert")
                         if a["alert"] == "device-alarm:disconnection")
    assert disconnection["priority"] == "high"


async def test_a_noisy_line_costs_readings_never_the_gateway(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """Dropped and flipped bytes on every device line: the drivers resynchronise, retransmit
    or reconnect, and what reaches the hospital is still valid FHIR."""
    noise = {"drop_rate": 0.002, "corrupt_rate": 0.002, "seed": 7}
    async with contextlib.AsyncExitStack() as stack:
        oxi, _ = await stack.enter_async_context(simulator("cms50", faults=Faults(**noise)))
        astm, _ = await stack.enter_async_context(simulator(
            "astm-urine", "--every", "0.3", "--first-after", "0.1", "--ack-timeout", "1",
            "--busy-retry", "0.2", faults=Faults(**noise)))
        hospital = await stack.enter_async_context(Collector(broker.port))
        cfg = gateway_config(tmp_path, broker.port, [
            {"name": "oximeter", "driver": "cms50", "port": oxi.address, "obs_interval_s": 0,
             "reconnect_min_s": 0.05},
            {"name": "urine", "driver": "urine-astm", "port": astm.address,
             "reconnect_min_s": 0.05}])
        await stack.enter_async_context(running_gateway(cfg))
        await hospital.wait_for(lambda: len(bodies(hospital, "oximeter")) >= 20
                                and len(bodies(hospital, "urine")) >= 30, timeout=90)
    for body in bodies(hospital, "oximeter") + bodies(hospital, "urine"):
        Observation.model_validate(body)


async def test_unplugged_device_raises_device_lost_and_recovers_by_itself(
    broker: Mosquitto, tmp_path: Path
) -> None:
    faults = Faults()
    async with (simulator("cms50", faults=faults) as (oxi, _), Collector(broker.port) as hospital):
        cfg = gateway_config(tmp_path, broker.port, [
            {"name": "oximeter", "driver": "cms50", "port": oxi.address, "obs_interval_s": 0,
             "reconnect_min_s": 0.05, "reconnect_max_s": 0.2}])
        async with running_gateway(cfg):
            await hospital.wait_for(lambda: len(bodies(hospital, "oximeter")) >= 2)
            faults.disconnect()  # the cable is pulled; the simulator accepts a new host
            await hospital.wait_for(lambda: any(
                a["alert"] == "device-lost" and a["state"] == "cleared"
                for a in bodies(hospital, "oximeter", "alert")))
            count = len(bodies(hospital, "oximeter"))
            await hospital.wait_for(lambda: len(bodies(hospital, "oximeter")) > count + 2)
    lost = [a for a in bodies(hospital, "oximeter", "alert") if a["alert"] == "device-lost"]
    assert [a["state"] for a in lost] == ["active", "cleared"]
    assert all(a["category"] == "technical" and a["patient"] is None for a in lost)


async def test_a_device_with_port_auto_is_found_by_discovery(
    broker: Mosquitto, tmp_path: Path
) -> None:
    # a pty, like a USB serial port: a TCP simulator refuses the second probe's connection
    # while it has not yet noticed that the first probe hung up
    async with simulator("cms50", where="pty") as (oxi, _), Collector(broker.port) as hospital:
        settings = gateway_settings(tmp_path, broker.port, [
            {"name": "oximeter", "driver": "cms50", "port": "auto", "obs_interval_s": 0}])
        settings["gateway"]["discovery"] = {"extra_ports": [oxi.address],
                                            "poll_interval": 0.2, "probe_timeout": 1.0}
        async with running_gateway(config.from_mapping(settings, CONFIG, source="test")):
            await hospital.wait_for(lambda: len(bodies(hospital, "oximeter")) >= 2)
    device = bodies(hospital, "oximeter")[0]["device"]["identifier"]["value"]
    assert device == "cms50:SIM0001"  # the serial number the probe read from the device


async def test_no_data_raises_stale_alerts_at_warn_then_urgent(
    broker: Mosquitto, tmp_path: Path
) -> None:
    async with Collector(broker.port) as hospital:
        cfg = gateway_config(tmp_path, broker.port, [
            {"name": "scale", "driver": "urine-printout", "port": "socket://127.0.0.1:9",
             "stale_warn_min": 0.01, "stale_urgent_min": 0.02, "reconnect_min_s": 0.05}])
        async with running_gateway(cfg) as gateway:
            await hospital.wait_for(lambda: len(bodies(hospital, "scale", "alert")) >= 2)
            assert gateway.board.devices["scale"].stale == "urgent"
    alerts = bodies(hospital, "scale", "alert")
    assert [(a["alert"], a["state"], a["priority"]) for a in alerts[:2]] == [
        ("no-data", "active", "medium"), ("no-data", "active", "high")]


# -- durability: SIGKILL while the broker is unreachable ----------------------------------


def _outbox_device_times(state_dir: Path) -> set[str]:
    """Device times of the strips the gateway has stored (read-only look into its outbox)."""
    path = state_dir / "gateway-outbox.sqlite3"
    if not path.exists():
        return set()
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT body FROM records WHERE kind = 'obs'").fetchall()
    return {json.loads(row[0])["extension"][0]["valueDateTime"] for row in rows}


def _start_gateway(config_path: Path, **extra_env: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra_env}
    return subprocess.Popen([sys.executable, "-m", "medge.cli", "run", "gateway", "--config",
                             str(config_path)], env=env, stdout=subprocess.DEVNULL)


async def _until(predicate: Callable[[], bool], describe: Callable[[], str],
                 timeout: float = 30.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"gave up waiting after {timeout} s: {describe()}") from None


def _toml(settings: dict[str, Any]) -> str:
    """Just enough TOML for the gateway settings used here."""
    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = []
    for section in ("node", "mqtt"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in settings[section].items()]
    gateway = settings["gateway"]
    lines.append("[gateway]")
    lines.append(f"tick_s = {gateway['tick_s']}")
    lines.append("[gateway.status]\nhttp = false")
    for device in gateway["devices"]:
        lines.append("[[gateway.devices]]")
        lines += [f"{k} = {value(v)}" for k, v in device.items()]
    return "\n".join(lines) + "\n"


async def test_gateway_killed_with_readings_taken_during_an_outage_delivers_them_all(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """Broker down, strips read, gateway SIGKILLed, more strips, gateway and broker back:
    every strip the analyzer produced reaches the hospital (once or more), none missing.
    The analyzer's clock is seven years behind: nothing is dropped or reordered for it."""
    async with simulator("astm-urine", "--every", "0.7", "--first-after", "0.1") as (
            analyzer, device):
        strips = device.strips  # the analyzer's clock and result memory
        produced: list[str] = []
        clock = iter(range(10**6))
        start = datetime(2019, 5, 1, 8, 0, 0)

        def device_now() -> datetime:  # the analyzer's own clock: one tick per strip
            moment = start + timedelta(seconds=next(clock))
            produced.append(moment.isoformat(timespec="milliseconds") + "Z")
            return moment

        strips.device_now = device_now
        settings = gateway_settings(tmp_path / "state", broker.port, [
            {"name": "urine", "driver": "urine-astm", "port": analyzer.address,
             "reconnect_min_s": 0.05, "reconnect_max_s": 0.3}])
        config_path = tmp_path / "gateway.toml"
        config_path.write_text(_toml(settings))
        state_dir = tmp_path / "state"

        def describe() -> str:
            return (f"produced {produced[-3:]} ({len(produced)}), analyzer memory "
                    f"{len(strips.memory)}, stored {sorted(_outbox_device_times(state_dir))[-3:]}")
        async with Collector(broker.port) as hospital:
            gateway = _start_gateway(config_path)
            try:
                await hospital.wait_for(lambda: len(bodies(hospital, "urine")) >= 10, 60)
                broker.stop()
                offline_from = len(produced)
                await _until(lambda: len(produced) >= offline_from + 3 and not strips.memory
                             and produced[-1] in _outbox_device_times(state_dir), describe)
                gateway.send_signal(signal.SIGKILL)
                gateway.wait()
                gateway = _start_gateway(config_path)
                await _until(lambda: produced[-1] in _outbox_device_times(state_dir)
                             and len(produced) >= offline_from + 5, describe)
                broker.start()
                expected = set(produced)
                await hospital.wait_for(lambda: expected <= _received_strips(hospital), 60)
            finally:
                gateway.terminate()
                gateway.wait()

    received = _pads_by_strip(hospital)
    assert expected <= set(received)
    assert all(len(pads) == 10 for pads in received.values()), "a strip lost some of its pads"
    envelopes = [m for t, m in hospital.messages if t.endswith("/urine/obs")]
    assert any(e["historical"] for e in envelopes)
    first_seen = list(dict.fromkeys(e["seq"] for e in envelopes))
    assert first_seen == sorted(first_seen), "per-stream order broken"
    skew = [a for a in bodies(hospital, "urine", "alert") if a["alert"] == "clock-skew"]
    assert skew and skew[0]["state"] == "active" and skew[0]["value"] > 6 * 365 * 86400
    for body in bodies(hospital, "urine"):
        assert {"system": "urn:medge:flag", "code": "clock-skew"} in body["meta"]["tag"]
        assert body["effectiveDateTime"] >= "2026"  # device time + measured offset


def _pads_by_strip(hospital: Collector) -> dict[str, set[str]]:
    """Unique Observation identifiers per strip (device time), duplicates folded."""
    strips: dict[str, set[str]] = defaultdict(set)
    for body in bodies(hospital, "urine"):
        strips[body["extension"][0]["valueDateTime"]].add(body["identifier"][0]["value"])
    return strips


def _received_strips(hospital: Collector) -> set[str]:
    return {time for time, pads in _pads_by_strip(hospital).items() if len(pads) == 10}


async def test_sigterm_stops_cleanly_after_ready_was_notified(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """systemd's view: READY=1 on the notify socket once devices started, a clean exit on
    SIGTERM with a last status (stopped) and the retained offline status at the broker."""
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    settings = gateway_settings(tmp_path / "state", broker.port, [
        {"name": "oximeter", "driver": "cms50", "port": "socket://127.0.0.1:9"}])
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(_toml(settings))
    loop = asyncio.get_running_loop()
    async with Collector(broker.port, topic_filter="+/+/+/+/gateway/status") as hospital:
        gateway = _start_gateway(config_path, NOTIFY_SOCKET=str(notify_path))
        try:
            received = b""
            async with asyncio.timeout(30):
                while b"READY=1" not in received:
                    received += await loop.sock_recv(notify, 4096)
            await hospital.wait_for(lambda: any(m["state"] == "online"
                                                for _, m in hospital.messages))
            gateway.send_signal(signal.SIGTERM)
            returncode = await asyncio.wait_for(asyncio.to_thread(gateway.wait), 20)
        finally:
            if gateway.poll() is None:
                gateway.kill()
                gateway.wait()
            notify.close()
        await hospital.wait_for(lambda: hospital.messages[-1][1]["state"] == "offline")
    assert returncode == 0
    assert b"STATUS=1 devices started" in received
    status = json.loads((tmp_path / "state" / "gateway-status.json").read_text())
    assert status["stopped"] is True and status["clinic_link"].startswith("offline")
    assert [d["connection"] for d in status["devices"]] == ["stopped"]
