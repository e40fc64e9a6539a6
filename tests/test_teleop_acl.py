"""config/mosquitto/teleop-acl.example on a real mosquitto: operators command in their own name
only, a device cannot command in an operator's name. Asserts delivery, not SUBACKs: an ACL never
refuses a subscription, it filters delivery."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from medge.localbroker import Mosquitto

ACL = Path(__file__).parent.parent / "config" / "mosquitto" / "teleop-acl.example"
PREFIX = "medge/v1/ward-7/edge-1/probe-arm"
USERS = {"alice": "a-pass", "bob": "b-pass", "edge-1": "e-pass"}


@pytest.fixture
def acl_broker(tmp_path: Path) -> Mosquitto:
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user, password in USERS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True,
                       capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text(ACL.read_text())
    for path in (passwd, acl):
        path.chmod(0o644)
    return Mosquitto(tmp_path / "broker", extra_config=(
        f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"))


async def delivered(port: int, publisher: str, topic: str) -> bool:
    """Whether ``publisher``'s message on ``topic`` reaches the robot (edge-1)."""
    def login(user: str) -> aiomqtt.Client:
        return aiomqtt.Client("127.0.0.1", port, username=user, password=USERS[user],
                              protocol=aiomqtt.ProtocolVersion.V5)

    async with login("edge-1") as robot, login("alice") as witness:
        await robot.subscribe(f"{PREFIX}/cmd/#", qos=1)
        with contextlib.suppress(aiomqtt.MqttError):  # mosquitto may drop a denied publisher
            async with login(publisher) as sender:
                await sender.publish(topic, b"probe", qos=1)  # routed once PUBACKed
        await witness.publish(f"{PREFIX}/cmd/alice/setpoint", b"end", qos=1)
        async with asyncio.timeout(5):
            async for message in robot.messages:
                if message.payload in (b"probe", b"end"):
                    return message.payload == b"probe"
    return False


async def test_operators_command_only_in_their_own_name(
        acl_broker: Mosquitto) -> None:
    acl_broker.start()
    try:
        port = acl_broker.port
        assert await delivered(port, "alice", f"{PREFIX}/cmd/alice/setpoint")
        assert await delivered(port, "alice", f"{PREFIX}/cmd/alice/request")
        assert not await delivered(port, "alice", f"{PREFIX}/cmd/bob/setpoint")
        assert not await delivered(port, "bob", f"{PREFIX}/cmd/alice/request")
        assert not await delivered(port, "edge-1", f"{PREFIX}/cmd/alice/request")
    finally:
        acl_broker.stop()
