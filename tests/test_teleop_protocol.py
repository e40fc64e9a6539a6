"""The teleoperation payload codec: every malformed input is a ProtocolError naming the field."""

from __future__ import annotations

import json

import pytest

from daemons.manipulator import teleop_protocol as proto
from daemons.manipulator.kinematics import ProbePose, Twist

TOPICS = proto.RobotTopics("site-a", "edge-1", "probe-arm")


def setpoint(**fields: object) -> bytes:
    document: dict[str, object] = {"v": 1, "operator": "alice", "seq": 7, "sent_at": 12.5,
                                   "enable": True}
    document.update(fields)
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


def test_setpoints_round_trip() -> None:
    twist = proto.SetpointMessage("alice", 3, 1.25, True, Twist((0.01, 0, 0), (0, 0.1, 0)))
    assert proto.decode_setpoint(proto.encode_setpoint(twist), "alice") == twist
    pose = proto.SetpointMessage("alice", 4, 1.5, False, pose=ProbePose(0, 0, -0.2, 0.1, 0))
    assert proto.decode_setpoint(proto.encode_setpoint(pose), "alice") == pose
    hold = proto.decode_setpoint(setpoint(), "alice")
    assert (hold.twist, hold.pose, hold.enable, hold.seq) == (None, None, True, 7)


@pytest.mark.parametrize(("payload", "field", "code"), [
    (b"\xff\xfe", "payload", "malformed"),
    (b"not json", "payload", "malformed"),
    (b"[1, 2]", "payload", "malformed"),
    (b"x" * 600, "payload", "too_large"),
    (setpoint(v=2), "v", "unsupported_version"),
    (setpoint(operator="bob"), "operator", "operator_mismatch"),
    (setpoint(seq=-1), "seq", "malformed"),
    (setpoint(seq=1.5), "seq", "malformed"),
    (setpoint(seq=True), "seq", "malformed"),
    (setpoint(enable=1), "enable", "malformed"),
    (setpoint(enable=...), "enable", "malformed"),
    (setpoint(sent_at="now"), "sent_at", "malformed"),
    (setpoint(sent_at=...), "sent_at", "malformed"),
    (b'{"v":1,"operator":"alice","seq":1,"sent_at":NaN,"enable":true}', "sent_at", "malformed"),
    (setpoint(twist=[0, 0, 0]), "twist", "malformed"),
    (setpoint(twist=[0, 0, 0, 0, 0, "x"]), "twist", "malformed"),
    (setpoint(twist=[1e400, 0, 0, 0, 0, 0]), "twist", "malformed"),
    (setpoint(pose=[0, 0, 0, 0]), "pose", "malformed"),
    (setpoint(twist=[0] * 6, pose=[0] * 5), "twist", "malformed"),
    (setpoint(speed=3), "speed", "malformed"),
])
def test_malformed_setpoints_name_the_field(payload: bytes, field: str, code: str) -> None:
    with pytest.raises(proto.ProtocolError) as caught:
        proto.decode_setpoint(payload, "alice")
    assert (caught.value.field, caught.value.code) == (field, code)


def test_requests_decode_and_bad_ones_name_the_field() -> None:
    request = proto.decode_request(proto.encode_request("alice", proto.Command.GOTO,
                                                        {"pose": "home"}), "alice")
    assert request == proto.Request("alice", proto.Command.GOTO, {"pose": "home"})
    assert proto.string_arg(request, "pose", {"home"}) == "home"
    with pytest.raises(proto.ProtocolError, match="args.pose"):
        proto.string_arg(request, "pose", {"park"})
    with pytest.raises(proto.ProtocolError, match="args.max_points"):
        proto.int_arg(proto.Request("alice", proto.Command.SURFACE, {"max_points": 0}),
                      "max_points", 10, 1, 100)
    bad = {"cmd": ("unknown_command", b'{"v":1,"operator":"alice","cmd":"fly"}'),
           "args": ("malformed", b'{"v":1,"operator":"alice","cmd":"arm","args":[]}'),
           "payload": ("malformed", b'{"v":1,"a":' + b"[" * 2000 + b"]" * 2000 + b"}")}
    for field, (code, payload) in bad.items():
        with pytest.raises(proto.ProtocolError) as caught:
            proto.decode_request(payload, "alice")
        assert (caught.value.field, caught.value.code) == (field, code)


def test_topics_carry_the_operator_and_replies_stay_in_their_lane() -> None:
    assert TOPICS.setpoint("alice") == "medge/v1/site-a/edge-1/probe-arm/cmd/alice/setpoint"
    assert TOPICS.operator_of(TOPICS.request("bob")) == "bob"
    for topic in ("medge/v1/site-a/edge-1/probe-arm/cmd/alice/other",
                  "medge/v1/site-b/edge-1/probe-arm/cmd/alice/setpoint",
                  "medge/v1/site-a/edge-1/probe-arm/cmd/al ice/setpoint"):
        with pytest.raises(proto.ProtocolError):
            TOPICS.operator_of(topic)
    TOPICS.check_response_topic("alice", TOPICS.reply("alice") + "/console-1")
    for topic in (TOPICS.reply("bob"), TOPICS.state, TOPICS.reply("alice") + "x",
                  TOPICS.reply("alice") + "/#"):
        with pytest.raises(proto.ProtocolError) as caught:
            TOPICS.check_response_topic("alice", topic)
        assert caught.value.code == "bad_response_topic"
    with pytest.raises(proto.ProtocolError):
        proto.RobotTopics("site-a", "edge-1", "probe/arm")
