"""The medge command line: version, help, config check, run with a bad config, sim start-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medge import __version__
from medge.cli import main

REPO = Path(__file__).resolve().parent.parent


def medge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medge.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"medge {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("config", "run", "sim"):
        assert command in out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_config_check_accepts_the_shipped_gateway_config() -> None:
    result = medge("config", "check", "config/gateway.toml", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"path": "config/gateway.toml", "ok": True, "daemon": "gateway"}
    ]


def test_config_check_reports_each_bad_file_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "gateway-bad.toml"
    bad.write_text((REPO / "config/gateway.toml").read_text().replace(
        "port = 1883", "port = 1883\nportt = 1"))
    unknown = tmp_path / "mystery.toml"
    unknown.write_text("")
    result = medge("config", "check", str(bad), str(unknown))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == (f"{bad}: mqtt.portt: unknown key (expected one of: client_id, "
                        "connect_timeout, host, keepalive, password_file, port, "
                        "reconnect_max, reconnect_min, tls, username)")
    assert "cannot tell which daemon" in lines[1]


def test_run_with_bad_config_exits_2_before_starting(tmp_path: Path) -> None:
    result = medge("run", "gateway", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    missing = tmp_path / "missing.toml"
    assert result.stderr.strip() == f"medge run gateway: {missing}: file not found"


def test_sim_prints_its_pty_path_first_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "medge.cli", "sim", "grbl", "--pty"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first.startswith("/dev/pts/") and os.path.exists(first)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_sim_rejects_bad_listen_url() -> None:
    result = medge("sim", "grbl", "--listen", "udp://x")
    assert result.returncode == 2
    assert "tcp://HOST:PORT" in result.stderr
