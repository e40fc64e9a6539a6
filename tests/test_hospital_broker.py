"""The shipped hospital broker configuration (config/mosquitto/) on a real mosquitto.

The config files are used as shipped; only paths, ports and log/persistence destinations are
rewritten for the test. Certificates come from medge's own PKI (medge/pki.py).

Acceptance criteria (issue 10, hospital broker):
- refused at connection: anonymous, wrong password, missing client certificate, a certificate
  of a foreign CA, a revoked device certificate (CRL), a device certificate on the operator
  listener and an operator certificate on the device listener;
- dropped (asserted as non-delivery, never via SUBACK codes): a device publishing as another
  device, a device publishing a teleop command, a device reading another device's commands, an
  operator commanding a non-robot, the ingest service forging telemetry;
- legitimate traffic passes: device telemetry (via medge's MqttLink over mutual TLS) to ingest,
  an operator's setpoint to its robot, a lab workstation's job request to a microscope.

Non-delivery is proven with a sentinel: after the forbidden publish is acknowledged, an allowed
message goes to the same subscriber; mosquitto delivers in order, so once the sentinel is in,
the forbidden message would have been too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from medge.mqtt import MqttLink, PublishRefused
from medge.pki import Role, SitePki, create_request
from medge.settings import MqttSection, TlsSection
from medge.topics import Topics
from tests.fixtures.broker import MOSQUITTO, Mosquitto, free_port, wait_for_port
from tests.helpers import Collector

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "mosquitto"
INSTALLED_DIR = "/etc/mosquitto/medge/"
SITE = "ward-7"
LISTENERS = {"devices": 8883, "operators": 8884, "services": 8885}
PASSWORDS = {"hospital-ingest": "ingest-s3cret", "lab-workstation": "lab-s3cret"}


@dataclass
class Identity:
    cert: Path
    key: Path


@dataclass
class HospitalBroker(Mosquitto):
    """mosquitto running the shipped config, rewritten for this test's directory and ports."""

    ports: dict[str, int] = field(default_factory=dict)
    identities: dict[str, Identity] = field(default_factory=dict)

    @property
    def ca_file(self) -> Path:
        return self.directory / "device-ca.crt"

    def write_config(self) -> None:
        text = (SHIPPED / "mosquitto.conf").read_text()
        for role, port in LISTENERS.items():
            text = re.sub(rf"^listener {port}$", f"listener {self.ports[role]} 127.0.0.1", text,
                          flags=re.MULTILINE)
        text = (text.replace(INSTALLED_DIR, f"{self.directory}/")
                .replace("log_dest syslog", "log_dest stderr")
                .replace("persistence true", "persistence false")
                .replace("persistence_location /var/lib/mosquitto/\n", ""))
        # as root, mosquitto would drop to user "mosquitto", who cannot read pytest's tmp dirs
        self.config_path.write_text(("user root\n" if os.geteuid() == 0 else "") + text)

    def start(self) -> None:
        super().start()
        for port in self.ports.values():
            wait_for_port(port, proc=self.proc)


def make_identity(pki: SitePki, role: Role, name: str, directory: Path,
                  san: tuple[str, ...] = ()) -> Identity:
    """The CSR flow: key made beside its user, CSR signed by the site CA of the role."""
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    cert.write_bytes(pki.ca(role).issue(create_request(name, key, san), name, role))
    return Identity(cert, key)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HospitalBroker]:
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed: run `make setup`")
    directory = tmp_path_factory.mktemp("hospital-broker")
    pki = SitePki(directory / "pki")
    pki.init(SITE)
    foreign = SitePki(directory / "foreign-pki")
    foreign.init("elsewhere")
    identities = {name: make_identity(pki, "device", name, directory)
                  for name in ("gw-0001", "gw-0002", "gw-0003", "robot-01", "scanner-01")}
    identities["dr-alice"] = make_identity(pki, "operator", "dr-alice", directory)
    identities["foreign-gw-0001"] = make_identity(foreign, "device", "gw-0001",
                                                  directory / "foreign-pki")
    pki.ca("device").revoke("gw-0003")
    server = make_identity(pki, "server", "localhost", directory, ("localhost", "127.0.0.1"))
    for source, target in [(server.cert, "server.crt"), (server.key, "server.key"),
                           (pki.ca("device").cert_path, "device-ca.crt"),
                           (pki.ca("device").crl_path, "device-crl.pem"),
                           (pki.ca("operator").cert_path, "operator-ca.crt"),
                           (pki.ca("operator").crl_path, "operator-crl.pem")]:
        (directory / target).write_bytes(source.read_bytes())
    for name in ("acl", "acl-operators", "acl-services"):
        (directory / name).write_text((SHIPPED / name).read_text())
    passwd = directory / "passwd"
    passwd.touch()
    for user, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True,
                       capture_output=True)
    broker = HospitalBroker(directory, persistence=False,
                            ports={role: free_port() for role in LISTENERS},
                            identities=identities)
    broker.port = broker.ports["devices"]
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def tls(broker: HospitalBroker, identity: Identity | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(broker.ca_file))
    if identity is not None:
        context.load_cert_chain(str(identity.cert), str(identity.key))
    return context


def client_options(broker: HospitalBroker, who: str) -> tuple[int, dict[str, object]]:
    """Port and aiomqtt options for a named principal: a certificate or a service password."""
    if who in PASSWORDS:
        return broker.ports["services"], {"tls_context": tls(broker), "username": who,
                                          "password": PASSWORDS[who]}
    listener = "operators" if who.startswith("dr-") else "devices"
    return broker.ports[listener], {"tls_context": tls(broker, broker.identities[who])}


def subscriber(broker: HospitalBroker, who: str, topic_filter: str) -> Collector:
    port, options = client_options(broker, who)
    return Collector(port, hostname="localhost", topic_filter=topic_filter,
                     identifier=f"test-{who}-{free_port()}", client_options=options)


async def publish(broker: HospitalBroker, who: str, topic: str, body: dict[str, object]) -> None:
    """Publish at QoS 1 under MQTT 5 and return after the broker's PUBACK (whatever its code)."""
    port, options = client_options(broker, who)
    async with aiomqtt.Client("localhost", port, protocol=aiomqtt.ProtocolVersion.V5,
                              identifier=f"pub-{who}-{free_port()}",
                              **options) as client:  # type: ignore[arg-type]
        await client.publish(topic, json.dumps(body).encode(), qos=1)


def device_link(broker: HospitalBroker, node: str) -> MqttLink:
    identity = broker.identities[node]
    cfg = MqttSection(host="localhost", port=broker.ports["devices"], reconnect_min=0.05,
                      reconnect_max=0.5, keepalive=5,
                      tls=TlsSection(broker.ca_file, identity.cert, identity.key))
    return MqttLink(cfg, Topics(SITE, node), "gateway")


def topic(node: str, device: str, kind: str) -> str:
    return f"medge/v1/{SITE}/{node}/{device}/{kind}"


def ingest(hospital: HospitalBroker) -> Collector:
    return subscriber(hospital, "hospital-ingest", "medge/v1/#")


def received(collector: Collector, marker: str) -> bool:
    return any(body.get("marker") == marker for _, body in collector.messages)


# --- refused at connection ------------------------------------------------------------------

def _utf8(text: str) -> bytes:
    return len(text.encode()).to_bytes(2, "big") + text.encode()


def connect_packet(client_id: str, username: str | None, password: str | None) -> bytes:
    """An MQTT 5 CONNECT (clean start, keep-alive 60 s, no properties)."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _utf8("MQTT") + bytes([5, flags, 0, 60, 0]) + _utf8(client_id)
    body += (_utf8(username) if username is not None else b"")
    body += (_utf8(password) if password is not None else b"")
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


async def connack_reason(port: int, context: ssl.SSLContext | None, username: str | None = None,
                         password: str | None = None) -> int | None:
    """The CONNACK reason code, or None when the broker hangs up (TLS or certificate refused).

    A raw client, because a refused client certificate under TLS 1.3 shows up only after the
    handshake as a closed connection, which aiomqtt reports only at its connect timeout.
    """
    async with asyncio.timeout(15):
        try:
            reader, writer = await asyncio.open_connection(
                "localhost", port, ssl=context, server_hostname="localhost" if context else None)
        except (ssl.SSLError, ConnectionError):
            return None
        try:
            writer.write(connect_packet(f"raw-{free_port()}", username, password))
            await writer.drain()
            header = await reader.readexactly(4)
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            return None
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()
    assert header[0] == 0x20, f"expected CONNACK, got packet type {header[0]:#x}"
    return header[3]


CONNECTIONS: dict[str, tuple[str, str | None, str | None, str | None]] = {
    # case: (listener, client certificate, username, password)
    "anonymous": ("services", None, None, None),
    "wrong-password": ("services", None, "hospital-ingest", "wrong"),
    "no-client-certificate": ("devices", None, None, None),
    "foreign-ca": ("devices", "foreign-gw-0001", None, None),
    "revoked-device": ("devices", "gw-0003", None, None),
    "device-cert-on-operator-listener": ("operators", "gw-0001", None, None),
    "operator-cert-on-device-listener": ("devices", "dr-alice", None, None),
}
LEGITIMATE: dict[str, tuple[str, str | None, str | None, str | None]] = {
    "ingest-password": ("services", None, "hospital-ingest", PASSWORDS["hospital-ingest"]),
    "device-certificate": ("devices", "gw-0001", None, None),
    "operator-certificate": ("operators", "dr-alice", None, None),
}


@pytest.mark.parametrize("case", sorted(CONNECTIONS))
async def test_connection_is_refused(hospital: HospitalBroker, case: str) -> None:
    listener, identity, username, password = CONNECTIONS[case]
    context = tls(hospital, hospital.identities[identity] if identity else None)
    reason = await connack_reason(hospital.ports[listener], context, username, password)
    assert reason is None or reason >= 0x80, f"accepted with reason {reason}"


@pytest.mark.parametrize("case", sorted(LEGITIMATE))
async def test_a_legitimate_principal_connects(hospital: HospitalBroker, case: str) -> None:
    """Guards the refusals above: each refused case differs from one of these in one respect."""
    listener, identity, username, password = LEGITIMATE[case]
    context = tls(hospital, hospital.identities[identity] if identity else None)
    assert await connack_reason(hospital.ports[listener], context, username, password) == 0


@pytest.mark.parametrize("listener", sorted(LISTENERS))
async def test_plaintext_is_not_accepted(hospital: HospitalBroker, listener: str) -> None:
    reason = await connack_reason(hospital.ports[listener], None, "hospital-ingest",
                                  PASSWORDS["hospital-ingest"])
    assert reason is None


# --- legitimate traffic and dropped traffic -------------------------------------------------

async def test_device_telemetry_over_mutual_tls_reaches_ingest_and_forgery_is_refused(
    hospital: HospitalBroker
) -> None:
    async with ingest(hospital) as hospital_side, device_link(hospital, "gw-0001") as link:
        await link.wait_connected(timeout=30)
        with pytest.raises(PublishRefused, match="Not authorized"):
            await link.publish(topic("gw-0002", "oximeter", "obs"),
                               json.dumps({"marker": "as-another-device"}).encode())
        await link.publish(topic("gw-0001", "oximeter", "obs"),
                           json.dumps({"marker": "own-telemetry"}).encode())
        await hospital_side.wait_for(lambda: received(hospital_side, "own-telemetry"))
    assert not received(hospital_side, "as-another-device")
    assert (topic("gw-0001", "gateway", "status"), "online") in [
        (t, b.get("state")) for t, b in hospital_side.messages]


async def test_ingest_cannot_forge_telemetry(hospital: HospitalBroker) -> None:
    async with ingest(hospital) as hospital_side:
        await publish(hospital, "hospital-ingest", topic("gw-0001", "oximeter", "obs"),
                      {"marker": "forged-by-ingest"})
        await publish(hospital, "gw-0001", topic("gw-0001", "oximeter", "obs"),
                      {"marker": "sentinel-ingest"})
        await hospital_side.wait_for(lambda: received(hospital_side, "sentinel-ingest"))
    assert not received(hospital_side, "forged-by-ingest")


async def test_device_cannot_send_a_teleop_command_but_the_operator_can(
    hospital: HospitalBroker
) -> None:
    setpoint = topic("robot-01", "probe-arm", "cmd") + "/dr-alice/setpoint"
    async with subscriber(hospital, "robot-01", topic("robot-01", "+", "cmd") + "/#") as robot:
        await publish(hospital, "gw-0001", setpoint, {"marker": "from-a-device"})
        await publish(hospital, "dr-alice", setpoint, {"marker": "from-the-operator"})
        await robot.wait_for(lambda: received(robot, "from-the-operator"))
    assert not received(robot, "from-a-device")


async def test_robot_live_ultrasound_reaches_the_operator_and_only_from_the_robot(
    hospital: HospitalBroker
) -> None:
    live = topic("robot-01", "probe-arm", "state") + "/us"
    async with subscriber(hospital, "dr-alice", live) as operator:
        await publish(hospital, "gw-0001", live, {"marker": "forged-frame"})
        await publish(hospital, "robot-01", live, {"marker": "live-frame"})
        await operator.wait_for(lambda: received(operator, "live-frame"))
    assert not received(operator, "forged-frame")


async def test_operator_cannot_send_commands_in_another_operators_name(
    hospital: HospitalBroker
) -> None:
    robot_cmd = topic("robot-01", "probe-arm", "cmd")
    async with subscriber(hospital, "robot-01", robot_cmd + "/#") as robot:
        await publish(hospital, "dr-alice", robot_cmd + "/dr-bob/request", {"marker": "as-bob"})
        await publish(hospital, "dr-alice", robot_cmd + "/dr-alice/request", {"marker": "as-alice"})
        await robot.wait_for(lambda: received(robot, "as-alice"))
    assert not received(robot, "as-bob")


async def test_operator_cannot_command_a_microscope_but_the_lab_workstation_can(
    hospital: HospitalBroker
) -> None:
    command = topic("scanner-01", "microscope", "cmd")
    async with subscriber(hospital, "scanner-01", command) as scanner:
        await publish(hospital, "dr-alice", command, {"marker": "from-an-operator"})
        await publish(hospital, "lab-workstation", command, {"marker": "from-the-lab"})
        await scanner.wait_for(lambda: received(scanner, "from-the-lab"))
    assert not received(scanner, "from-an-operator")


async def test_device_cannot_read_another_devices_commands(hospital: HospitalBroker) -> None:
    async with subscriber(hospital, "gw-0002", "medge/v1/+/+/+/cmd") as eavesdropper:
        await publish(hospital, "lab-workstation", topic("scanner-01", "microscope", "cmd"),
                      {"marker": "for-the-scanner"})
        await publish(hospital, "lab-workstation", topic("gw-0002", "microscope", "cmd"),
                      {"marker": "for-gw-0002"})
        await eavesdropper.wait_for(lambda: received(eavesdropper, "for-gw-0002"))
    assert not received(eavesdropper, "for-the-scanner")
