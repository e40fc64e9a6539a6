"""One fuzz target per parser of outside bytes, shared by the atheris harnesses (``make fuzz``)
and the hypothesis property tests (tests/fuzz/).

A target takes arbitrary bytes and feeds them to one parser. The parser may return a value or
raise one of the target's *typed* errors (the error that parser documents); anything else —
KeyError, IndexError, UnicodeDecodeError, RecursionError, a bare ValueError from ``int()`` — is
a crash: it escapes the driver's error handling and ends up as an unhandled exception.
"""

from __future__ import annotations

import contextlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

RECEIVED = datetime(2026, 11, 22, 1, 0, tzinfo=UTC)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


@dataclass(frozen=True)
class Target:
    name: str
    parse: Callable[[bytes], object]
    typed_errors: tuple[type[BaseException], ...]
    """What the parser may raise on bad input; anything else is a finding."""

    def run(self, data: bytes) -> None:
        """Feed ``data``; return normally for a value or a typed error, raise anything else."""
        with contextlib.suppress(*self.typed_errors):
            self.parse(data)


def _text(data: bytes) -> str:
    return data.decode("latin-1")


def _grbl_line(data: bytes) -> object:
    from drivers import grbl_protocol as g

    line = _text(data).rstrip("\r\n")
    kind = g.classify(line)
    parsers: dict[g.Kind, Callable[[str], object]] = {
        g.Kind.STATUS: g.parse_status, g.Kind.ERROR: g.parse_code, g.Kind.ALARM: g.parse_code,
        g.Kind.SETTING: g.parse_setting, g.Kind.BANNER: g.parse_banner,
    }
    # a line of another kind goes to the status parser too: it must refuse it cleanly
    return parsers.get(kind, g.parse_status)(line)


def _grbl_build_info(data: bytes) -> object:
    from drivers import grbl_protocol as g

    return g.parse_build_info(_text(data).splitlines())


def _dynamixel_status(data: bytes) -> object:
    from drivers import dynamixel_protocol as d

    start = d.find_header(data)
    if start < 0:
        return None
    return d.decode_status(data[start:])


def _astm_frame(data: bytes) -> object:
    from drivers.astm_link import decode_frame

    return decode_frame(data)


def _astm_message(data: bytes) -> object:
    from drivers.astm import measurements_from_message

    return measurements_from_message(data, RECEIVED)


def _printout(data: bytes) -> object:
    from drivers.urine_printout import parse_report

    return parse_report(data, RECEIVED)


def _cms50(data: bytes) -> object:
    from drivers import cms50

    legacy = [cms50.decode_legacy_packet(p) for p in cms50.LegacyFramer().feed(data)]
    framer = cms50.V46Framer()
    live = [cms50.decode_live_frame(cms50.unstuff(f)) for f in framer.feed(data)
            if f[0] == cms50.FRAME_LIVE]
    return legacy, live


def _modbus(data: bytes) -> object:
    from drivers.modbus_device import ModbusRtuClient
    from drivers.serial_link import SerialLink

    client = ModbusRtuClient(SerialLink("socket://127.0.0.1:9"), unit=1)
    return [client.extract(bytearray(data), code) for code in (3, 4, 16)]


def _uroflow(data: bytes) -> object:
    from drivers.uroflow import UroflowLineError, parse_line

    parsed = []
    for line in data.split(b"\n"):
        try:
            parsed.append(parse_line(line))
        except UroflowLineError:
            continue
    return parsed


def _force(data: bytes) -> object:
    from drivers.force_sensor import parse_line

    return parse_line(data)


def _teleop(data: bytes) -> object:
    from daemons.manipulator import teleop_protocol as t

    results: list[object] = []
    for decode in (lambda p: t.decode_setpoint(p, "op1"), lambda p: t.decode_request(p, "op1"),
                   t.decode_reply):
        try:
            results.append(decode(data))
        except t.ProtocolError:
            continue
    return results


def _microscope_job(data: bytes) -> object:
    from daemons.microscope.jobs import parse_spec

    document = json.loads(data)
    return parse_spec(document, {"20x", "40x"}, {"hospital"})


def _us_live(data: bytes) -> object:
    from daemons.manipulator.ultrasound import parse_live

    return parse_live(data)


def _config(data: bytes) -> object:
    """Every daemon's schema through the loader's validation (``load`` is TOML + this), with
    relative paths resolved beside the shipped configs."""
    from daemons.gateway.daemon import GatewayConfig
    from daemons.manipulator.daemon import ManipulatorConfig
    from daemons.microscope.daemon import MicroscopeConfig
    from medge import config

    document = tomllib.loads(_text(data))
    loaded = []
    for schema in (GatewayConfig, MicroscopeConfig, ManipulatorConfig):
        try:
            loaded.append(config.from_mapping(document, schema, source="fuzz.toml",
                                              base_dir=CONFIG_DIR))
        except config.ConfigError:
            continue
    return loaded


def _console_settings(data: bytes) -> object:
    from medge.console.settings import InputSettings

    return InputSettings.from_dict(json.loads(data))


def _spacemouse(data: bytes) -> object:
    from medge.console.spacemouse import SpaceMouseState, apply_report

    return [apply_report(SpaceMouseState(), data, combined) for combined in (False, True)]


def _console_http(data: bytes) -> object:
    """What a browser (or anything on loopback) sends the console: a request head, then the body
    of a setpoint POST, through the same functions the server uses."""
    from medge.console.server import parse_head, parse_setpoint
    from medge.console.settings import InputSettings

    head, sep, body = data.partition(b"\r\n\r\n")
    request, length = parse_head(head + sep)
    return request, parse_setpoint(body[:length], InputSettings())


def _errors(*names: str) -> tuple[type[BaseException], ...]:
    """Typed errors by dotted name (imported lazily so that one broken module names itself)."""
    import importlib

    found: list[type[BaseException]] = []
    for name in names:
        module, _, attr = name.rpartition(".")
        found.append(getattr(importlib.import_module(module), attr))
    return tuple(found)


def all_targets() -> dict[str, Target]:
    json_errors = ("json.JSONDecodeError", "builtins.UnicodeDecodeError")
    specs: list[tuple[str, Callable[[bytes], object], tuple[str, ...]]] = [
        ("grbl_line", _grbl_line, ("drivers.stage.StageError",)),
        ("grbl_build_info", _grbl_build_info, ("drivers.stage.StageError",)),
        ("dynamixel_status", _dynamixel_status, ("drivers.dynamixel_protocol.DynamixelError",)),
        ("astm_frame", _astm_frame, ("drivers.astm_link.AstmFrameError",)),
        ("astm_message", _astm_message, ("drivers.astm_records.AstmRecordError",
                                         "drivers.urinalysis.UrinalysisError")),
        ("printout_report", _printout, ("drivers.urine_printout.PrintoutError",)),
        ("cms50_stream", _cms50, ("drivers.cms50.Cms50Error",)),
        ("modbus_response", _modbus, ("drivers.modbus_device.ModbusError",)),
        ("uroflow_stream", _uroflow, ()),
        ("force_line", _force, ("drivers.force_sensor.ForceSensorError",)),
        ("teleop_payload", _teleop, ()),
        ("microscope_job", _microscope_job,
         (*json_errors, "daemons.microscope.jobs.JobError")),
        ("ultrasound_live", _us_live, (*json_errors, "builtins.ValueError")),
        ("config", _config, ("tomllib.TOMLDecodeError",)),
        ("console_settings", _console_settings,
         (*json_errors, "medge.console.settings.SettingsError")),
        ("spacemouse_report", _spacemouse, ("medge.console.spacemouse.SpaceMouseError",)),
        ("console_http", _console_http, ("medge.console.server.HttpError",)),
    ]
    return {name: Target(name, parse, _errors(*errors)) for name, parse, errors in specs}
