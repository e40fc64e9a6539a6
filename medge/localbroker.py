"""A local mosquitto for the demo, benchmarks and tests (see medge.localproc)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from medge.localproc import LocalServer, free_port, wait_for_port

__all__ = ["MOSQUITTO", "Mosquitto", "free_port", "wait_for_port"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@dataclass
class Mosquitto(LocalServer):
    """One broker process; ``stop()``/``start()`` keep the same port (for outage tests)."""

    LOG_NAME: ClassVar[str] = "broker.log"
    port: int = field(default_factory=free_port)
    extra_config: str = ""
    """Listener options; the default listener allows anonymous clients (tests, demo)."""
    persistence: bool = True
    """Keep sessions and queued messages across a clean restart (outage tests need it)."""

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
        if self.running:
            return
        self.write_config()
        self.spawn([MOSQUITTO, "-c", str(self.config_path)])
        wait_for_port(self.port, proc=self.proc)
