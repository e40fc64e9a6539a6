"""Run every atheris harness (or those named) for ``--seconds`` each and print executions and
findings per harness: ``python -m fuzz.run --seconds 60 [NAME …]`` (``make fuzz``)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from fuzz.targets import all_targets

RUNS = re.compile(rb"Done (\d+) runs in (\d+) second")
COVERAGE = re.compile(rb"cov: (\d+)")


def run_one(name: str, seconds: int, artifacts: Path) -> tuple[int, int, list[Path]]:
    """(executions, coverage edges, crash files) of one harness run."""
    folder = artifacts / name
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.glob("crash-*")) | set(folder.glob("oom-*")) | set(folder.glob("timeout-*"))
    result = subprocess.run(
        [sys.executable, "-m", "fuzz.harness", name, f"-max_total_time={seconds}",
         "-timeout=10", "-rss_limit_mb=1024", "-max_len=4096", f"-artifact_prefix={folder}/"],
        capture_output=True, timeout=seconds + 120, check=False)
    log = result.stderr
    (folder / "last.log").write_bytes(log)
    runs = RUNS.search(log)
    edges = COVERAGE.findall(log)
    found = (set(folder.glob("crash-*")) | set(folder.glob("oom-*"))
             | set(folder.glob("timeout-*"))) - before
    if runs is None and not found:
        raise RuntimeError(f"{name}: the harness did not run (see {folder / 'last.log'})")
    return (int(runs[1]) if runs else 0), (int(edges[-1]) if edges else 0), sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=60, help="per harness (default 60)")
    parser.add_argument("--artifacts", type=Path, default=Path("build/fuzz/artifacts"))
    parser.add_argument("names", nargs="*", help="harnesses (default: all)")
    args = parser.parse_args()
    names = args.names or sorted(all_targets())
    print(f"{'harness':<20} {'executions':>11} {'exec/s':>8} {'cov':>6}  findings")
    failed = False
    for name in names:
        runs, edges, found = run_one(name, args.seconds, args.artifacts)
        failed |= bool(found)
        print(f"{name:<20} {runs:>11} {runs / max(args.seconds, 1):>8.0f} {edges:>6}  "
              f"{', '.join(str(p) for p in found) or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
