"""Microscope start-up with a lab's history: reading the job store when the daemon starts.

    .venv/bin/python -m bench.jobstore [--jobs 2000] [--tiles 1500] [--recent 200]

Writes ``--jobs`` settled jobs of ``--tiles`` tiles each (1,500: a 15 x 15 mm area at 20x; a
state file of ~300 KB) and a few live ones, then times in the same run, page cache warm:
- ``load_for_start``: what the daemon reads now (live jobs whole, the ``--recent`` last finished
  settled summaries, chosen by the files' times);
- the peer: every state file loaded whole (what the daemon did before, commit 12a3919).
Prints seconds per start and the start after a year at 100 slides a day (linear per job),
beside systemd's default start timeout (90 s; the unit is Type=notify).
"""

from __future__ import annotations

import argparse
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from daemons.microscope.jobs import JobState, JobStore, TileRecord, load_for_start, parse_spec

SLIDES_A_YEAR = 100 * 365
START_TIMEOUT_S = 90.0


def fill(store: JobStore, jobs: int, tiles: int) -> None:
    spec = parse_spec({"barcode": "S-1", "accession": "A-1", "patient": "P-1",
                       "objective": "20x"}, {"20x"}, set())
    plan = [(random.uniform(0, 15000), random.uniform(0, 15000)) for _ in range(tiles)]
    for n in range(jobs + 3):
        job_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime(1.7e9 + n * 900)) + f"-{n:06x}"
        live = n >= jobs  # the newest three: queued, running, spooled
        status = ["queued", "running", "done"][n - jobs] if live else "done"
        job = JobState(job_id, spec, status=status, finished_at=0.0 if live else 1.7e9 + n,
                       delivery="spooled" if status == "done" and live else "delivered",
                       plan=plan)
        job.tiles = {i: TileRecord(i, x, y, -5000.0 + i / 1000, "ab" * 32)
                     for i, (x, y) in enumerate(plan)}
        store.save(job, sync=False)


def timed(run: Callable[[], object]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--tiles", type=int, default=1500)
    parser.add_argument("--recent", type=int, default=200)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="medge-jobstore-"))
    try:
        store = JobStore(root)
        fill(store, args.jobs, args.tiles)
        size = (root / store.ids()[0] / "state.json").stat().st_size
        found = load_for_start(store, args.recent)
        assert len(found.live) == 3 and len(found.recent) == args.recent
        now = min(timed(lambda: load_for_start(store, args.recent)) for _ in range(3))
        whole = min(timed(lambda: [store.load(i) for i in store.ids()]) for _ in range(2))
    finally:
        shutil.rmtree(root)
    print(f"bench/jobstore: {args.jobs} settled jobs of {args.tiles} tiles ({size / 1024:.0f} KB "
          f"state each) + 3 live, recent_jobs {args.recent}; {platform.node()}, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'start reads':<32} | {'seconds':>8} | {'a year (36,500 jobs, linear), s':>24}")
    print(f"{'-' * 32}-+-{'-' * 8}-+-{'-' * 24}")
    for name, seconds in (("live whole + last summaries", now),
                          ("every state whole (before)", whole)):
        year = seconds / (args.jobs + 3) * SLIDES_A_YEAR  # linear: an upper bound for the first
        print(f"{name:<32} | {seconds:8.3f} | {year:24.1f}")
    print(f"systemd start timeout {START_TIMEOUT_S:.0f} s; speed-up here {whole / now:.0f}x")


if __name__ == "__main__":
    main()
