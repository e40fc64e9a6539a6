"""A stand-alone producer process for crash tests: appends ``total`` numbered messages through
the Runtime, resuming after a SIGKILL from the last durable sequence number.

usage: producer_proc.py STATE_DIR BROKER_PORT TOTAL LINGER
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medge.runtime import Runtime
from tests.helpers import daemon_config


async def main(state_dir: Path, port: int, total: int, linger: bool) -> None:
    cfg = daemon_config(state_dir, port)
    async with Runtime(cfg, "producer") as rt:
        start = rt.outbox.last_seq("meter/obs")
        print("ready", start, flush=True)
        pending: set[asyncio.Task[object]] = set()
        for n in range(start, total):
            pending.add(asyncio.create_task(rt.emit("meter", "obs", {"n": n})))
            if len(pending) >= 50:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if n % 500 == 0:
                await asyncio.sleep(0.05)  # a steady stream, not one burst
        await asyncio.gather(*pending)
        if linger:
            await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"))
