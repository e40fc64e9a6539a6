"""sd_notify against a fake NOTIFY_SOCKET: READY, WATCHDOG from the event loop (a hung loop stops
the pings, so systemd would restart the unit), STOPPING and a clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medge.service import sd_notify, watchdog_interval

PROC = Path(__file__).with_name("service_proc.py")


def test_sd_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "junk")
    assert watchdog_interval() is None


async def test_ready_watchdog_hang_and_graceful_stop(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, str(PROC), "1.5"], env=env)
    received: list[tuple[float, str]] = []
    try:
        async with asyncio.timeout(30):
            while not any("STATUS=recovered" in m for _, m in received):
                data = await loop.sock_recv(sock, 4096)
                received.append((time.monotonic(), data.decode()))
            proc.send_signal(signal.SIGTERM)
            while not any(m.startswith("STOPPING=1") for _, m in received):
                data = await loop.sock_recv(sock, 4096)
                received.append((time.monotonic(), data.decode()))
            assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    messages = [m for _, m in received]
    ready = next(m for m in messages if m.startswith("READY=1"))
    assert "STATUS=testing" in ready
    pings = [t for t, m in received if m == "WATCHDOG=1"]
    assert len(pings) >= 4
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) >= 1.4, "a hung event loop must stop the watchdog pings"
