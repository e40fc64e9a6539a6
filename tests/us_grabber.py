"""``medge sim ultrasound`` as its own process, for tests and bench/ultrasound: the stream's URL
while it runs, its counters (frames sent, skipped, rendered, cached) once it is stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MEDGE = Path(sys.executable).with_name("medge")


@dataclass
class GrabberProcess:
    process: asyncio.subprocess.Process
    url: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    """Filled when the process has stopped (its last line: ``stats: {...}``)."""

    @property
    def pid(self) -> int:
        return self.process.pid

    async def snapshot(self) -> dict[str, Any]:
        """The counters now (SIGUSR1 makes the simulator print them)."""
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGUSR1)
        async with asyncio.timeout(10):
            while True:
                line = (await self.process.stdout.readline()).decode()
                if not line:
                    raise RuntimeError("medge sim ultrasound exited")
                if line.startswith("stats: "):
                    return dict(json.loads(line.removeprefix("stats: ")))

    async def stop(self) -> dict[str, Any]:
        if self.process.returncode is None:
            self.process.terminate()
        output, _ = await asyncio.wait_for(self.process.communicate(), 20)
        for line in output.decode().splitlines():
            if line.startswith("stats: "):
                self.stats = json.loads(line.removeprefix("stats: "))
        return self.stats


@contextlib.asynccontextmanager
async def grabber_process(*options: str) -> AsyncIterator[GrabberProcess]:
    """``medge sim ultrasound --listen tcp://127.0.0.1:0 OPTIONS``, stopped (by its PID) on exit."""
    process = await asyncio.create_subprocess_exec(
        str(MEDGE), "sim", "ultrasound", "--listen", "tcp://127.0.0.1:0", *options,
        stdout=asyncio.subprocess.PIPE)
    grabber = GrabberProcess(process)
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            while not grabber.url:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"medge sim ultrasound exited ({await process.wait()})")
                if line.startswith("stream: "):
                    grabber.url = line.removeprefix("stream: ").strip()
        yield grabber
    finally:
        await grabber.stop()
