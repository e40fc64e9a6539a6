"""A minimal daemon for lifecycle tests: READY, watchdog pings, then a hung loop, then it waits
for SIGTERM and exits cleanly. usage: service_proc.py HANG_SECONDS"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medge.service import Service


async def main(service: Service) -> None:
    service.ready("testing")
    await asyncio.sleep(0.5)
    time.sleep(float(sys.argv[1]))  # the event loop is hung: no watchdog pings may go out
    service.status("recovered")
    await service.stopping.wait()


if __name__ == "__main__":
    sys.exit(asyncio.run(Service("proc", stop_timeout=5).run(main)))
