"""The lab technician's commands: ``medge scan …``, ``medge stage …``, ``medge camera …``.

They talk to the microscope daemon over the broker (MQTT 5 request/response on
``…/microscope/cmd``), so they work from any workstation that reaches the broker and every
technician sees the same queue. docs/microscope.md documents requests, replies and exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import sys
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from medge.config import ConfigError, load
from medge.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_TIMEOUT, EXIT_UNAVAILABLE, EXIT_USAGE
from medge.mqtt import tls_context
from medge.settings import DaemonConfig
from medge.topics import Topics

DAEMON = "microscope"
DEFAULT_CONFIG = os.environ.get("MEDGE_MICROSCOPE_CONFIG", "/etc/medge/microscope.toml")
FINISHED = ("done", "failed", "cancelled")
BAR_WIDTH = 30
T = TypeVar("T")


@dataclass(frozen=True)
class ScannerNodeConfig(DaemonConfig):
    """The daemon's config as a client reads it: broker and node; the scanner part unread."""

    microscope: dict[str, Any] = field(default_factory=dict)


class CliError(Exception):
    """One sentence for the technician and the exit status that goes with it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ScannerClient:
    """Request/response with the daemon: a private reply topic, one correlation id per call."""

    def __init__(self, cfg: DaemonConfig, timeout: float) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self.topics = Topics(cfg.node.site, cfg.node.node)
        self.client_id = f"medge-cli-{uuid.uuid4().hex[:12]}"
        self.reply_topic = self.topics.topic(self.client_id, "reply")
        self.request_topic = self.topics.topic(DAEMON, "cmd")
        self.state_topic = self.topics.topic(DAEMON, "state")
        self._pending: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self.states: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lost: CliError | None = None
        """Set when the broker connection is lost: every later call fails with it."""

    async def __aenter__(self) -> ScannerClient:
        mqtt = self.cfg.mqtt
        password = mqtt.password_file.value if mqtt.password_file else None
        client = aiomqtt.Client(mqtt.host, mqtt.port, identifier=self.client_id,
                                protocol=aiomqtt.ProtocolVersion.V5, username=mqtt.username,
                                password=password, tls_context=tls_context(mqtt),
                                timeout=min(self.timeout, mqtt.connect_timeout))
        try:
            await client.__aenter__()
        except (aiomqtt.MqttError, OSError) as exc:
            raise CliError(f"cannot reach the MQTT broker at {mqtt.host}:{mqtt.port} ({exc}); "
                           "check the broker is running and [mqtt] in the config",
                           EXIT_UNAVAILABLE) from None
        self._client = client
        await client.subscribe(self.reply_topic, qos=1)
        self._reader = asyncio.create_task(self._read(client), name="scan-cli-reader")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def _read(self, client: aiomqtt.Client) -> None:
        """Route replies and states; a lost broker connection ends it, which ends whatever
        waits (:meth:`_while_connected`): a request in flight at once, not at its timeout, and
        ``next_state`` instead of hanging."""
        try:
            async for message in client.messages:
                try:
                    body = json.loads(bytes(message.payload))
                except (TypeError, ValueError):
                    continue
                if message.topic.matches(self.state_topic):
                    await self.states.put(body)
                    continue
                correlation = getattr(message.properties, "CorrelationData", None)
                future = self._pending.get(bytes(correlation)) if correlation else None
                if future is not None and not future.done() and isinstance(body, dict):
                    future.set_result(body)
        except aiomqtt.MqttError as exc:
            self._lost = self._broker_lost(exc)

    def _broker_lost(self, error: Exception) -> CliError:
        mqtt = self.cfg.mqtt
        return CliError(f"lost the connection to the MQTT broker at {mqtt.host}:{mqtt.port} "
                        f"({error}); the daemon carries on with its jobs: see `medge scan "
                        "status` once the broker is back", EXIT_UNAVAILABLE)

    async def next_state(self) -> dict[str, Any]:
        """The next state message (after :meth:`follow`); CliError if the broker connection is
        lost meanwhile."""
        return await self._while_connected(self.states.get())

    async def _while_connected(self, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result, or the broker-lost CliError as soon as the reader ends."""
        assert self._reader is not None
        task = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({task, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await task
        if not task.cancelled():
            return task.result()
        raise self._lost or self._broker_lost(RuntimeError("the reader stopped"))

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """The daemon's reply; CliError when it refuses, or does not answer in time."""
        assert self._client is not None
        if self._lost is not None:
            raise self._lost
        correlation = str(next(self._ids)).encode()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ResponseTopic = self.reply_topic
        properties.CorrelationData = correlation
        properties.MessageExpiryInterval = max(1, round(self.timeout))
        try:
            async with asyncio.timeout(self.timeout):
                # a QoS 1 publish waits for its PUBACK, which a lost connection never brings
                await self._while_connected(self._client.publish(
                    self.request_topic, json.dumps({"op": op, **args}), qos=1,
                    properties=properties))
                reply = await self._while_connected(future)
        except aiomqtt.MqttError as exc:  # the publish, on a connection already lost
            raise self._broker_lost(exc) from None
        except TimeoutError:
            raise CliError(
                f"the microscope daemon on {self.topics.node} did not answer within "
                f"{self.timeout:.0f} s: is it running? Start it with `medge run microscope "
                "--config PATH` (or `systemctl start medge-microscope`)", EXIT_UNAVAILABLE
            ) from None
        finally:
            self._pending.pop(correlation, None)
        if not reply.get("ok"):
            kind = reply.get("kind")
            status = EXIT_USAGE if kind == "invalid" else EXIT_FAILURE
            raise CliError(str(reply.get("error", "the daemon refused the request")), status)
        return reply

    async def wait_online(self, timeout: float) -> None:
        """Wait for the daemon's retained birth message (scripts that start it just before)."""
        assert self._client is not None
        status_topic = self.topics.topic(DAEMON, "status")
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            with contextlib.suppress(CliError):
                await self.request("list")
                return
            if asyncio.get_running_loop().time() > deadline:
                raise CliError(f"the microscope daemon did not come up within {timeout:.0f} s "
                               f"(nothing answers on {status_topic.rsplit('/', 1)[0]}/cmd)",
                               EXIT_UNAVAILABLE)

    async def follow(self) -> None:
        assert self._client is not None
        await self._client.subscribe(self.state_topic, qos=1)


# -- output ------------------------------------------------------------------------------------


class ProgressView:
    """A rewriting line per phase on a terminal; one line per change otherwise; JSON lines."""

    def __init__(self, stream: TextIO, as_json: bool) -> None:
        self.stream = stream
        self.as_json = as_json
        self.interactive = stream.isatty() and not as_json
        self._last: tuple[str, str, int] | None = None

    def show(self, state: dict[str, Any]) -> None:
        if self.as_json:
            self.stream.write(json.dumps(state) + "\n")
            self.stream.flush()
            return
        key = (state.get("status", ""), state.get("phase", ""), int(state.get("tiles_done", 0)))
        if key == self._last:
            return
        phase_changed = self._last is None or self._last[:2] != key[:2]
        self._last = key
        line = progress_line(state)
        if self.interactive:
            self.stream.write(("\n" if phase_changed and self._last else "") + "\r\033[K" + line)
            if state.get("status") in FINISHED:
                self.stream.write("\n")
        elif phase_changed or state.get("status") in FINISHED or key[2] % 10 == 0:
            self.stream.write(line + "\n")
        self.stream.flush()


def progress_line(state: dict[str, Any]) -> str:
    done, total = int(state.get("tiles_done", 0)), int(state.get("tiles_total", 0))
    line = f"{state.get('job')}  {state.get('status'):<9} {state.get('phase') or '-':<8}"
    if total:
        filled = BAR_WIDTH * done // total
        line += f" [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} tiles"
    if state.get("rate_tiles_s"):
        line += f"  {state['rate_tiles_s']:.2f} tiles/s"
    if state.get("eta_s") is not None:
        line += f"  ETA {state['eta_s']:.0f} s"
    if state.get("status") in FINISHED and state.get("message"):
        line += f"  — {state['message']}"
    return line


def emit(args: argparse.Namespace, body: Any, text: str) -> None:
    print(json.dumps(body) if args.json else text)


# -- commands ----------------------------------------------------------------------------------


async def _watch(client: ScannerClient, job_id: str, view: ProgressView,
                 timeout: float | None) -> dict[str, Any]:
    """Show progress until the job finishes; the retained state gives the current phase at once,
    a status request covers a job whose last state was published before we subscribed."""
    await client.follow()
    current: dict[str, Any] = (await client.request("status", job=job_id))["job"]
    view.show(current)
    async with asyncio.timeout(timeout):
        while current.get("status") not in FINISHED:
            state = await client.next_state()
            if state.get("job") == job_id and state.get("at", 0) >= current.get("at", 0):
                current = state
                view.show(current)
    return current


def _finished_status(state: dict[str, Any]) -> int:
    return EXIT_OK if state.get("status") == "done" else EXIT_FAILURE


async def scan_start(client: ScannerClient, args: argparse.Namespace) -> int:
    job: dict[str, Any] = {"barcode": args.barcode, "accession": args.accession,
                           "patient": args.patient, "stain": args.stain,
                           "objective": args.objective, "jpeg_quality": args.quality}
    if args.area is not None:
        job["area_mm"] = args.area
    if args.pacs:
        job["pacs"] = args.pacs
    if args.folder:
        job["folder"] = args.folder
    if args.dry_run:
        plan = (await client.request("submit", job=job, dry_run=True))["dry_run"]
        area = plan.get("area_mm")
        where = "-" if area is None else ", ".join(f"{v:.2f}" for v in area)
        emit(args, plan, f"tiles: {plan['tiles']} ({plan['columns']} columns x {plan['rows']}"
             f" rows, serpentine) over [{where}] mm\nestimated time: {plan['estimate_s']:.0f} s"
             f"\ndisk space needed: {plan['disk_mb']:.0f} MB\nnothing has moved.")
        return EXIT_OK
    if args.wait_for_daemon:
        await client.wait_online(args.wait_for_daemon)
    state = (await client.request("submit", job=job))["job"]
    if not args.wait:
        emit(args, state, f"queued job {state['job']}: follow it with `medge scan status "
                          f"{state['job']} --follow`")
        return EXIT_OK
    final = await _watch(client, state["job"], ProgressView(sys.stdout, args.json), args.deadline)
    return _finished_status(final)


async def scan_status(client: ScannerClient, args: argparse.Namespace) -> int:
    if args.follow:
        job = args.job or ((await client.request("status"))["job"] or {}).get("job")
        if job is None:
            raise CliError("no scan job is known to the daemon", EXIT_FAILURE)
        final = await _watch(client, job, ProgressView(sys.stdout, args.json), args.deadline)
        return _finished_status(final)
    state = (await client.request("status", **({"job": args.job} if args.job else {})))["job"]
    if state is None:
        emit(args, None, "no scan jobs yet")
        return EXIT_OK
    emit(args, state, progress_line(state) + (f"\n{state['message']}" if state["message"] and
                                              state["status"] not in FINISHED else ""))
    return EXIT_OK


async def scan_list(client: ScannerClient, args: argparse.Namespace) -> int:
    jobs = (await client.request("list"))["jobs"]
    lines = [f"{'JOB':<22} {'STATUS':<9} {'PHASE':<8} {'TILES':>11} {'BARCODE':<16} DELIVERY"]
    lines += [f"{j['job']:<22} {j['status']:<9} {j['phase'] or '-':<8} "
              f"{j['tiles_done']:>5}/{j['tiles_total']:<5} {j['barcode']:<16} "
              f"{j['delivery'] or '-'}" for j in jobs]
    emit(args, jobs, "\n".join(lines) if jobs else "no scan jobs yet")
    return EXIT_OK


async def scan_cancel(client: ScannerClient, args: argparse.Namespace) -> int:
    reply = await client.request("cancel", job=args.job)
    emit(args, reply["job"], f"job {args.job}: {reply.get('note', reply['job']['status'])}")
    return EXIT_OK


async def scan_resume(client: ScannerClient, args: argparse.Namespace) -> int:
    state = (await client.request("resume", job=args.job))["job"]
    emit(args, state, f"job {args.job} queued again; it continues from its first missing tile")
    return EXIT_OK


async def scan_report(client: ScannerClient, args: argparse.Namespace) -> int:
    from daemons.microscope.report import render

    report = (await client.request("report", job=args.job))["report"]
    emit(args, report, render(report))
    return EXIT_OK if report.get("validation", {}).get("ok") is not False else EXIT_FAILURE


async def stage_home(client: ScannerClient, args: argparse.Namespace) -> int:
    return _where(args, await client.request("stage.home"))


async def stage_jog(client: ScannerClient, args: argparse.Namespace) -> int:
    return _where(args, await client.request("stage.jog", dx=args.dx, dy=args.dy, dz=args.dz))


async def stage_where(client: ScannerClient, args: argparse.Namespace) -> int:
    return _where(args, await client.request("stage.where"))


def _where(args: argparse.Namespace, reply: dict[str, Any]) -> int:
    x, y, z = reply["stage_um"]
    note = "  POSITION LOST: run `medge stage home`" if reply["position_lost"] else ""
    alarm = f"  alarm: {reply['alarm']}" if reply.get("alarm") else ""
    emit(args, reply, f"stage x {x:.1f} y {y:.1f} z {z:.1f} µm (slide {reply['slide_mm'][0]:.3f},"
                      f" {reply['slide_mm'][1]:.3f} mm){note}{alarm}")
    return EXIT_OK


async def camera_list(client: ScannerClient, args: argparse.Namespace) -> int:
    cameras = (await client.request("camera.list"))["cameras"]
    lines = [f"{c.get('role', 'usb'):<9} {c['name']:<24} "
             + (f"{c['resolution'][0]}x{c['resolution'][1]}" if "resolution" in c
                else f"{c['usb_id']} {' '.join(c['video']) or '(no video node)'}")
             for c in cameras]
    emit(args, cameras, "\n".join(lines))
    return EXIT_OK


async def camera_snapshot(client: ScannerClient, args: argparse.Namespace) -> int:
    reply = await client.request("camera.snapshot", overview=args.overview)
    data = base64.b64decode(reply["png_base64"])
    try:
        args.file.write_bytes(data)
    except OSError as exc:
        raise CliError(f"{args.file}: cannot write the snapshot: {exc}", EXIT_FAILURE) from None
    emit(args, {"file": str(args.file), "width": reply["width"], "height": reply["height"]},
         f"{args.file}: {reply['width']}x{reply['height']} PNG")
    return EXIT_OK


# -- argument parsing --------------------------------------------------------------------------


def _area(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected X0,Y0,X1,Y1 in mm") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: expected four numbers X0,Y0,X1,Y1 in mm")
    return values


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                        help="the microscope daemon's config: broker and node "
                             f"(default {DEFAULT_CONFIG}, or $MEDGE_MICROSCOPE_CONFIG)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="how long to wait for the daemon's answer (default 10)")
    parser.add_argument("--json", action="store_true", help="machine output (JSON / JSON lines)")


def register(subparsers: Any) -> None:
    scan = subparsers.add_parser("scan", help="slide scan jobs on the microscope daemon")
    commands = scan.add_subparsers(dest="scan_command", metavar="COMMAND", required=True)
    start = commands.add_parser("start", help="queue a slide scan")
    start.add_argument("--barcode", required=True, help="slide barcode / ID")
    start.add_argument("--accession", required=True, help="accession number of the order")
    start.add_argument("--patient", required=True, help="pseudonymous patient ID")
    start.add_argument("--stain", default="HE", help="HE, H or E (default HE)")
    start.add_argument("--objective", required=True, help="calibrated objective, e.g. 20x")
    start.add_argument("--area", type=_area, metavar="X0,Y0,X1,Y1",
                       help="scan area on the slide in mm (default: the detected tissue)")
    start.add_argument("--pacs", default="", metavar="NAME", help="PACS destination")
    start.add_argument("--folder", default="", metavar="DIR",
                       help="absolute folder on the scanner that gets a copy of the DICOM files")
    start.add_argument("--quality", type=int, default=90, metavar="1..100",
                       help="JPEG quality (default 90)")
    start.add_argument("--dry-run", action="store_true",
                       help="show the tile plan, time and disk estimate; move nothing")
    start.add_argument("--wait", action="store_true", help="follow progress until it ends")
    start.add_argument("--deadline", type=float, default=None, metavar="S",
                       help="with --wait: give up waiting after S seconds (exit 4)")
    start.add_argument("--wait-for-daemon", type=float, default=0.0, metavar="S",
                       help="retry for up to S seconds while the daemon is starting")
    start.set_defaults(func=_runner(scan_start))
    status = commands.add_parser("status", help="a job's state (default: the active job)")
    status.add_argument("job", nargs="?", metavar="JOB")
    status.add_argument("--follow", action="store_true", help="live progress until it ends")
    status.add_argument("--deadline", type=float, default=None, metavar="S")
    status.set_defaults(func=_runner(scan_status))
    commands.add_parser("list", help="the queue and the newest finished jobs "
                        "([microscope] recent_jobs; older ones by id)").set_defaults(
        func=_runner(scan_list))
    for name, function, text in (("cancel", scan_cancel, "stop a job (tiles are kept)"),
                                 ("resume", scan_resume, "continue a failed or cancelled job"),
                                 ("report", scan_report, "a finished job's report")):
        command = commands.add_parser(name, help=text)
        command.add_argument("job", metavar="JOB")
        command.set_defaults(func=_runner(function))

    stage = subparsers.add_parser("stage", help="the scanner stage")
    stage_commands = stage.add_subparsers(dest="stage_command", metavar="COMMAND", required=True)
    stage_commands.add_parser("home", help="home the stage (clears an alarm)").set_defaults(
        func=_runner(stage_home))
    jog = stage_commands.add_parser("jog", help="move by a distance in µm")
    for axis in ("dx", "dy", "dz"):
        jog.add_argument(f"--{axis}", type=float, default=0.0, metavar="UM")
    jog.set_defaults(func=_runner(stage_jog))
    stage_commands.add_parser("where", help="the stage position").set_defaults(
        func=_runner(stage_where))

    camera = subparsers.add_parser("camera", help="the scanner cameras")
    camera_commands = camera.add_subparsers(dest="camera_command", metavar="COMMAND",
                                            required=True)
    camera_commands.add_parser("list", help="cameras on USB and in use").set_defaults(
        func=_runner(camera_list))
    snapshot = camera_commands.add_parser("snapshot", help="save one frame as PNG")
    snapshot.add_argument("file", type=Path, metavar="FILE")
    snapshot.add_argument("--overview", action="store_true", help="from the overview camera")
    snapshot.set_defaults(func=_runner(camera_snapshot))
    for parser in (start, status, jog, snapshot, *(commands.choices[n] for n in
                                                   ("list", "cancel", "resume", "report")),
                   *(stage_commands.choices[n] for n in ("home", "where")),
                   camera_commands.choices["list"]):
        _common(parser)


def _runner(command: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            cfg = load(args.config, ScannerNodeConfig)
        except ConfigError as exc:
            return _fail(f"{exc} (pass --config PATH, the daemon's config)", EXIT_USAGE)
        try:
            return asyncio.run(_with_client(cfg, args, command))
        except CliError as exc:
            return _fail(str(exc), exc.status)
        except TimeoutError:
            return _fail("gave up waiting (--deadline); the job goes on, see `medge scan "
                         "status`", EXIT_TIMEOUT)
    return run


async def _with_client(cfg: DaemonConfig, args: argparse.Namespace, command: Any) -> int:
    async with ScannerClient(cfg, args.timeout) as client:
        status: int = await command(client, args)
        return status


def _fail(message: str, status: int) -> int:
    print(f"medge: {message}", file=sys.stderr)
    return status

