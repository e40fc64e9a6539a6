"""The MQTT teleoperation protocol of the probe manipulator: topics, payloads, validation.

Everything that arrives over MQTT is untrusted: :func:`decode_setpoint` and
:func:`decode_request` turn bytes into typed messages or raise :class:`ProtocolError` naming the
field and the reason, never anything else. The daemon drops bad setpoints (QoS 0, no reply
channel) and counts them by reason; it answers bad requests with an error reply.

Topics (docs/teleop.md), below ``medge/v1/{site}/{node}/{robot}``:

* ``cmd/{operator}/setpoint`` — QoS 0, never retained, up to 100 Hz: :class:`SetpointMessage`;
* ``cmd/{operator}/request`` — QoS 1, MQTT 5 request/response: :class:`Request`;
* ``reply/{operator}/…`` — the Response Topic a request names: :class:`Reply`;
* ``state`` — QoS 0, 50 Hz, the daemon's state document.

The operator identity is the topic level after ``cmd``: the broker's ACL only lets user ``%u``
publish below ``cmd/%u/``, so the level is as trustworthy as the login (MQTT 5 does not tell
subscribers who published). The ``operator`` field in the payload must repeat it.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import Any

from daemons.manipulator.kinematics import ProbePose, Twist
from medge.settings import TOPIC_LEVEL
from medge.topics import ROOT

VERSION = 1
MAX_SETPOINT_BYTES = 512
MAX_REQUEST_BYTES = 4096
MAX_CORRELATION_BYTES = 64
MAX_SURFACE_POINTS = 20_000


class Command(enum.Enum):
    ARM = "arm"
    DISARM = "disarm"
    ESTOP = "estop"
    RESET = "reset"
    MODE = "mode"
    GOTO = "goto"
    REGISTER = "register"
    CHECK_REGISTRATION = "check_registration"
    SURFACE = "surface"


class Mode(enum.Enum):
    NORMAL = "normal"
    FINE = "fine"
    """Operator twists scaled down (``fine_scale``) for small probe adjustments."""


class ProtocolError(ValueError):
    """A payload or topic that does not follow the protocol; ``field`` names where."""

    def __init__(self, field: str, reason: str, code: str = "malformed") -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.code = code
        """Counter / reply reason: ``malformed``, ``too_large``, ``operator_mismatch``…"""


@dataclass(frozen=True)
class SetpointMessage:
    operator: str
    seq: int
    sent_at: float
    """Sender's clock, seconds (any epoch): ordering and transit delay only."""
    enable: bool
    twist: Twist | None = None
    pose: ProbePose | None = None


@dataclass(frozen=True)
class Request:
    operator: str
    command: Command
    args: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    command: str
    ok: bool
    reason: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class RobotTopics:
    """The teleoperation topics of one robot (``prefix`` = ``medge/v1/{site}/{node}/{robot}``)."""

    site: str
    node: str
    robot: str

    def __post_init__(self) -> None:
        for name in ("site", "node", "robot"):
            check_level(name, getattr(self, name))

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.site}/{self.node}/{self.robot}"

    @property
    def state(self) -> str:
        return f"{self.prefix}/state"

    @property
    def setpoints(self) -> str:
        """Subscription filter: every operator's setpoints."""
        return f"{self.prefix}/cmd/+/setpoint"

    @property
    def requests(self) -> str:
        return f"{self.prefix}/cmd/+/request"

    def setpoint(self, operator: str) -> str:
        check_level("operator", operator)
        return f"{self.prefix}/cmd/{operator}/setpoint"

    def request(self, operator: str) -> str:
        check_level("operator", operator)
        return f"{self.prefix}/cmd/{operator}/request"

    def reply(self, operator: str) -> str:
        check_level("operator", operator)
        return f"{self.prefix}/reply/{operator}"

    def operator_of(self, topic: str) -> str:
        """The operator level of a ``cmd/{operator}/…`` topic of this robot."""
        head, sep, rest = topic.partition(f"{self.prefix}/cmd/")
        operator, _, leaf = rest.partition("/")
        if head or not sep or leaf not in ("setpoint", "request"):
            raise ProtocolError("topic", f"{topic!r} is not a command topic of {self.prefix}")
        check_level("operator", operator)
        return operator

    def check_response_topic(self, operator: str, topic: str) -> None:
        """Replies go only below ``reply/{operator}``: the daemon is no relay for other topics."""
        own = self.reply(operator)
        if topic != own and not topic.startswith(own + "/"):
            raise ProtocolError("response_topic", f"must be {own} or below it, not {topic!r}",
                                "bad_response_topic")
        if any(c in topic for c in "+#\0"):
            raise ProtocolError("response_topic", "wildcards are not allowed",
                                "bad_response_topic")


def check_level(name: str, value: str) -> None:
    if not TOPIC_LEVEL.match(value):
        raise ProtocolError(name, f"{value!r} must be 1-64 characters of letters, digits, "
                                  "'_', '.', '-'")


# --- decoding ----------------------------------------------------------------------------


def _document(payload: bytes, limit: int) -> dict[str, Any]:
    if len(payload) > limit:
        raise ProtocolError("payload", f"{len(payload)} bytes exceeds {limit}", "too_large")
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, huge integers
        raise ProtocolError("payload", f"not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ProtocolError("payload", "must be a JSON object")
    if document.get("v") != VERSION:
        raise ProtocolError("v", f"protocol version must be {VERSION}, got {document.get('v')!r}",
                            "unsupported_version")
    return document


def _only_keys(document: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise ProtocolError(unknown[0], "unknown field")


def _number(document: dict[str, Any], key: str) -> float:
    value = document.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(key, f"must be a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise ProtocolError(key, "must be finite")
    return float(value)


def _vector(document: dict[str, Any], key: str, length: int) -> tuple[float, ...]:
    values = document[key]
    if not isinstance(values, list) or len(values) != length:
        raise ProtocolError(key, f"must be an array of {length} numbers")
    return tuple(_number({key: v}, key) for v in values)


def _operator(document: dict[str, Any], topic_operator: str) -> str:
    operator = document.get("operator")
    if operator != topic_operator:
        raise ProtocolError("operator", f"{operator!r} does not match the topic's operator "
                                        f"{topic_operator!r}", "operator_mismatch")
    return topic_operator


def decode_setpoint(payload: bytes, topic_operator: str) -> SetpointMessage:
    document = _document(payload, MAX_SETPOINT_BYTES)
    _only_keys(document, {"v", "operator", "seq", "sent_at", "enable", "twist", "pose"})
    operator = _operator(document, topic_operator)
    seq = document.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63:
        raise ProtocolError("seq", "must be an integer in 0..2^63-1")
    enable = document.get("enable")
    if not isinstance(enable, bool):
        raise ProtocolError("enable", f"must be true or false, got {_kind(enable)}")
    if "twist" in document and "pose" in document:
        raise ProtocolError("twist", "give a twist or a pose, not both")
    twist = pose = None
    if "twist" in document:
        values = _vector(document, "twist", 6)
        twist = Twist((values[0], values[1], values[2]), (values[3], values[4], values[5]))
    if "pose" in document:
        pose = ProbePose(*_vector(document, "pose", 5))
    return SetpointMessage(operator, seq, _number(document, "sent_at"), enable, twist, pose)


def decode_request(payload: bytes, topic_operator: str) -> Request:
    document = _document(payload, MAX_REQUEST_BYTES)
    _only_keys(document, {"v", "operator", "cmd", "args"})
    operator = _operator(document, topic_operator)
    try:
        command = Command(document.get("cmd"))
    except ValueError:
        raise ProtocolError("cmd", f"unknown command {document.get('cmd')!r}; expected one of "
                                   f"{[c.value for c in Command]}", "unknown_command") from None
    args = document.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("args", "must be an object")
    return Request(operator, command, args)


def string_arg(request: Request, key: str, choices: set[str] | None = None) -> str:
    value = request.args.get(key)
    if not isinstance(value, str) or (choices is not None and value not in choices):
        expected = f"one of {sorted(choices)}" if choices is not None else "a string"
        raise ProtocolError(f"args.{key}", f"must be {expected}, got {value!r}", "bad_argument")
    return value


def int_arg(request: Request, key: str, default: int, low: int, high: int) -> int:
    value = request.args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"args.{key}", f"must be an integer in {low}..{high}, got {value!r}",
                            "bad_argument")
    return value


# --- encoding ----------------------------------------------------------------------------


def _dumps(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


def encode_setpoint(message: SetpointMessage) -> bytes:
    document: dict[str, Any] = {"v": VERSION, "operator": message.operator, "seq": message.seq,
                                "sent_at": message.sent_at, "enable": message.enable}
    if message.twist is not None:
        document["twist"] = [*message.twist.linear, *message.twist.angular]
    if message.pose is not None:
        document["pose"] = list(message.pose)
    return _dumps(document)


def encode_request(operator: str, command: Command, args: dict[str, Any] | None = None) -> bytes:
    return _dumps({"v": VERSION, "operator": operator, "cmd": command.value, "args": args or {}})


def encode_state(document: dict[str, Any]) -> bytes:
    return _dumps(document)


def encode_reply(reply: Reply) -> bytes:
    return _dumps({"v": VERSION, "cmd": reply.command, "ok": reply.ok, "reason": reply.reason,
                   "detail": reply.detail})


def decode_reply(payload: bytes) -> Reply:
    document = _document(payload, 16 * 1024 * 1024)
    try:
        return Reply(str(document["cmd"]), bool(document["ok"]), str(document["reason"]),
                     dict(document["detail"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError("reply", f"incomplete reply ({exc})") from None


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__
