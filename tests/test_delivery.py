"""Telemetry through the durable outbox to a real mosquitto: topics, envelopes, outages, crashes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from medge.runtime import Runtime
from tests.fixtures.broker import Mosquitto
from tests.helpers import Collector, daemon_config, delivery_report

PRODUCER = Path(__file__).with_name("producer_proc.py")


async def test_telemetry_reaches_subscriber_with_documented_topic_and_envelope(
    broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = daemon_config(tmp_path, broker.port)
    async with Collector(broker.port) as hospital, Runtime(cfg, "gateway") as rt:
        await _until(lambda: rt.outbox.link_up)
        record = await rt.emit("spo2-1", "obs", {"resourceType": "Observation", "n": 1})
        await hospital.wait_for(lambda: bool(hospital.kind("obs")))
    topic, envelope = next((t, m) for t, m in hospital.messages if t.endswith("/obs"))
    assert topic == "medge/v1/test-site/edge-1/spo2-1/obs"
    assert envelope["msg_id"] == record.msg_id
    assert envelope["seq"] == 1
    assert envelope["stream"] == "spo2-1/obs"
    assert envelope["device"] == "spo2-1"
    assert envelope["kind"] == "obs"
    assert envelope["historical"] is False
    assert envelope["body"] == {"resourceType": "Observation", "n": 1}
    assert envelope["sent_at"] >= envelope["created_at"]


async def test_birth_and_death_status_is_retained(broker: Mosquitto, tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, broker.port)
    async with Collector(broker.port, topic_filter="+/+/+/+/gateway/status") as hospital:
        async with Runtime(cfg, "gateway") as rt:
            await rt.link.wait_connected(10)
            await hospital.wait_for(lambda: _has_state(hospital, "online"))
        await hospital.wait_for(lambda: hospital.messages[-1][1]["state"] == "offline")
    async with Collector(broker.port, topic_filter="+/+/+/+/gateway/status",
                         identifier="late-joiner") as late:
        await late.wait_for(lambda: bool(late.messages))
    assert late.messages[0][1]["state"] == "offline"


async def test_will_published_when_daemon_dies(broker: Mosquitto, tmp_path: Path) -> None:
    async with Collector(broker.port, topic_filter="+/+/+/+/producer/status") as hospital:
        proc = subprocess.Popen(
            [sys.executable, str(PRODUCER), str(tmp_path), str(broker.port), "0", "1"],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert proc.stdout is not None
            await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)  # "ready"
            await hospital.wait_for(lambda: _has_state(hospital, "online"))
            proc.kill()
        finally:
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
        await hospital.wait_for(lambda: hospital.messages[-1][1]["state"] == "offline")


async def test_records_made_offline_are_delivered_later_flagged_historical(
    broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = daemon_config(tmp_path, broker.port)
    async with Collector(broker.port) as hospital, Runtime(cfg, "gateway") as rt:
        await rt.link.wait_connected(10)
        broker.stop()
        await asyncio.wait_for(_until(lambda: not rt.link.connected.is_set()), 10)
        made = [await rt.emit("scale-1", "obs", {"n": i}, created_at=1_700_000_000.0 + i)
                for i in range(5)]
        broker.start()
        await hospital.wait_for(lambda: len(hospital.kind("obs")) >= 5)
    received = {m["msg_id"]: m for m in hospital.kind("obs")}
    for record in made:
        envelope = received[record.msg_id]
        assert envelope["historical"] is True
        assert envelope["created_at"].startswith("2023-11-14T22:13:2")  # original time kept


def _has_state(hospital: Collector, state: str) -> bool:
    return any(m["state"] == state for _, m in hospital.messages)


async def _until(predicate: object) -> None:
    while not predicate():  # type: ignore[operator]
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("fault", ["broker-outage", "sigkill"])
async def test_stream_survives_outage_and_crash(
    broker: Mosquitto, tmp_path: Path, fault: str
) -> None:
    """10,000 messages; broker stopped mid-stream, or the producer SIGKILLed and restarted:
    every message arrives at least once, none missing, duplicates counted, order kept."""
    total = 10_000
    async with Collector(broker.port, topic_filter="+/+/+/+/meter/obs") as hospital:
        producer = _start_producer(tmp_path, broker.port, total)
        try:
            await hospital.wait_for(lambda: len(hospital.messages) >= 2_000, timeout=60)
            if fault == "broker-outage":
                broker.stop()
                await asyncio.sleep(1.0)  # the producer keeps appending while the broker is down
                broker.start()
            else:
                producer.send_signal(signal.SIGKILL)
                producer.wait()
                producer = _start_producer(tmp_path, broker.port, total)
            await hospital.wait_for(
                lambda: {m["body"]["n"] for _, m in hospital.messages} >= set(range(total)),
                timeout=120,
            )
        finally:
            producer.terminate()
            producer.wait()
    envelopes = [m for _, m in hospital.messages]
    report = delivery_report(envelopes)
    assert {e["body"]["n"] for e in envelopes} == set(range(total)), "messages missing"
    assert report["unique"] == total
    assert report["in_order"]
    print(f"{fault}: {total} unique, {report['duplicates']} duplicates")


def _start_producer(state_dir: Path, port: int, total: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.Popen(
        [sys.executable, str(PRODUCER), str(state_dir), str(port), str(total), "1"],
        env=env, stdout=subprocess.DEVNULL,
    )


def test_envelope_json_is_compact_and_valid(tmp_path: Path) -> None:
    from medge.outbox import Record

    record = Record(1, "s/obs", 7, "abc", "dev", "obs", "t", 1.5, None, False, b'{"x":1}')
    envelope = json.loads(record.envelope(100.0))
    assert envelope == {
        "msg_id": "abc", "seq": 7, "stream": "s/obs", "device": "dev", "kind": "obs",
        "created_at": "1970-01-01T00:00:01.500Z", "sent_at": "1970-01-01T00:01:40.000Z",
        "historical": True, "body": {"x": 1},
    }


async def test_subscriptions_are_restored_after_the_broker_restarts(
    broker: Mosquitto, tmp_path: Path
) -> None:
    cfg = daemon_config(tmp_path, broker.port)
    received: list[bytes] = []
    arrived = asyncio.Event()

    async def on_command(message: aiomqtt.Message) -> None:
        assert isinstance(message.payload, bytes)
        received.append(message.payload)
        arrived.set()

    async with Runtime(cfg, "gateway") as rt:
        topic = rt.topics.topic("gateway", "cmd")
        rt.link.subscribe(topic, on_command)
        await rt.link.wait_connected(10)
        broker.stop()
        await asyncio.wait_for(_until(lambda: not rt.link.connected.is_set()), 10)
        broker.start()
        await rt.link.wait_connected(20)
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="operator") as operator:
            await operator.publish(topic, b"ping", qos=1)
            await asyncio.wait_for(arrived.wait(), 10)
    assert received == [b"ping"]
    assert rt.link.connections == 2


async def test_health_reports_link_and_outbox(broker: Mosquitto, tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, broker.port)
    async with Collector(broker.port, topic_filter="+/+/+/+/gateway/health") as hospital:
        async with Runtime(cfg, "gateway", health_interval=0.2) as rt:
            await rt.emit("scale-1", "obs", {"n": 1})
            await hospital.wait_for(
                lambda: any(m["published"] >= 1 for _, m in hospital.messages), timeout=20)
    health = next(m for _, m in hospital.messages if m["published"] >= 1)
    assert health["daemon"] == "gateway"
    assert health["link"]["connected"] is True
    assert set(health["outbox"]) == {"depth", "bytes", "fill", "oldest_age_s", "drops",
                                     "last_publish_at", "store_error", "quarantined"}
    assert health["outbox"]["store_error"] is None


async def test_alerts_overtake_a_routine_backlog(broker: Mosquitto, tmp_path: Path) -> None:
    """After an outage, an alert goes out ahead of the queued routine observations."""
    cfg = daemon_config(tmp_path, broker.port)
    async with Collector(broker.port) as hospital, Runtime(cfg, "gateway") as rt:
        await rt.link.wait_connected(10)
        broker.stop()
        await asyncio.wait_for(_until(lambda: not rt.link.connected.is_set()), 10)
        await asyncio.gather(*(rt.emit("oximeter", "obs", {"n": n}) for n in range(3000)))
        alert = await rt.emit("oximeter", "alert", {"alert": "spo2-low"})
        broker.start()
        await hospital.wait_for(lambda: len(hospital.kind("obs")) >= 3000, timeout=60)
    order = [m["msg_id"] for _, m in hospital.messages if m.get("kind") in ("obs", "alert")]
    assert order.index(alert.msg_id) < 1000, "the alert waited behind the routine backlog"
