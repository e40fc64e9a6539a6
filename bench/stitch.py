"""Stitching benchmark: medge against OpenCV's Stitcher (SCANS) and ASHLAR on the same slide.

    .venv/bin/python -m bench.stitch                 # 20 x 20 tiles of 1280 x 960, 12 % overlap
    .venv/bin/python -m bench.stitch --large         # ~60,000 x 60,000 px slide, medge only
    .venv/bin/python -m bench.stitch --rows 5 --cols 5 --tile 640x480

A synthetic slide with known truth is written once (JPEG q95 tiles, stage positions with
jitter and serpentine backlash); each method then runs in its own subprocess so its peak RSS
(ru_maxrss) is its own. ASHLAR is not a project dependency: ``pip install ashlar`` into the venv.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from daemons.microscope.wsi.synthetic import ScanSpec, SyntheticSlide, position_errors, write_scan

TRUTH_FILE = "truth.json"


def make_slide(folder: Path, spec: ScanSpec, workers: int, period: int | None) -> None:
    slide = SyntheticSlide(seed=spec.seed, bare_glass=0.0, period=period)
    truth = write_scan(folder, spec, slide, workers)
    (folder / TRUTH_FILE).write_text(json.dumps({
        "true_px": truth.true_px, "stage_px": truth.stage_px, "rows": spec.rows,
        "cols": spec.cols, "overlap": spec.overlap,
    }))


def errors_against_truth(found: dict[str, tuple[float, float]], truth: dict[str, Any]
                         ) -> dict[str, float]:
    names = [name for name in truth["true_px"] if name in found]
    if not names:
        return {"mean_px": math.nan, "max_px": math.nan, "dropped": len(truth["true_px"])}
    true = {k: tuple(v) for k, v in truth["true_px"].items()}
    errors = position_errors(found, true, names)
    return {"mean_px": float(errors.mean()), "max_px": float(errors.max()),
            "dropped": len(truth["true_px"]) - len(names)}


def run_medge(scan: Path, work: Path) -> dict[str, Any]:
    from daemons.microscope.wsi.pipeline import build_pyramid

    started = time.perf_counter()
    result = build_pyramid(scan, work, tile_size=512)
    total = time.perf_counter() - started
    truth = json.loads((scan / TRUTH_FILE).read_text())
    n = len(truth["true_px"])
    timings = result.timings_s
    return {
        **errors_against_truth(result.positions_px, truth),
        "tiles_per_s": n / (timings["register"] + timings["place"]),
        "pipeline_tiles_per_s": n / total,
        "timings": timings,
        "flagged": len(result.report.flagged_tiles),
        "rejected_pairs": result.report.rejected,
        "threshold": result.report.threshold,
        "reads": result.camera_tile_reads,
        "size": [result.levels[0].width, result.levels[0].height],
    }


def run_opencv(scan: Path, work: Path) -> dict[str, Any]:
    """Stitcher SCANS has no stage input and exposes no tile positions: report what it keeps."""
    import cv2

    truth = json.loads((scan / TRUTH_FILE).read_text())
    names = sorted(truth["true_px"])
    images = [cv2.imread(str(scan / name)) for name in names]
    started = time.perf_counter()
    stitcher = cv2.Stitcher_create(cv2.Stitcher_SCANS)
    status, panorama = stitcher.stitch(images)
    elapsed = time.perf_counter() - started
    kept = len(stitcher.component()) if status == 0 else 0
    return {
        "mean_px": math.nan, "max_px": math.nan, "dropped": len(names) - kept,
        "tiles_per_s": len(names) / elapsed, "status": int(status),
        "size": list(panorama.shape[1::-1]) if status == 0 else None,
        "note": "positions not exposed" if status == 0 else f"failed, status {status}",
    }


def run_ashlar(scan: Path, work: Path) -> dict[str, Any]:
    """ASHLAR reads single-channel image series on a nominal grid: converted outside the clock."""
    import cv2
    from ashlar import fileseries, reg

    truth = json.loads((scan / TRUTH_FILE).read_text())
    rows, cols, overlap = truth["rows"], truth["cols"], truth["overlap"]
    series = work / "ashlar"
    series.mkdir(parents=True)
    for name in truth["true_px"]:
        row, col = int(name[6:9]), int(name[11:14])
        gray = cv2.imread(str(scan / name), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(series / f"img_s{row * cols + col:05d}.tif"), gray)
    started = time.perf_counter()
    reader = fileseries.FileSeriesReader(str(series), pattern="img_s{series:05}.tif",
                                         overlap=overlap, width=cols, height=rows)
    aligner = reg.EdgeAligner(reader, channel=0, max_shift=50, verbose=False)
    aligner.run()
    elapsed = time.perf_counter() - started
    found = {}
    for index, (y, x) in enumerate(aligner.positions):
        row, col = reader.metadata.tile_rc(index)
        found[f"tile_r{row:03d}_c{col:03d}.jpg"] = (float(x), float(y))
    return {**errors_against_truth(found, truth), "tiles_per_s": len(found) / elapsed}


def sub_slide(scan: Path, rows: int, cols: int, dest: Path) -> Path:
    """The top-left rows x cols tiles of a written slide (images linked, not copied)."""
    dest.mkdir(parents=True, exist_ok=True)
    truth = json.loads((scan / TRUTH_FILE).read_text())
    lines = (scan / "positions.csv").read_text().splitlines()
    kept = [lines[0]]
    for line in lines[1:]:
        name, row, col = line.split(",")[:3]
        if int(row) < rows and int(col) < cols:
            kept.append(line)
            (dest / name).symlink_to(scan / name)
    names = {line.split(",")[0] for line in kept[1:]}
    (dest / "positions.csv").write_text("\n".join(kept) + "\n")
    shutil.copy(scan / "scan.json", dest / "scan.json")
    (dest / TRUTH_FILE).write_text(json.dumps({
        **truth, "rows": rows, "cols": cols,
        "true_px": {k: v for k, v in truth["true_px"].items() if k in names},
        "stage_px": {k: v for k, v in truth["stage_px"].items() if k in names},
    }))
    return dest


RUNNERS = {"medge": run_medge, "opencv": run_opencv, "ashlar": run_ashlar}


def worker(method: str, scan: Path, work: Path, result: Path, timeout_s: int) -> None:
    def give_up(signum: int, frame: object) -> None:
        raise TimeoutError(f"no result within {timeout_s} s")

    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(timeout_s)
    try:
        outcome = RUNNERS[method](scan, work)
    except Exception as error:  # a peer failing is a result to report, not a crash
        outcome = {"error": f"{type(error).__name__}: {error}"[:200]}
    result.write_text(json.dumps(outcome))


def measure(method: str, scan: Path, timeout_s: int) -> dict[str, Any]:
    """Run one method in a child process; add its peak RSS."""
    with tempfile.TemporaryDirectory(prefix=f"stitch-{method}-", dir=scan.parent) as scratch:
        result = Path(scratch) / "result.json"
        process = subprocess.Popen([
            sys.executable, "-m", "bench.stitch", "--worker", method, "--scan", str(scan),
            "--work", scratch, "--result", str(result), "--timeout", str(timeout_s),
        ])
        # SIGALRM in the worker cannot interrupt a long C++ call (OpenCV), so also watch here.
        deadline = time.monotonic() + timeout_s + 30
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
            time.sleep(1.0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode == -signal.SIGKILL and not result.exists():
            result.write_text(json.dumps({"error": f"no result within {timeout_s} s (killed)"}))
        outcome: dict[str, Any] = (json.loads(result.read_text()) if result.exists()
                                   else {"error": f"exit {process.returncode}"})
        outcome["peak_rss_mib"] = usage.ru_maxrss / 1024
    return outcome


def table(spec: ScanSpec, results: dict[str, dict[str, Any]]) -> str:
    n = spec.rows * spec.cols - len(spec.skip)
    lines = [
        f"slide: {spec.rows} x {spec.cols} tiles of {spec.tile_width} x {spec.tile_height} px, "
        f"{spec.overlap:.0%} overlap, jitter sd {spec.jitter_px} px, backlash "
        f"{spec.backlash_px} px ({n} tiles)",
        "| method | tiles/s (reg+place) | mean err px | max err px | tiles dropped | peak RSS MiB "
        "| notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        if "error" in r:
            lines.append(f"| {method} | - | - | - | - | {r['peak_rss_mib']:.0f} | {r['error']} |")
            continue
        notes = r.get("note", "")
        if method == "medge":
            t = r["timings"]
            notes = (f"flagged {r['flagged']}, rejected pairs {r['rejected_pairs']}, NCC thr "
                     f"{r['threshold']:.2f}; register {t['register']:.1f} s, place "
                     f"{t['place']:.2f} s, compose {t['compose']:.1f} s, pyramid "
                     f"{t['pyramid']:.1f} s; whole build {r['pipeline_tiles_per_s']:.1f} tiles/s; "
                     f"base {r['size'][0]} x {r['size'][1]} px")
        lines.append(
            f"| {method} | {r['tiles_per_s']:.1f} | {r['mean_px']:.3f} | {r['max_px']:.3f} | "
            f"{r['dropped']} | {r['peak_rss_mib']:.0f} | {notes} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--cols", type=int, default=20)
    parser.add_argument("--tile", default="1280x960")
    parser.add_argument("--overlap", type=float, default=0.12)
    parser.add_argument("--large", action="store_true",
                        help="a 60,000 x 60,000 px slide, medge only")
    parser.add_argument("--methods", default="medge,opencv,ashlar")
    parser.add_argument("--timeout", type=int, default=900, help="per method, seconds")
    parser.add_argument("--keep", type=Path, help="write the slide here and keep it")
    parser.add_argument("--scaling", action="store_true",
                        help="medge on growing sub-grids of the slide: does peak RSS grow?")
    parser.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--scan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.scan, args.work, args.result, args.timeout)
        return
    width, height = (int(v) for v in args.tile.split("x"))
    rows, cols, methods = args.rows, args.cols, args.methods.split(",")
    if args.large:
        rows = math.ceil((60_000 - height) / (height * (1 - args.overlap))) + 1
        cols = math.ceil((60_000 - width) / (width * (1 - args.overlap))) + 1
        methods = ["medge"]
    spec = ScanSpec(rows=rows, cols=cols, tile_width=width, tile_height=height,
                    overlap=args.overlap, jitter_px=3.0, backlash_px=(8.0, 3.0),
                    image_format=".jpg", origin_px=(0.0, 0.0), seed=20261122)
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-stitch-"))
    scan = base / "tiles"
    try:
        if not (scan / TRUTH_FILE).exists():
            started = time.perf_counter()
            # The large slide repeats a 4096 px texture: rendering 3,600 tiles stays cheap.
            make_slide(scan, spec, workers=2, period=4096 if args.large else None)
            print(f"slide written in {time.perf_counter() - started:.0f} s", flush=True)
        if args.scaling:
            for size in sorted({max(2, rows // 4), max(2, rows // 2), rows}):
                part = sub_slide(scan, size, size * cols // rows, base / f"sub{size}")
                r = measure("medge", part, args.timeout)
                print(f"| {size} x {size * cols // rows} | {r.get('size')} | "
                      f"{r['peak_rss_mib']:.0f} MiB | {r.get('pipeline_tiles_per_s', 0):.1f} |",
                      flush=True)
                shutil.rmtree(part)
            return
        results = {}
        for method in methods:
            results[method] = measure(method, scan, args.timeout)
            print(f"{method}: {json.dumps(results[method])}", flush=True)
        print(table(spec, results))
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
