"""The MQTT link against a TLS + password + ACL mosquitto: legitimate traffic passes, a refused
login is reported once and retried without a crash loop, ACL-denied records are kept aside."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import ssl
from dataclasses import replace
from pathlib import Path

from medge.config import Secret
from medge.mqtt import MqttLink
from medge.outbox import Outbox
from medge.publisher import Publisher
from medge.runtime import Runtime
from medge.settings import DaemonConfig, TlsSection
from medge.topics import Topics
from tests.fixtures.broker import SecureBroker
from tests.helpers import Collector, daemon_config


def secure_config(
    tmp_path: Path, sb: SecureBroker, node: str, user: str, password_file: Path
) -> DaemonConfig:
    cfg = daemon_config(tmp_path, sb.broker.port)
    return replace(
        cfg,
        node=replace(cfg.node, node=node),
        mqtt=replace(cfg.mqtt, host="localhost", username=user,
                     password_file=Secret.read(password_file), tls=TlsSection(sb.ca_file)),
    )


def ingest(sb: SecureBroker) -> Collector:
    context = ssl.create_default_context(cafile=str(sb.ca_file))
    return Collector(sb.broker.port, hostname="localhost", identifier="ingest-test",
                     client_options={"tls_context": context, "username": "hospital-ingest",
                                     "password": sb.users["hospital-ingest"]})


async def test_tls_password_and_acl_let_own_telemetry_through(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    cfg = secure_config(tmp_path, secure_broker, "edge-0001", "edge-0001",
                        secure_broker.password_files["edge-0001"])
    async with ingest(secure_broker) as hospital, Runtime(cfg, "gateway") as rt:
        record = await rt.emit("spo2-1", "obs", {"v": 97})
        await hospital.wait_for(lambda: any(m.get("msg_id") == record.msg_id
                                            for _, m in hospital.messages))


async def test_wrong_password_is_reported_once_and_retried_without_crashing(
    secure_broker: SecureBroker, tmp_path: Path, capsys: object
) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password")
    wrong.chmod(0o600)
    cfg = secure_config(tmp_path, secure_broker, "edge-0001", "edge-0001", wrong)
    async with Runtime(cfg, "gateway") as rt:
        record = await rt.emit("spo2-1", "obs", {"v": 97})  # stored even while refused
        async with asyncio.timeout(20):
            while rt.link._state.state != "refused":
                await asyncio.sleep(0.02)
        first_error = rt.link.last_error
        await asyncio.sleep(1.0)  # several more attempts (backoff 0.05-0.5 s) happen meanwhile
        assert rt.link._runner is not None and not rt.link._runner.done()
        assert not rt.link.connected.is_set()
        assert [r.msg_id for r in await rt.outbox.fetch(0)] == [record.msg_id]
    assert first_error is not None and ("authori" in first_error.lower()
                                        or "password" in first_error.lower())
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert out.count("broker link refused") == 1, "a state change is logged once, not per retry"


async def test_acl_denied_record_is_kept_aside_and_the_stream_goes_on(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    """A record whose topic the ACL denies (here: stored under another node's name) is answered
    with PUBACK 135 under MQTT 5; it is moved to the dead-letter table, counted, never resent,
    and records after it are delivered."""
    cfg = secure_config(tmp_path, secure_broker, "edge-0001", "edge-0001",
                        secure_broker.password_files["edge-0001"])
    link = MqttLink(cfg.mqtt, Topics("test-site", "edge-0001"), "gateway")
    foreign = Outbox(tmp_path / "outbox.sqlite3", cfg.outbox, Topics("test-site", "edge-0002"))
    own = Outbox(tmp_path / "outbox.sqlite3", cfg.outbox, Topics("test-site", "edge-0001"))
    async with ingest(secure_broker) as hospital, foreign, link:
        denied = await foreign.append("spo2-1", "obs", {"v": 50})
        await foreign.close()
        async with own:
            allowed = await own.append("spo2-1", "obs", {"v": 97})
            publisher = asyncio.create_task(Publisher(own, link).run())
            try:
                await hospital.wait_for(lambda: any(m.get("msg_id") == allowed.msg_id
                                                    for _, m in hospital.messages))
                assert own.health().drops.get("refused:obs") == 1
                assert await own.wait_empty(10), "the PUBACKed record is deleted"
            finally:
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher
    assert not [t for t, _ in hospital.messages if "edge-0002" in t]
    with sqlite3.connect(tmp_path / "outbox.sqlite3") as db:
        rows = db.execute("SELECT msg_id, reason FROM dead_letters").fetchall()
    assert rows == [(denied.msg_id, "Not authorized (135)")]
