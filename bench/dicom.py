"""DICOM WSI writing throughput: medge's writer against wsidicomizer converting the same pyramid.

    .venv/bin/python -m bench.dicom [--size 4096x3072] [--tile 256] [--quality 90]

medge encodes every tile of a synthetic pyramid (JPEG q90 4:2:2, and the lossless variant) and
writes the series. wsidicomizer is not a project dependency (it pins wsidicom/opentile versions
that conflict): it runs from its own venv, ``.venv/wsidicomizer`` by default (override with
WSIDICOMIZER_VENV), set up with::

    python3 -m venv .venv/wsidicomizer
    .venv/wsidicomizer/bin/pip install wsidicomizer tifffile imagecodecs \
        openslide-bin openslide-python

It converts the same pyramid, first written as a JPEG-tiled TIFF (one page per level, made in
that venv with tifffile, not timed). OpenSlide reads only the base page, so
``--add-missing-levels`` makes wsidicomizer build the lower levels itself; it decodes through
OpenSlide and re-encodes each tile (``--source openslide --format jpeg``): the same encode work
plus a decode, with its default worker threads and chroma subsampling (its ``--subsampling``
option fails in 0.26.1). Its wall time includes start-up, measured separately (``--help``) and
also subtracted in a second ratio. dciodvfy errors are counted for both outputs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from daemons.microscope.wsi.dicom_validate import run_dciodvfy
from daemons.microscope.wsi.dicom_writer import WriterOptions, write_series
from daemons.microscope.wsi.model import RgbImage, SlideMetadata
from tests.fixtures.wsi_pyramid import ArrayLevel, pyramid, synthetic_slide

REPO = Path(__file__).resolve().parents[1]
WSIDICOMIZER_VENV = Path(os.environ.get("WSIDICOMIZER_VENV", REPO / ".venv" / "wsidicomizer"))
TIFF_WRITER = """
import sys, numpy as np, tifffile
names = sys.argv[2:]
with tifffile.TiffWriter(sys.argv[1], bigtiff=True) as tif:
    for name in names:
        tif.write(np.load(name), tile=(TILE, TILE), compression="jpeg",
                  compressionargs={"level": QUALITY}, photometric="rgb",
                  resolution=(1e4 / SPACING, 1e4 / SPACING), resolutionunit="CENTIMETER")
"""


@dataclass
class Row:
    writer: str
    seconds: float | None
    frames: int
    megabytes: float
    dciodvfy_errors: int | None
    note: str = ""
    startup_s: float = 0.0

    @property
    def frames_per_s(self) -> float | None:
        return self.frames / self.seconds if self.seconds else None

    @property
    def mb_per_s(self) -> float | None:
        return self.megabytes / self.seconds if self.seconds else None


def textured_slide(width: int, height: int) -> RgbImage:
    """Gradients and blobs plus fine grain, so that JPEG frames are tissue-sized (~15 kB per
    256 px tile at q90) rather than the few hundred bytes of a smooth image."""
    rng = np.random.default_rng(1)
    grain = cv2.GaussianBlur(rng.normal(0, 18, (height, width, 3)).astype(np.float32), (0, 0), 0.8)
    base = synthetic_slide(width, height, seed=1).astype(np.float32)
    return np.asarray(np.clip(base + grain, 0, 255), dtype=np.uint8)


def _dicom_errors(directory: Path) -> int:
    return sum(1 for path in directory.rglob("*.dcm") for f in run_dciodvfy(path) if f.fatal)


def _dicom_volume(directory: Path) -> tuple[int, float]:
    """(frames, MB on disk) of the VOLUME instances under ``directory``."""
    from pydicom import dcmread

    frames, size = 0, 0
    for path in directory.rglob("*.dcm"):
        ds = dcmread(path, stop_before_pixels=True)
        if ds.ImageType[2] == "VOLUME":
            frames += int(ds.get("NumberOfFrames", 1))
            size += path.stat().st_size
    return frames, size / 1e6


def bench_medge(levels: list[ArrayLevel], out: Path, options: WriterOptions, name: str) -> Row:
    metadata = SlideMetadata(patient_id="BENCH", accession_number="BENCH", barcode="BENCH-1")
    started = time.perf_counter()
    written = write_series(levels, metadata, out, options)
    seconds = time.perf_counter() - started
    volumes = [i for i in written.instances if i.kind.startswith("level-")]
    megabytes = sum(i.path.stat().st_size for i in volumes) / 1e6
    return Row(name, seconds, sum(i.frames for i in volumes), megabytes, _dicom_errors(out),
               "levels + label + overview, encode from pixels")


def bench_wsidicomizer(levels: list[ArrayLevel], work: Path, tile: int, quality: int) -> Row:
    python = WSIDICOMIZER_VENV / "bin" / "python"
    executable = WSIDICOMIZER_VENV / "bin" / "wsidicomizer"
    if not executable.exists():
        return Row("wsidicomizer", None, 0, 0.0, None,
                   f"not installed in {WSIDICOMIZER_VENV} (see module docstring)")
    arrays = []
    for number, level in enumerate(levels):
        arrays.append(work / f"level{number}.npy")
        np.save(arrays[-1], level.image)
    tiff = work / "slide.tiff"
    script = (TIFF_WRITER.replace("TILE", str(tile)).replace("QUALITY", str(quality))
              .replace("SPACING", str(levels[0].pixel_spacing_um)))
    subprocess.run([str(python), "-c", script, str(tiff), *map(str, arrays)], check=True)
    out = work / "wsidicomizer-out"
    command = [str(executable), "-i", str(tiff), "-o", str(out), "-t", str(tile),
               "--source", "openslide", "--format", "jpeg", "--quality", str(quality),
               "--offset-table", "basic", "--add-missing-levels", "--no-label", "--no-overview"]
    started = time.perf_counter()
    subprocess.run([str(executable), "--help"], capture_output=True, check=False)
    startup = time.perf_counter() - started
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return Row("wsidicomizer", None, 0, 0.0, None,
                   f"failed ({done.returncode}): {(done.stderr or done.stdout)[-200:]!r}")
    frames, megabytes = _dicom_volume(out)
    return Row("wsidicomizer", seconds, frames, megabytes, _dicom_errors(out),
               f"TIFF via OpenSlide, decode + re-encode; incl. {startup:.2f} s start-up",
               startup)


def _cell(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dicom", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="4096x3072", help="base level WxH (default 4096x3072)")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    levels = pyramid(textured_slide(width, height), tile_size=args.tile)
    work = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    try:
        rows = [
            bench_medge(levels, work / "medge-jpeg", WriterOptions(jpeg_quality=args.quality),
                        f"medge (JPEG q{args.quality})"),
            bench_medge(levels, work / "medge-raw", WriterOptions(compression="none"),
                        "medge (lossless)"),
            bench_wsidicomizer(levels, work, args.tile, args.quality),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"DICOM WSI writing: {width}x{height} base, {len(levels)} levels, tiles {args.tile},"
          f" Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{'writer':<20} {'s':>7} {'frames':>7} {'frames/s':>9} {'MB':>8} {'MB/s':>7}"
          f" {'dciodvfy err':>12}  note")
    for row in rows:
        errors = "n/a" if row.dciodvfy_errors is None else str(row.dciodvfy_errors)
        print(f"{row.writer:<20} {_cell(row.seconds, 2):>7} {row.frames:>7}"
              f" {_cell(row.frames_per_s):>9} {row.megabytes:>8.1f} {_cell(row.mb_per_s):>7}"
              f" {errors:>12}  {row.note}")
    medge, other = rows[0], rows[2]
    if medge.frames_per_s and other.frames_per_s:
        ratio = medge.frames_per_s / other.frames_per_s
        assert other.seconds is not None
        net = medge.frames_per_s / (other.frames / (other.seconds - other.startup_s))
        print(f"ratio medge/wsidicomizer (frames/s, JPEG): {ratio:.2f}"
              f" ({net:.2f} without wsidicomizer's start-up)")
    else:
        print("ratio medge/wsidicomizer: n/a (wsidicomizer did not run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
