"""Logs: JSON lines (for journald) carrying daemon and device on every line; state changes once."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from medge import log


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure() binds the captured stdout: later tests must not log into a closed file."""
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_json_lines_carry_daemon_and_device(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("info", "json", daemon="gateway", device="gw-0001")
    structlog.get_logger().info("reading stored", kind="obs")
    structlog.get_logger().debug("not shown at info level")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["event"] == "reading stored"
    assert entry["daemon"] == "gateway" and entry["device"] == "gw-0001"
    assert entry["level"] == "info" and entry["kind"] == "obs"
    assert entry["timestamp"].endswith("Z")


def test_state_log_reports_each_transition_once(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("info", "json", daemon="gateway")
    state = log.StateLog(structlog.get_logger(), "broker link")
    for _ in range(5):
        state.set("lost", level="warning")
    state.set("recovered")
    events = [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()]
    assert events == ["broker link lost", "broker link recovered"]
