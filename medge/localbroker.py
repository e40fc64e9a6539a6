"""A local mosquitto run for the demo, benchmarks and tests: own config, a free loopback port,
stopped by its PID only (never by name: the machine may run other brokers)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


@dataclass
class Mosquitto:
    """One broker process; ``stop()``/``start()`` keep the same port (for outage tests)."""

    directory: Path
    port: int = field(default_factory=free_port)
    extra_config: str = ""
    """Listener options; the default listener allows anonymous clients (tests, demo)."""
    persistence: bool = True
    """Keep sessions and queued messages across a clean restart (outage tests need it)."""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    def write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        persistence = (
            f"persistence true\npersistence_location {self.directory}/\nautosave_interval 1\n"
            if self.persistence
            else "persistence false\n"
        )
        self.config_path.write_text(
            # as root, mosquitto would drop to user "mosquitto", who cannot read pytest's tmp dirs
            ("user root\n" if os.geteuid() == 0 else "")
            + "per_listener_settings true\n"
            + persistence
            + "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            f"listener {self.port} 127.0.0.1\n"
            + (self.extra_config or "allow_anonymous true\n")
        )

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.write_config()
        log = open(self.directory / "broker.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)], stdout=log, stderr=log
        )
        log.close()
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        path = self.directory / "broker.log"
        return path.read_text(errors="replace") if path.exists() else ""
