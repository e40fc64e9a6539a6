"""``medge wsi``: offline whole-slide commands.

``build TILES_DIR --out DIR`` stitches the tiles into a pyramid and writes the DICOM WSI series;
``validate DIR`` runs the validators (dciodvfy, dcentvfy, OpenSlide 4, frame checks);
``send DIR --to NAME --config PATH`` queues the series in the durable PACS spool and delivers it
with a progress bar. See docs/dicom-wsi.md and docs/pacs.md.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from medge.config import ConfigError, load
from medge.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE

if TYPE_CHECKING:  # imported lazily: pydicom/pynetdicom cost ~0.3 s on every `medge` call
    from medge.pacs.base import PacsError
    from medge.pacs.delivery import Progress, SpoolDelivery
    from medge.pacs.spool import SpoolJob

BAR_WIDTH = 30


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("wsi", help="whole-slide images: build, validate, send to PACS")
    commands = parser.add_subparsers(dest="wsi_command", metavar="COMMAND", required=True)

    build = commands.add_parser("build", help="stitch tiles into a DICOM WSI series")
    build.add_argument("tiles_dir", type=Path, metavar="TILES_DIR",
                       help="folder of tile images and their positions file")
    build.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="folder for the DICOM instances (created)")
    build.add_argument("--patient-id", default="ANONYMOUS", help="pseudonymous patient id")
    build.add_argument("--patient-name", default="")
    build.add_argument("--accession", default="", help="accession number of the order")
    build.add_argument("--barcode", default=None, help="slide barcode (default: TILES_DIR name)")
    build.add_argument("--label-text", default="")
    build.add_argument("--stain", default="HE", help="HE, H or E (coded in the specimen module)")
    build.add_argument("--quality", type=int, default=90, choices=range(1, 101), metavar="1..100",
                       help="JPEG quality (default 90)")
    build.add_argument("--lossless", action="store_true",
                       help="uncompressed Explicit VR Little Endian instead of JPEG")
    build.set_defaults(func=run_build)

    validate = commands.add_parser("validate", help="check a written series with the validators")
    validate.add_argument("directory", type=Path, metavar="DIR")
    validate.add_argument("--no-openslide", action="store_true",
                          help="skip the OpenSlide 4 read-back")
    validate.set_defaults(func=run_validate)

    send = commands.add_parser("send", help="queue a series and deliver it to a PACS")
    send.add_argument("directory", type=Path, metavar="DIR")
    send.add_argument("--to", required=True, metavar="NAME", help="destination in the config")
    send.add_argument("--config", type=Path, required=True, metavar="PATH",
                      help="PACS config TOML (see config/orthanc/pacs.example.toml)")
    send.add_argument("--timeout", type=float, default=600.0, metavar="S",
                      help="give up after S seconds; the series stays queued (default 600)")
    send.set_defaults(func=run_send)


def _fail(message: str, status: int = EXIT_FAILURE) -> int:
    print(f"medge wsi: {message}", file=sys.stderr)
    return status


def run_build(args: argparse.Namespace) -> int:
    from daemons.microscope.wsi.dicom_writer import DicomWriteError, WriterOptions, write_series
    from daemons.microscope.wsi.model import SlideMetadata

    if not args.tiles_dir.is_dir():
        return _fail(f"{args.tiles_dir}: not a directory", EXIT_USAGE)
    from daemons.microscope.wsi.pipeline import build_pyramid
    from daemons.microscope.wsi.scanfolder import ScanFolderError

    metadata = SlideMetadata(
        patient_id=args.patient_id, patient_name=args.patient_name,
        accession_number=args.accession, barcode=args.barcode or args.tiles_dir.name,
        label_text=args.label_text, stain=args.stain,
    )
    options = WriterOptions(compression="none" if args.lossless else "jpeg",
                            jpeg_quality=args.quality)
    work_dir = args.out / ".work"
    started = time.monotonic()
    try:
        built = build_pyramid(args.tiles_dir, work_dir)
        written = write_series(built.levels, metadata, args.out, options)
    except ScanFolderError as exc:
        return _fail(f"{exc}", EXIT_USAGE)
    except (DicomWriteError, OSError, ValueError) as exc:
        return _fail(f"build failed: {exc}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    for instance in written.instances:
        print(f"{instance.path}  {instance.kind}  {instance.frames} frame(s)"
              f"  {instance.pixel_bytes / 1e6:.1f} MB")
    print(f"series {written.series_instance_uid}: {len(written.instances)} instances"
          f" in {time.monotonic() - started:.1f} s")
    return EXIT_OK


def run_validate(args: argparse.Namespace) -> int:
    from daemons.microscope.wsi.dicom_validate import ValidatorMissing, validate_series

    try:
        report = validate_series(args.directory, openslide=not args.no_openslide)
    except FileNotFoundError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ValidatorMissing as exc:
        return _fail(f"{exc}; run `make setup`")
    for finding in report.findings:
        level = "error" if finding.fatal else "warning"
        print(f"{level}: {finding.file}: [{finding.check}] {finding.message}")
    verdict = "ok" if report.ok else f"FAILED ({len(report.errors)} error(s))"
    print(f"{args.directory}: {len(report.files)} instance(s) checked: {verdict}")
    return EXIT_OK if report.ok else EXIT_FAILURE


class ProgressBar:
    """One self-rewriting line on a terminal, one line per step otherwise (logs, CI)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.interactive = stream.isatty()

    def update(self, progress: Progress) -> None:
        filled = BAR_WIDTH * progress.confirmed // max(progress.total, 1)
        line = (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
                f"{progress.confirmed}/{progress.total} instances confirmed")
        if self.interactive:
            end = "\n" if progress.confirmed == progress.total else ""
            self.stream.write(f"\r{line}{end}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def failure(self, job: SpoolJob, error: PacsError) -> None:
        if self.interactive:
            self.stream.write("\n")
        retry_in = max(0.0, job.next_attempt_at - time.time())
        from medge.pacs.base import PermanentPacsError

        note = "" if isinstance(error, PermanentPacsError) else f" (retrying in {retry_in:.0f} s)"
        self.stream.write(f"{error}{note}\n")
        self.stream.flush()


def run_send(args: argparse.Namespace) -> int:
    from medge.pacs.base import PermanentPacsError
    from medge.pacs.config import PacsConfig
    from medge.pacs.delivery import SpoolDelivery
    from medge.pacs.spool import Spool, SpoolError

    try:
        config = load(args.config, PacsConfig)
        destination = config.destination(args.to)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except KeyError as exc:
        return _fail(str(exc.args[0]), EXIT_USAGE)
    files = sorted(args.directory.glob("*.dcm")) if args.directory.is_dir() else []
    if not files:
        return _fail(f"{args.directory}: no *.dcm files to send", EXIT_USAGE)
    spool = Spool(config.spool_dir)
    try:
        jobs = spool.enqueue(files, args.to)
    except SpoolError as exc:
        return _fail(str(exc))
    bar = ProgressBar(sys.stdout)
    delivery = SpoolDelivery(spool, {args.to: destination}, config.retry,
                             on_progress=bar.update, on_failure=bar.failure)
    try:
        asyncio.run(_deliver_all(delivery, jobs, args.timeout))
    except PermanentPacsError as exc:
        return _fail(f"delivery failed permanently: {exc}; the series is kept in"
                     f" {config.spool_dir}")
    except TimeoutError:
        return _fail(f"not delivered within {args.timeout:.0f} s; the series stays queued in"
                     f" {config.spool_dir} and is resent by the next send or the daemon",
                     EXIT_TIMEOUT)
    print(f"delivered {sum(len(job.entries) for job in jobs)} instance(s) to {args.to}")
    return EXIT_OK


async def _deliver_all(delivery: SpoolDelivery, jobs: list[SpoolJob], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        for job in jobs:
            await delivery.deliver(job)
