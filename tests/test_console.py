"""Console pieces without a browser: SpaceMouse reports, input settings, the loopback server's
HTTP rules (token, host, bad input, stale and reordered page setpoints), its broker link across a
broker restart, and the live ultrasound image, against a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import cv2
import numpy as np
import pytest
import structlog

from daemons.manipulator.kinematics import ProbePose, Twist, probe_axis
from daemons.manipulator.supervisor import SupervisorConfig
from daemons.manipulator.teleop_protocol import decode_setpoint
from daemons.manipulator.ultrasound import PoseSample, StampedFrame, live_payload
from medge import demo
from medge.cli import build_parser, main
from medge.console.server import STATIC as STATIC_DIR
from medge.console.server import ConsoleInfo, ConsoleServer
from medge.console.settings import InputSettings, SettingsError, SettingsStore, probe_to_base
from medge.console.spacemouse import (
    SpaceMouseError,
    SpaceMouseReader,
    SpaceMouseState,
    apply_report,
    find_devices,
)
from medge.consolecli import identity
from medge.exitcodes import EXIT_UNAVAILABLE, EXIT_USAGE
from medge.localbroker import Mosquitto, free_port
from medge.mqtt import LinkDown
from medge.teleop import Broker, RobotTopics, TeleopClient
from tests.fixtures.broker import make_ca

# Reports as a SpaceNavigator (split) and a SpaceMouse Enterprise (combined) send them
# (protocols.md §12): int16 LE counts, full scale 350; y, z, pitch, roll inverted.
SPLIT_TRANSLATION = bytes.fromhex("01" "5e01" "a2fe" "af00")   # x=+350 y=-350 z=+175
SPLIT_ROTATION = bytes.fromhex("02" "0000" "af00" "51ff")      # pitch 0, roll +175, yaw -175
SPLIT_BUTTONS_LEFT = bytes.fromhex("03" "01" "00")
COMBINED_ALL = bytes.fromhex("01" "5e01" "0000" "0000" "a2fe" "0000" "af00")  # x=+1 pitch=-1(raw)
ROBOT = RobotTopics("site-a", "node-1", "probe-arm")


# --- SpaceMouse ------------------------------------------------------------------------------

def test_split_device_reports_map_to_signed_normalized_axes() -> None:
    state = apply_report(SpaceMouseState(), SPLIT_TRANSLATION, combined=False)
    assert state.axes == pytest.approx((1.0, 1.0, -0.5, 0.0, 0.0, 0.0))
    state = apply_report(state, SPLIT_ROTATION, combined=False)
    assert state.axes == pytest.approx((1.0, 1.0, -0.5, -0.0, -0.5, -0.5))
    state = apply_report(state, SPLIT_BUTTONS_LEFT, combined=False)
    assert state.buttons == 1 and state.axes[0] == pytest.approx(1.0)


def test_combined_device_report_carries_all_six_axes_and_counts_are_clamped() -> None:
    state = apply_report(SpaceMouseState(), COMBINED_ALL, combined=True)
    assert state.axes == pytest.approx((1.0, 0.0, 0.0, 1.0, 0.0, 0.5))
    overdriven = apply_report(state, bytes.fromhex("01" "ff7f" "0080" "0000"), combined=False)
    assert overdriven.axes[:3] == pytest.approx((1.0, 1.0, 0.0))


@pytest.mark.parametrize("report", [b"", bytes.fromhex("01" "5e01"), bytes.fromhex("03")])
def test_short_reports_raise_a_typed_error(report: bytes) -> None:
    with pytest.raises(SpaceMouseError):
        apply_report(SpaceMouseState(), report, combined=False)


def test_reports_without_motion_leave_the_state_alone() -> None:
    state = apply_report(SpaceMouseState(), SPLIT_TRANSLATION, combined=False)
    assert apply_report(state, bytes.fromhex("0401"), combined=False) == state


def test_find_devices_matches_spacemice_by_usb_ids(tmp_path: Path) -> None:
    for name, hid_id in [("hidraw0", "0003:0000046D:0000C52B"),   # a Logitech receiver
                         ("hidraw1", "0003:0000046D:0000C626"),   # SpaceNavigator
                         ("hidraw2", "0003:0000256F:0000C633")]:  # SpaceMouse Enterprise
        (tmp_path / name / "device").mkdir(parents=True)
        (tmp_path / name / "device" / "uevent").write_text(f"DRIVER=hid-generic\nHID_ID={hid_id}\n")
    found = find_devices(tmp_path, Path("/dev"))
    assert [(d.path.name, d.combined) for d in found] == [("hidraw1", False), ("hidraw2", True)]


async def test_reader_follows_the_device_and_zeroes_when_it_goes_away(tmp_path: Path) -> None:
    fifo = tmp_path / "hidraw-fake"
    os.mkfifo(fifo)
    async with SpaceMouseReader(fifo, combined=False) as reader:
        writer = os.open(fifo, os.O_WRONLY)
        try:
            os.write(writer, SPLIT_TRANSLATION)
            await _until(lambda: reader.reports == 1)
            assert reader.state.axes[0] == pytest.approx(1.0)
            os.write(writer, bytes.fromhex("01" "5e"))  # torn report
            await _until(lambda: reader.error is not None)
            assert reader.state.axes == (0.0,) * 6 and "needs 6" in (reader.error or "")
        finally:
            os.close(writer)
        await _until(lambda: "gone" in (reader.error or "") or reader._fd is None)
        assert reader.state.axes == (0.0,) * 6


async def test_reader_names_a_device_it_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(SpaceMouseError, match="hidraw9"):
        async with SpaceMouseReader(tmp_path / "hidraw9", combined=False):
            pass


# --- settings --------------------------------------------------------------------------------

def test_deadband_scaling_and_inversion_shape_the_twist() -> None:
    settings = InputSettings(deadband=0.1, linear_m_s=0.02, angular_rad_s=0.2,
                             invert={"y": True, "rx": True})
    twist = settings.twist([0.05, 1.0, 0.55, 1.0, -1.0, 0.0])
    assert twist.linear == pytest.approx((0.0, -0.02, 0.01))
    assert twist.angular == pytest.approx((-0.2, -0.2, 0.0))
    assert settings.twist([7.0, 0, 0, 0, 0, 0]).linear[0] == pytest.approx(0.02)  # clamped


@pytest.mark.parametrize(("document", "key"), [
    ({"deadband": 0.9}, "deadband"), ({"linear_m_s": -1}, "linear_m_s"),
    ({"us_display_hz": 0}, "us_display_hz"), ({"us_display_hz": 120}, "us_display_hz"),
    ({"angular_rad_s": "fast"}, "angular_rad_s"), ({"invert": {"w": True}}, "invert"),
    ({"invert": {"x": 1}}, "invert"), ({"colour": "red"}, "colour"), ([], "settings"),
])
def test_bad_settings_name_the_key(document: Any, key: str) -> None:
    with pytest.raises(SettingsError, match=key):
        InputSettings.from_dict(document)


def test_axes_must_be_six_finite_numbers() -> None:
    with pytest.raises(SettingsError, match="axes"):
        InputSettings().twist([0.0] * 5)
    with pytest.raises(SettingsError, match="axes.y"):
        InputSettings().twist([0.0, math.nan, 0, 0, 0, 0])


def test_settings_are_remembered_per_user(tmp_path: Path) -> None:
    alice, bob = SettingsStore("alice", tmp_path), SettingsStore("bob", tmp_path)
    assert alice.load() == InputSettings()
    alice.save(InputSettings(deadband=0.2, invert={"z": True}))
    assert alice.load().deadband == 0.2 and alice.load().invert["z"] is True
    assert bob.load() == InputSettings()
    (tmp_path / "bob.json").write_text("{not json")
    with pytest.raises(SettingsError, match="bob.json"):
        bob.load()
    with pytest.raises(ValueError, match="user"):
        SettingsStore("../etc", tmp_path)


def test_probe_frame_twists_follow_the_probe_tilt() -> None:
    twist = Twist((0.01, -0.02, 0.03), (0.1, 0.0, 0.0))
    assert probe_to_base(twist, 0.0, 0.0) == twist
    for a, b in [(0.3, 0.0), (0.0, -0.4), (0.2, 0.35)]:
        down = probe_to_base(Twist((0.0, 0.0, -1.0), (0.0, 0.0, 0.0)), a, b).linear
        assert down == pytest.approx(probe_axis(a, b))  # "lower" moves along the probe


# --- server ----------------------------------------------------------------------------------

async def _until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def http(server: ConsoleServer, method: str, path: str, body: Any = None, *,
               token: str | None = None, host: str | None = None,
               raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        head = (f"{method} {path} HTTP/1.1\r\nHost: {host or f'127.0.0.1:{server.port}'}\r\n"
                f"X-Console-Token: {server.token if token is None else token}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode() + data)
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    document = json.loads(payload) if payload.startswith(b"{") else {"raw": payload}
    return int(status_line.split()[1]), document


@contextlib.asynccontextmanager
async def serving(broker: Mosquitto, tmp_path: Path) -> AsyncIterator[ConsoleServer]:
    async with TeleopClient(Broker(port=broker.port), ROBOT, "alice") as client, \
            ConsoleServer(client, ConsoleInfo("alice", "127.0.0.1", ROBOT.prefix),
                          SettingsStore("alice", tmp_path)) as server:
        yield server


def page_setpoint(axes: list[float], age_s: float = 0.0) -> dict[str, Any]:
    return {"stamp": (time.time() - age_s) * 1000, "axes": axes}


async def test_fresh_page_setpoints_are_forwarded_once_each_with_the_dead_man_set(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with serving(broker, tmp_path) as console:
        async with aiomqtt.Client("127.0.0.1", broker.port,
                                  protocol=aiomqtt.ProtocolVersion.V5) as spy:
            await spy.subscribe(ROBOT.setpoints)
            status, reply = await http(console, "POST", "/api/setpoint",
                                       page_setpoint([1.0, 0, 0, 0, 0, 0]))
            assert (status, reply) == (200, {"ok": True})
            status, reply = await http(console, "POST", "/api/setpoint",
                                       page_setpoint([0.0] * 6))
            assert status == 200
            messages = []
            async with asyncio.timeout(5):
                async for message in spy.messages:
                    assert isinstance(message.payload, bytes)
                    messages.append(decode_setpoint(message.payload, "alice"))
                    if len(messages) == 2:
                        break
        moving, holding = messages
        assert moving.enable and moving.twist is not None
        assert moving.twist.linear == pytest.approx((InputSettings().linear_m_s, 0.0, 0.0))
        assert holding.enable and holding.twist is None and holding.pose is None  # hold / go-to
        assert console.counters.forwarded == 2


async def test_spacemouse_deflection_rides_on_the_page_dead_man(broker: Mosquitto,
                                                                tmp_path: Path) -> None:
    fifo = tmp_path / "hidraw-fake"
    os.mkfifo(fifo)
    async with SpaceMouseReader(fifo, combined=False) as mouse, \
            TeleopClient(Broker(port=broker.port), ROBOT, "alice") as client, \
            ConsoleServer(client, ConsoleInfo("alice", "127.0.0.1", ROBOT.prefix),
                          SettingsStore("alice", tmp_path), spacemouse=mouse) as console:
        writer = os.open(fifo, os.O_WRONLY)
        try:
            os.write(writer, SPLIT_TRANSLATION)  # x=+1, y=+1, z=-0.5 after the sign mapping
            await _until(lambda: mouse.reports == 1)
            assert console.counters.forwarded == 0  # no dead-man, nothing sent
            status, reply = await http(console, "POST", "/api/setpoint",
                                       page_setpoint([-1.0, 0, 0, 0, 0, 0]))
            assert (status, reply) == (200, {"ok": True})
        finally:
            os.close(writer)
    expected = InputSettings().twist([0.0, 1.0, -0.5, 0.0, 0.0, 0.0])  # page -x cancels mouse +x
    assert console.counters.last_twist == pytest.approx([*expected.linear, *expected.angular])


async def test_stale_and_reordered_page_setpoints_are_dropped(broker: Mosquitto,
                                                              tmp_path: Path) -> None:
    async with serving(broker, tmp_path) as console:
        status, reply = await http(console, "POST", "/api/setpoint",
                                   page_setpoint([1.0, 0, 0, 0, 0, 0], age_s=0.5))
        assert status == 200 and reply["dropped"] == "stale"
        fresh = page_setpoint([1.0, 0, 0, 0, 0, 0])
        assert (await http(console, "POST", "/api/setpoint", fresh))[1] == {"ok": True}
        status, reply = await http(console, "POST", "/api/setpoint", fresh)  # replayed
        assert reply["dropped"] == "reordered"
        assert (console.counters.forwarded, console.counters.dropped_stale,
                console.counters.dropped_reordered) == (1, 1, 1)


BAD_REQUESTS: list[tuple[str, str, Any, dict[str, Any], int, str]] = [
    ("POST", "/api/setpoint", page_setpoint([0.0] * 6), {"token": "guess"}, 403, "token"),
    ("POST", "/api/setpoint", page_setpoint([0.0] * 6), {"host": "evil.example:80"}, 403,
     "loopback"),
    ("POST", "/api/setpoint", None, {"raw": b"{oops"}, 400, "not JSON"),
    ("POST", "/api/setpoint", [1, 2], {}, 400, "JSON object"),
    ("POST", "/api/setpoint", {"stamp": 1.0, "axes": [0, 0]}, {}, 400, "axes"),
    ("POST", "/api/setpoint", {"stamp": "now", "axes": [0] * 6}, {}, 400, "stamp"),
    ("POST", "/api/setpoint", None, {"raw": b"x" * 70_000}, 413, "exceeds"),
    ("POST", "/api/command", {"cmd": "self_destruct"}, {}, 400, "cmd"),
    ("POST", "/api/command", {"cmd": "goto"}, {}, 400, "pose"),
    ("POST", "/api/settings", {"deadband": 2}, {}, 400, "deadband"),
    ("DELETE", "/api/settings", None, {}, 405, "DELETE"),
    ("GET", "/../pyproject.toml", None, {}, 404, "no"),
    ("GET", "/events", None, {}, 403, "token"),
]
"""(method, path, JSON body, http() options, expected status, words the error must contain)"""


async def test_bad_requests_get_a_typed_error_naming_what(broker: Mosquitto,
                                                          tmp_path: Path) -> None:
    async with serving(broker, tmp_path) as console:
        for method, path, body, options, status, words in BAD_REQUESTS:
            got, reply = await http(console, method, path, body, **options)
            assert (got, reply["ok"]) == (status, False), (method, path, reply)
            assert words in reply["error"], (method, path, reply)
        assert console.counters.forwarded == 0


async def test_garbage_on_the_socket_gets_400_and_the_server_keeps_serving(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with serving(broker, tmp_path) as console:
        reader, writer = await asyncio.open_connection("127.0.0.1", console.port)
        writer.write(b"\x16\x03\x01 hello\r\n\r\n")
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert response.startswith(b"HTTP/1.1 400")
        status, _ = await http(console, "GET", "/api/settings")
        assert status == 200


async def test_page_assets_and_the_state_stream_are_served(broker: Mosquitto,
                                                           tmp_path: Path) -> None:
    async with serving(broker, tmp_path) as console:
        for path, marker in [("/", b"E-STOP"), ("/console.js", b"DEADMAN_KEY"),
                             ("/console.css", b".estop")]:
            status, document = await http(console, "GET", path)
            assert status == 200 and marker in document["raw"]
        reader, writer = await asyncio.open_connection("127.0.0.1", console.port)
        writer.write(f"GET /events?token={console.token} HTTP/1.1\r\n"
                     f"Host: 127.0.0.1:{console.port}\r\n\r\n".encode())
        async with asyncio.timeout(5):
            await reader.readuntil(b"\r\n\r\n")
            event = json.loads((await reader.readuntil(b"\n\n"))[len(b"data: "):])
        writer.close()
        await writer.wait_closed()
        assert event["console"]["operator"] == "alice" and event["robot"] is None
        assert event["console"]["force_stop_n"] > event["console"]["force_warn_n"]


async def test_settings_round_trip_through_the_api_and_the_file(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with serving(broker, tmp_path) as console:
        wanted = {"deadband": 0.15, "linear_m_s": 0.01, "angular_rad_s": 0.1,
                  "invert": {"x": True, "y": False, "z": False, "rx": False, "ry": True,
                             "rz": False}, "us_display_hz": 4.0}
        status, reply = await http(console, "POST", "/api/settings", wanted)
        assert status == 200 and reply["settings"] == wanted
        assert json.loads((tmp_path / "alice.json").read_text()) == wanted
        assert (await http(console, "GET", "/api/settings"))[1]["settings"] == wanted


# --- command line ----------------------------------------------------------------------------

@pytest.fixture
def cli_logging() -> Iterator[None]:
    """``medge console`` points structlog at stderr for its process; in this test process the
    other tests expect the default (stdout) back."""
    yield
    structlog.reset_defaults()


def test_cli_needs_an_operator_identity_and_names_bad_options(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_logging: None) -> None:
    base = ["console", "--broker", "127.0.0.1:1", "--no-browser", "--spacemouse", "off"]
    assert main([*base, "--robot", "site/node"]) == EXIT_USAGE
    assert "--user" in capsys.readouterr().err
    assert main([*base, "--robot", "site", "--user", "alice"]) == EXIT_USAGE
    assert "SITE/NODE" in capsys.readouterr().err
    assert main([*base, "--robot", "site/node", "--user", "alice", "--password-file",
                 str(tmp_path / "missing.pw")]) == EXIT_USAGE
    assert "missing.pw" in capsys.readouterr().err
    assert main([*base, "--robot", "site/node", "--cert", str(tmp_path / "a.crt")]) == EXIT_USAGE
    assert "--key" in capsys.readouterr().err


def test_cli_reports_an_unreachable_broker(capsys: pytest.CaptureFixture[str],
                                           cli_logging: None) -> None:
    port = free_port()  # nothing listens there
    status = main(["console", "--broker", f"127.0.0.1:{port}", "--robot", "site/node",
                   "--user", "alice", "--no-browser", "--spacemouse", "off"])
    assert status == EXIT_UNAVAILABLE and "medge console:" in capsys.readouterr().err


def test_the_certificate_common_name_is_the_operator(tmp_path: Path) -> None:
    ca_file, server_cert = make_ca(tmp_path)
    argv = ["console", "--broker", "127.0.0.1:8883", "--robot", "site/node", "--cert",
            str(server_cert), "--key", str(tmp_path / "server.key"), "--cafile", str(ca_file)]
    args = build_parser(argv).parse_args(argv)
    operator, broker = identity(args)
    assert operator == "localhost" and broker.tls is not None and broker.username is None


def test_medge_console_prints_its_url_serves_the_page_and_stops_on_sigterm(
        broker: Mosquitto, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "medge.cli", "console", "--broker", f"127.0.0.1:{broker.port}",
         "--robot", "site-a/node-1", "--user", "alice", "--no-browser", "--spacemouse", "off"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        url = line.split(": ", 1)[1].strip()
        assert "alice" in line and url.startswith("http://127.0.0.1:") and "token=" in url
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and b"E-STOP" in response.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# --- broker link -----------------------------------------------------------------------------

async def test_the_console_reconnects_after_a_broker_restart_and_refuses_motion_meanwhile(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with serving(broker, tmp_path) as console:
        assert console.snapshot()["broker_link"]["up"]
        await asyncio.to_thread(broker.stop)
        await _until(lambda: not console.snapshot()["broker_link"]["up"])
        started = time.monotonic()
        status, reply = await http(console, "POST", "/api/setpoint",
                                   page_setpoint([1.0, 0, 0, 0, 0, 0]))
        assert (status, reply["error"]) == (503, "broker link lost — reconnecting")
        status, reply = await http(console, "POST", "/api/command", {"cmd": "arm"})
        assert (status, reply["error"]) == (503, "broker link lost — reconnecting")
        assert time.monotonic() - started < 2.0  # refused at once, not after a request timeout
        assert console.counters.forwarded == 0
        down = console.snapshot()["broker_link"]
        assert down["down_ms"] >= 0 and down["error"]

        await asyncio.to_thread(broker.start)
        await _until(lambda: console.snapshot()["broker_link"]["up"], timeout=15)
        assert console.snapshot()["broker_link"]["connections"] == 2
        async with aiomqtt.Client("127.0.0.1", broker.port,
                                  protocol=aiomqtt.ProtocolVersion.V5) as robot:
            await robot.subscribe(ROBOT.setpoints)
            # the subscriptions came back with the link: robot state and the live image
            await robot.publish(ROBOT.state, json.dumps({"state": "disarmed"}).encode())
            await robot.publish(f"{ROBOT.state}/us", live_frame(7))
            await _until(lambda: console.client.state == {"state": "disarmed"}
                         and console.live.received == 1)
            status, reply = await http(console, "POST", "/api/setpoint",
                                       page_setpoint([1.0, 0, 0, 0, 0, 0]))
            assert (status, reply) == (200, {"ok": True})
            async with asyncio.timeout(5):
                message = await anext(aiter(robot.messages))
            assert isinstance(message.payload, bytes)
            assert decode_setpoint(message.payload, "alice").enable


# --- live ultrasound image -------------------------------------------------------------------

def live_frame(seq: int, *, captured_ago_s: float = 0.05, shade: int = 128) -> bytes:
    """A live-view message as the manipulator daemon publishes it (its own encoder)."""
    image = np.full((48, 64), shade, dtype=np.uint8)
    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok
    wall = time.time() - captured_ago_s
    pose = PoseSample(0.0, ProbePose(0.01, -0.002, -0.21, 0.1, 0.0), 4.5)
    return live_payload(StampedFrame(bytes(jpeg), 48, 64, 0.0, wall, pose), seq, None)


async def get_frame(console: ConsoleServer) -> tuple[int, dict[str, Any], bytes]:
    """``GET /api/us/frame``: status, the X-Us-Frame header (or the error), the JPEG."""
    reader, writer = await asyncio.open_connection("127.0.0.1", console.port)
    try:
        writer.write(f"GET /api/us/frame HTTP/1.1\r\nHost: 127.0.0.1:{console.port}\r\n"
                     f"X-Console-Token: {console.token}\r\nConnection: close\r\n\r\n".encode())
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    status = int(lines[0].split()[1])
    if status != 200:
        return status, json.loads(body), b""
    return status, json.loads(headers["X-Us-Frame"]), body


BAD_FRAMES = [
    (b"no header line", "header"),
    (b'{"v": 2}\n\xff\xd8', "version"),
    (live_frame(9).replace(b'"seq":9', b'"seq":-1'), "seq"),
    (live_frame(9).replace(b'"force_n":4.5', b'"force_n":"hard"'), "force_n"),
    (live_frame(9).replace(b'"tip":[', b'"tip":[1,'), "pose.tip"),
    (live_frame(9).partition(b"\n")[0] + b"\nGIF89a", "JPEG"),
    (b"x" * (5 * 1024 * 1024), "exceeds"),
]
"""(payload, words the refusal names)"""


async def test_live_frames_reach_the_page_endpoint_old_ones_skipped_bad_ones_refused(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with serving(broker, tmp_path) as console, \
            aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5,
                           max_queued_outgoing_messages=100) as robot:
        assert (await get_frame(console))[0] == 404  # nothing yet
        assert console.snapshot()["us"]["frame"] is None
        frames = [live_frame(seq, shade=40 * seq) for seq in (1, 2, 3)]
        for frame in frames:
            await robot.publish(f"{ROBOT.state}/us", frame)
        await _until(lambda: console.live.received == 3)
        status, header, jpeg = await get_frame(console)
        assert status == 200 and jpeg == frames[2].partition(b"\n")[2]  # the newest only
        assert header["seq"] == 3 and header["force_n"] == 4.5
        assert header["pose"]["tip"] == [0.01, -0.002, -0.21]
        assert 50 <= header["age_ms"] < 5000  # captured 50 ms before publishing, then transit
        summary = console.snapshot()["us"]
        assert (summary["skipped"], summary["served"], summary["frame"]["seq"]) == (2, 1, 3)

        for payload, words in BAD_FRAMES:
            refused = console.live.refused
            await robot.publish(f"{ROBOT.state}/us", payload)
            await _until(lambda: console.live.refused == refused + 1)  # noqa: B023
            assert words in (console.live.last_error or ""), (words, console.live.last_error)
        status, header, _ = await get_frame(console)  # the good frame is still the one shown
        assert (status, header["seq"]) == (200, 3)
        summary = console.snapshot()["us"]
        assert (summary["received"], summary["refused"]) == (3, len(BAD_FRAMES))


async def test_the_operator_link_announces_nothing_and_fails_requests_in_flight_at_a_loss(
        broker: Mosquitto, tmp_path: Path) -> None:
    """No birth, will or offline message (the operator ACL has no status topic), and a request
    waiting for its reply learns of a broker loss at once, not at its timeout."""
    async with aiomqtt.Client("127.0.0.1", broker.port,
                              protocol=aiomqtt.ProtocolVersion.V5) as spy:
        await spy.subscribe("medge/v1/#")
        async with TeleopClient(Broker(port=broker.port), ROBOT, "alice") as client:
            request = asyncio.create_task(client.arm())  # nobody answers: no daemon here
            async with asyncio.timeout(5):
                message = await anext(aiter(spy.messages))
            assert message.topic.matches(ROBOT.request("alice"))  # the request, nothing before
            started = time.monotonic()
            await asyncio.to_thread(broker.stop)
            with pytest.raises(LinkDown):
                await request
            assert time.monotonic() - started < 3.0  # the request's own timeout is 5 s
            await asyncio.to_thread(broker.start)
            await _until(lambda: client.connected, timeout=15)
    # the spy's own link died with the broker; a fresh one sees no retained status either
    async with aiomqtt.Client("127.0.0.1", broker.port,
                              protocol=aiomqtt.ProtocolVersion.V5) as late:
        await late.subscribe("medge/v1/#")
        await late.publish("medge/v1/end", b"end")
        async with asyncio.timeout(5):
            message = await anext(aiter(late.messages))
        assert message.topic.value == "medge/v1/end"


@pytest.mark.parametrize("config_text", [
    (Path(__file__).resolve().parent.parent / "config" / "manipulator.toml").read_text(),
    "\n".join(line for line in inspect.getsource(demo.robot_part).splitlines()
              if "setpoint_period_s" in line),
])
def test_the_deployed_supervisor_expects_the_console_pages_setpoint_rate(config_text: str) -> None:
    """The supervisor stops after ``max_missed_setpoints`` of *its* ``setpoint_period_s``; the
    page sends every SEND_PERIOD_MS. Expecting 100 Hz from a 50 Hz page made every 30 ms of
    browser jitter a stale-command stop (found by the chaos robot part)."""
    send_ms = re.search(r"const SEND_PERIOD_MS = (\d+);",
                        (STATIC_DIR / "console.js").read_text())
    period = re.search(r"setpoint_period_s = ([0-9.]+)", config_text)
    assert send_ms is not None and period is not None
    missed = SupervisorConfig().max_missed_setpoints
    assert float(period[1]) * 1000 >= int(send_ms[1])
    assert missed * float(period[1]) < SupervisorConfig().stale_s  # still well inside 250 ms
