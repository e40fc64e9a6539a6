"""Local server processes (broker, PACS) for the demo, benchmarks and tests: each with its own
config in its own directory, on free loopback ports, logging to a file, and stopped by its PID
only (never by name: the machine may run other instances)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


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
class LocalServer:
    """A child server process writing its output to ``{directory}/{LOG_NAME}``."""

    directory: Path
    LOG_NAME: ClassVar[str] = "server.log"
    STOP_TIMEOUT_S: ClassVar[float] = 5.0

    def __post_init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / self.LOG_NAME, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        log.close()
        return self.proc

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(self.STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        path = self.directory / self.LOG_NAME
        return path.read_text(errors="replace") if path.exists() else ""
