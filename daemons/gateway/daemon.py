"""The home-gateway daemon: ``medge run gateway --config config/gateway.toml``.

Reads every configured device (one task each, reconnecting on hot-plug), turns each
measurement into FHIR Observations and emits them through the durable outbox (at-least-once,
in order, kept while the internet is down), evaluates the patient's alert rules and the
technical checks (no data, device lost, clock skew), and keeps the patient-facing status.
docs/gateway.md describes topics, alert bodies and the status page.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from daemons.gateway import enrolment
from daemons.gateway.alerts import Alert, AlertEngine, Priority, RulesSection, State
from daemons.gateway.clock import ClockTracker, device_time_of, localize
from daemons.gateway.devices import AUTO, DeviceManager, DeviceRunner, DeviceSection, PortFinder
from daemons.gateway.observations import CodeSpec, Context, codes_from_strings, effective_time
from daemons.gateway.observations import observations as to_observations
from daemons.gateway.status_page import (
    STATUS_FILE,
    StatusBoard,
    StatusPage,
    StatusSection,
    read_status,
    write_atomically,
)
from drivers.discovery import DiscoveryConfig
from drivers.measurement import Measurement
from medge.config import bounds
from medge.outbox import OutboxError
from medge.runtime import Runtime
from medge.service import Service
from medge.settings import DaemonConfig

DAEMON = "gateway"
STALE_PRIORITY: dict[str, Priority] = {"ok": "low", "warn": "medium", "urgent": "high"}


@dataclass(frozen=True)
class GatewaySection:
    devices: tuple[DeviceSection, ...] = field(metadata=bounds(min=1))
    rules: RulesSection = field(default_factory=RulesSection)
    status: StatusSection = field(default_factory=StatusSection)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    """Used by devices with ``port = "auto"`` (docs/discovery.md)."""
    tick_s: float = field(default=1.0, metadata=bounds(min=0.05, max=60))
    """How often time-driven checks run (stale data, no signal, daily volume, enrolment)."""

    def validate(self) -> None:
        names = [d.name for d in self.devices]
        if duplicate := next((n for n in names if names.count(n) > 1), None):
            raise ValueError(f"devices: name {duplicate!r} used twice")
        probes = [d.probe_name for d in self.devices if d.port == AUTO]
        if duplicate := next((p for p in probes if probes.count(p) > 1), None):
            raise ValueError(f"devices: two {duplicate} devices with port = \"auto\" cannot be "
                             "told apart; pin one of them to its port")


@dataclass(frozen=True)
class GatewayConfig(DaemonConfig):
    gateway: GatewaySection = field(default_factory=lambda: GatewaySection(devices=()))


CONFIG = GatewayConfig


class Gateway:
    """Everything between the device runners and the runtime's outbox."""

    def __init__(self, cfg: GatewayConfig, rt: Runtime,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.cfg = cfg
        self.rt = rt
        self._clock = clock
        section = cfg.gateway
        self.enrolment = enrolment.EnrolmentWatcher(cfg.node.state_dir)
        self.engine = AlertEngine(section.rules, clock)
        self.board = StatusBoard(cfg.node.node, clock)
        auto = [d for d in section.devices if d.port == AUTO]
        finder = PortFinder(auto, section.discovery) if auto else None
        self.runners = [DeviceRunner(d, self._on_measurement, self._on_connection,
                                     finder if d.port == AUTO else None)
                        for d in section.devices]
        self.manager = DeviceManager(self.runners, finder)
        self.clocks = {d.name: ClockTracker(d.clock_skew_s) for d in section.devices}
        self.codes: dict[str, dict[str, CodeSpec]] = {d.name: _device_codes(d)
                                                      for d in section.devices}
        self._last_published: dict[str, datetime] = {}
        self._last_waveform: dict[str, datetime] = {}
        self._skewed: set[str] = set()
        self.mapping_errors = 0
        self._lost: set[str] = set()
        """Devices with an active device-lost alert (cleared when they connect again)."""
        self.page = StatusPage(self.board, section.status.bind, section.status.port) \
            if section.status.http else None
        self._status_path = cfg.node.state_dir / STATUS_FILE
        self._tasks: list[asyncio.Task[Any]] = []
        self._log = structlog.get_logger().bind(component=DAEMON)
        for d in section.devices:
            self.board.add(d.name, d.driver)
        previous = read_status(cfg.node.state_dir)
        if previous:
            self.board.restore(previous)

    async def start(self) -> None:
        self.cfg.node.state_dir.mkdir(parents=True, exist_ok=True)
        self.enrolment.refresh()
        self._report_enrolment()
        if self.page is not None:
            await self.page.start()
        self.manager.start()
        self._tasks = [asyncio.create_task(self._ticker(), name="gateway-tick"),
                       asyncio.create_task(self._status_loop(), name="gateway-status")]

    async def stop(self) -> None:
        await self.manager.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.page is not None:
            await self.page.close()
        self.board.stopped = True
        for status in self.board.devices.values():
            status.connection = "stopped"
        await self._write_status()

    # -- data path ---------------------------------------------------------------------

    async def _on_measurement(self, runner: DeviceRunner, raw: Measurement) -> None:
        name = runner.cfg.name
        m = localize(raw, runner.zone)
        tracker = self.clocks[name]
        offset = tracker.observe(m)
        await self._check_skew(name, tracker)
        taken_at = effective_time(device_time_of(m), m.received_at, offset)
        self.board.taken(name, taken_at)
        for alert in self.engine.feed(name, m, taken_at):
            await self._emit_alert(alert)
        if not publish_due(self._last_published, name, runner.cfg.publish_interval_s,
                           m.received_at):
            return
        with_waveform = bool(m.samples) and runner.cfg.pleth_every_s > 0 and publish_due(
            self._last_waveform, name, runner.cfg.pleth_every_s, m.received_at)
        ctx = Context(device_ref=_device_ref(runner, m), patient=self._subject(runner, m),
                      clock_offset_s=offset, clock_skewed=tracker.skewed,
                      extra_codes=self.codes[name])
        try:
            bodies = to_observations(m, ctx, with_samples=with_waveform or not _streaming(m))
        except ValueError as exc:  # a reading we cannot express: keep the device running
            self.mapping_errors += 1
            self._log.error("measurement not publishable", device=name, error=str(exc),
                            quantities=[r.quantity for r in m.readings])
            return
        # Appended together, the observations of one measurement share one outbox commit:
        # a power cut stores all of them or none.
        outcomes = await asyncio.gather(*(self.rt.emit(name, "obs", body) for body in bodies),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, OutboxError):
                self._log.error("observation refused by the outbox", device=name,
                                error=str(outcome))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                self.board.emitted(name, outcome.seq, taken_at)

    def _subject(self, runner: DeviceRunner, m: Measurement) -> str | None:
        current = self.enrolment.current
        if current is None:
            return None
        return current.subject_for(runner.cfg.driver, m.device_id or runner.serial)

    # -- technical alerts ----------------------------------------------------------------

    async def _emit_alert(self, alert: Alert, category: str = "clinical") -> None:
        current = self.enrolment.current
        body = alert.body(current.patient if current else None, category)
        try:
            await self.rt.emit(alert.device, "alert", body)
        except OutboxError as exc:
            self._log.error("alert refused by the outbox", alert=alert.rule, error=str(exc))
        self._log.warning("alert", alert=alert.rule, state=alert.state, device=alert.device)

    async def _technical(self, device: str, rule: str, state: State, message: str,
                         priority: Priority = "medium", value: float | None = None,
                         threshold: float | None = None) -> None:
        alert = Alert(rule, device, state, priority, self._clock(), message, value, threshold)
        await self._emit_alert(alert, "technical")

    async def _check_skew(self, name: str, tracker: ClockTracker) -> None:
        if tracker.skewed == (name in self._skewed):
            return
        if tracker.skewed:
            self._skewed.add(name)
            await self._technical(name, "clock-skew", "active",
                                  f"device clock off by {tracker.offset_s:+.0f} s; times kept, "
                                  "observations tagged", "low", value=round(tracker.offset_s),
                                  threshold=tracker.skew_threshold_s)
        else:
            self._skewed.discard(name)
            await self._technical(name, "clock-skew", "cleared", "device clock agrees again",
                                  "low", value=round(tracker.offset_s))

    async def _on_connection(self, runner: DeviceRunner, previous: str, reason: str) -> None:
        name = runner.cfg.name
        self.board.devices[name].connection = runner.connection
        if runner.connection == "lost" and previous == "connected":
            self._lost.add(name)
            await self._technical(name, "device-lost", "active",
                                  f"device disconnected ({reason}); reconnecting")
        elif runner.connection == "connected" and name in self._lost:
            self._lost.discard(name)
            await self._technical(name, "device-lost", "cleared", "device connected again")

    async def _ticker(self) -> None:
        while True:
            now = self._clock()
            for runner in self.runners:
                level = runner.check_stale()
                if level is None:
                    continue
                self.board.devices[runner.cfg.name].stale = level
                minutes = runner.minutes_without_data()
                await self._technical(
                    runner.cfg.name, "no-data", "cleared" if level == "ok" else "active",
                    "data again" if level == "ok" else f"no data for {minutes:.0f} min",
                    STALE_PRIORITY[level],
                    value=round(minutes, 1), threshold=runner.cfg.stale_urgent_min
                    if level == "urgent" else runner.cfg.stale_warn_min)
            for alert in self.engine.tick(now):
                await self._emit_alert(alert)
            if self.enrolment.refresh():
                self._report_enrolment()
            await asyncio.sleep(self.cfg.gateway.tick_s)

    def _report_enrolment(self) -> None:
        current = self.enrolment.current
        self.board.paired = current is not None
        if self.enrolment.error:
            self._log.error("enrolment unreadable; data goes out unpaired",
                            error=self.enrolment.error)
        elif current is None:
            self._log.warning("gateway not paired with a patient; data goes out unpaired")
        else:
            self._log.info("enrolment loaded", devices=len(current.devices) or "all")

    # -- status ------------------------------------------------------------------------

    async def _status_loop(self) -> None:
        while True:
            await self._write_status()
            await asyncio.sleep(self.cfg.gateway.status.refresh_s)

    async def _write_status(self) -> None:
        with contextlib.suppress(RuntimeError):  # the outbox may already be closed
            self.board.delivered_up_to(await self.rt.outbox.oldest_unacked_seq())
        self.board.clinic_link = self.rt.link.connected.is_set() and not self.board.stopped
        try:
            await asyncio.to_thread(write_atomically, self._status_path, self.board.snapshot())
        except OSError as exc:
            self._log.warning("cannot write the status file", error=str(exc))


def publish_due(last: dict[str, datetime], name: str, interval_s: float, now: datetime) -> bool:
    """Whether ``name``'s reading at gateway time ``now`` is published (at most one every
    ``interval_s``); records it in ``last`` if so. A negative elapsed time is the wall clock
    stepped back (NTP correcting it): due, or every reading of the device (urine strips
    included, which the analyzer deletes once acknowledged) would be dropped for as long as
    the step — found by bench/chaos's host clock fault."""
    previous = last.get(name)
    if previous is not None and 0 <= (now - previous).total_seconds() < interval_s:
        return False
    last[name] = now
    return True


def _device_codes(device: DeviceSection) -> dict[str, CodeSpec]:
    if device.map is None:
        return {}
    from drivers.modbus_device import load_map

    return codes_from_strings((r.quantity, r.code) for r in load_map(device.map).registers)


def _device_ref(runner: DeviceRunner, m: Measurement) -> str:
    """``driver:serial`` when the device has a serial number, else the configured name."""
    serial = m.device_id or runner.serial
    return f"{runner.cfg.driver}:{serial}" if serial else f"{runner.cfg.driver}:{runner.cfg.name}"


def _streaming(m: Measurement) -> bool:
    """Pleth arrives with every oximeter window; a uroflow curve is the void's own result."""
    return any(s.quantity == "pleth" for s in m.samples)


async def main(cfg: GatewayConfig, service: Service) -> None:
    async with Runtime(cfg, DAEMON) as rt:
        gateway = Gateway(cfg, rt)
        await gateway.start()
        service.ready(f"{len(gateway.runners)} devices started")
        try:
            await service.stopping.wait()
        finally:
            await gateway.stop()
