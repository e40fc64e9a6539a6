"""GRBL 1.1 stage driver: asyncio, over any pyserial URL (tty, pty, ``socket://``).

State machine (docs/grbl.md): ``connect`` opens the link and waits for the banner (sending
wake-up newlines and a soft reset when none comes by itself), reads ``$I`` and ``$$``, then a
reader task dispatches every received line and a poller sends ``?`` at ``poll_hz``. Lines are
streamed with GRBL's character counting (unacknowledged bytes never exceed the RX buffer);
``$`` commands go one at a time. ``ok``/``error:N`` acknowledge the oldest line, ``<...>``
reports update :attr:`GrblStage.status`, ``ALARM:N`` fails what is queued, and an unexpected
banner means the controller rebooted. Whenever the controller may have moved without us
(reset in motion, reboot, replug) the position is marked lost and motion is refused until
:meth:`~drivers.stage.Stage.home` succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from drivers.grbl_protocol import (
    BANNER_RE,
    DEFAULT_RX_BUFFER,
    LINE_MAX_SIGNIFICANT,
    BuildInfo,
    GrblAlarm,
    GrblError,
    GrblReset,
    Kind,
    LineTooLong,
    NotGrblError,
    ProtocolError,
    Status,
    classify,
    parse_banner,
    parse_build_info,
    parse_code,
    parse_setting,
    parse_status,
    significant_length,
)
from drivers.serial_link import LinkError, SerialLink, SerialSettings
from drivers.stage import XYZ, Backlash, Stage, StageDisconnected, StageError, StageTimeout

SOFT_RESET = b"\x18"
JOG_CANCEL = b"\x85"
FEED_HOLD = b"!"
CYCLE_START = b"~"
STATUS_QUERY = b"?"
WAKE_UP = b"\r\n\r\n"
REQUIRED_SETTINGS = frozenset({10, 13, 20, 22, 110, 111, 112, 120, 121, 122, 130, 131, 132})
"""Settings the driver relies on; every GRBL 1.1 prints them in ``$$``."""


@dataclass(frozen=True)
class GrblConfig:
    """Timing of the driver. Defaults suit a GRBL 1.1 board on USB serial."""

    poll_hz: float = 5.0
    """Status polling rate (GRBL's documentation: no more than 5 Hz on 8-bit boards)."""
    predict_motion_end: bool = True
    """Poll at the end of each move predicted from $110-$122, not only at ``poll_hz``."""
    settle_poll_hz: float = 50.0
    """Polling rate once a move is predicted to have ended, until Idle is seen."""
    reply_timeout_s: float = 2.0
    """A controller silent this long (not even a status report) is declared stalled."""
    banner_timeout_s: float = 2.5
    """How long to wait for a banner at connect before sending a soft reset."""
    homing_timeout_s: float = 120.0
    reconnect: bool = True
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 5.0
    settle_s: float = 0.0
    """Mechanical settling time added after the controller reports Idle."""

    def __post_init__(self) -> None:
        for name in ("poll_hz", "settle_poll_hz", "reply_timeout_s", "banner_timeout_s",
                     "homing_timeout_s", "reconnect_min_s", "reconnect_max_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"GrblConfig.{name} must be > 0, got {value!r}")
        if not (math.isfinite(self.settle_s) and self.settle_s >= 0):
            raise ValueError(f"GrblConfig.settle_s must be >= 0, got {self.settle_s!r}")


@dataclass
class _Pending:
    """A line sent and not yet acknowledged."""

    line: str
    size: int
    future: asyncio.Future[list[str]]
    replies: list[str] = field(default_factory=list)
    sent_at: float = field(default_factory=time.monotonic)


def rapid_move_s(delta_mm: XYZ, max_rate_mm_min: XYZ, accel_mm_s2: XYZ) -> float:
    """Duration of a rest-to-rest straight move under GRBL's per-axis rate/accel limits."""
    length = math.sqrt(sum(d * d for d in delta_mm))
    if length == 0:
        return 0.0
    rate = min(r / 60 * length / abs(d) for d, r in zip(delta_mm, max_rate_mm_min, strict=True)
               if d)
    accel = min(a * length / abs(d) for d, a in zip(delta_mm, accel_mm_s2, strict=True) if d)
    if length >= rate * rate / accel:
        return length / rate + rate / accel
    return 2 * math.sqrt(length / accel)


class GrblStage(Stage):
    """A microscope XYZ stage on a GRBL 1.1 controller."""

    def __init__(
        self,
        url: str,
        config: GrblConfig | None = None,
        backlash: Backlash | None = None,
        serial_settings: SerialSettings | None = None,
    ) -> None:
        super().__init__(backlash)
        self.url = url
        self.config = config or GrblConfig()
        self.serial_settings = serial_settings
        self.settings: dict[int, float] = {}
        self.build: BuildInfo | None = None
        self.status: Status | None = None
        self.alarm: GrblAlarm | None = None
        """The last alarm, until :meth:`unlock` or :meth:`home` clears it."""
        self.last_message = ""
        self.connection_losses = 0
        self.unparsed_lines = 0
        self._log = structlog.get_logger("drivers.grbl").bind(device=url)
        self._link: SerialLink | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reconnect_task: asyncio.Task[None] | None = None
        self._pending: deque[_Pending] = deque()
        self._in_flight = 0
        self._rx_size = DEFAULT_RX_BUFFER
        self._send_lock = asyncio.Lock()
        self._tick = asyncio.Event()
        self._poll_wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._closing = False
        self._link_up = False
        self._wco: tuple[float, float, float] | None = None
        self._status_seq = 0
        self._status_at = 0.0
        self._alarm_seq = 0
        self._banner_seq = 0
        self._expect_banner = False
        self._needs_reset = False
        self._referenced = False
        self._lost = False
        self._last_rx = time.monotonic()
        self._motion_end: float | None = None
        self._last_sent: XYZ | None = None

    # -- connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def rx_buffer_bytes(self) -> int:
        return self._rx_size

    async def wait_connected(self, timeout: float) -> None:
        """Wait for a (re)connection; raise :class:`StageTimeout` when none comes."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise StageTimeout(f"{self.url}: not reconnected within {timeout} s") from None

    async def _do_connect(self) -> None:
        self._closing = False
        await self._open_and_handshake()

    async def _open_and_handshake(self) -> None:
        link = SerialLink(self.url, self.serial_settings)
        try:
            await link.connect()
        except LinkError as exc:
            raise StageDisconnected(str(exc)) from exc
        self._link = link
        self._link_up = True
        try:
            await self._await_banner(link)
            self._tasks = [asyncio.create_task(self._read_loop(link), name="grbl-reader")]
            self.build = parse_build_info(await self._query("$I"))
            self._rx_size = self.build.rx_buffer_bytes or DEFAULT_RX_BUFFER
            self.settings = dict(parse_setting(line) for line in await self._query("$$"))
            missing = REQUIRED_SETTINGS - self.settings.keys()
            if missing:
                raise ProtocolError(f"{self.url}: $$ reply lacks ${min(missing)} (garbled?)")
            self._tasks.append(asyncio.create_task(self._poll_loop(link), name="grbl-poller"))
            await self._await_status()
        except BaseException:
            await self._teardown_link()
            raise
        self._connected.set()
        self._log.info("grbl_connected", version=self.build.version, rx_buffer=self._rx_size,
                       state=self.status.state if self.status else None)

    async def _await_banner(self, link: SerialLink) -> None:
        """Wait for ``Grbl 1.1x [...]``; if none comes, wake the line and soft-reset once."""
        received: list[str] = []
        for attempt in range(2):
            deadline = time.monotonic() + self.config.banner_timeout_s
            try:
                while True:
                    raw = await link.read_until(
                        b"\n", timeout=max(0.0, deadline - time.monotonic()), limit=512
                    )
                    line = raw.decode("ascii", errors="replace").strip()
                    if BANNER_RE.fullmatch(line):
                        parse_banner(line)  # refuses other versions
                        self._last_rx = time.monotonic()
                        return
                    if line:
                        received.append(line)
            except TimeoutError:
                if attempt == 0:
                    await link.write(WAKE_UP + SOFT_RESET)
            except LinkError as exc:
                if not link.is_open:
                    raise StageDisconnected(str(exc)) from exc
                raise NotGrblError(f"{self.url}: not GRBL: endless line without newline") from exc
        seen = "; received " + repr(received[:3])[:200] if received else "; received nothing"
        raise NotGrblError(f"{self.url}: no GRBL 1.1 banner after a soft reset{seen}")

    async def _teardown_link(self) -> None:
        self._link_up = False
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        self._tasks = []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._link is not None:
            await self._link.close()
            self._link = None

    async def _do_close(self) -> None:
        self._closing = True
        self._connected.clear()
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
            self._reconnect_task = None
        self._fail_pending(StageDisconnected(f"{self.url}: closed"))
        await self._teardown_link()

    def _link_lost(self, error: StageError) -> None:
        """Report the loss, fail what is queued, forget the position, start reconnecting."""
        if self._closing or not self._link_up:
            return
        self._link_up = False
        self._fail_pending(error)
        if not self._connected.is_set():
            return  # failed during the handshake: the caller gets the error
        self.connection_losses += 1
        self._connected.clear()
        self._log.error("grbl_link_lost", reason=str(error), reconnect=self.config.reconnect)
        self._mark_position_lost("link lost")
        if self.config.reconnect:
            self._reconnect_task = asyncio.create_task(self._reconnect(), name="grbl-reconnect")
        else:
            self._reconnect_task = asyncio.create_task(self._teardown_link())

    async def _reconnect(self) -> None:
        await self._teardown_link()
        delay = self.config.reconnect_min_s
        attempt = 0
        while not self._closing:
            attempt += 1
            try:
                await self._open_and_handshake()
            except (StageError, OSError) as exc:
                self._log.warning("grbl_reconnect_failed", attempt=attempt, error=str(exc),
                                  retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.reconnect_max_s)
            else:
                self._mark_position_lost("reconnected: the stage may have moved meanwhile")
                return

    def _require_link(self) -> SerialLink:
        if self._link is None or not self._link_up:
            raise StageDisconnected(f"{self.url}: not connected (reconnecting)")
        return self._link

    # -- reading and dispatch --------------------------------------------------------------

    async def _read_loop(self, link: SerialLink) -> None:
        try:
            while True:
                raw = await link.read_until(b"\n", limit=1024)
                self._last_rx = time.monotonic()
                line = raw.decode("ascii", errors="replace").strip()
                if line:
                    self._dispatch(line)
                self._notify()
        except LinkError as exc:
            self._link_lost(StageDisconnected(str(exc)))
            self._notify()
        except Exception as exc:  # dying quietly would leave a link nobody reads, and the
            self._log.exception("grbl_reader_failed")  # teardown would re-raise it
            self._link_lost(StageDisconnected(f"{self.url}: reader failed: {exc!r}"))
            self._notify()

    def _notify(self) -> None:
        """Wake every waiter; each re-checks its own condition."""
        self._tick.set()
        self._tick = asyncio.Event()

    def _dispatch(self, line: str) -> None:
        kind = classify(line)
        if kind in (Kind.OK, Kind.ERROR):
            self._acknowledge(line, kind)
        elif kind is Kind.STATUS:
            try:
                status = parse_status(line, self._wco)
            except ProtocolError as exc:
                self._unparsed(line, str(exc))
                return
            self._wco = status.wco
            self.status = status
            self._status_seq += 1
            self._status_at = self._last_rx
            if status.is_idle and not self._pending:
                self._motion_end = None
        elif kind is Kind.ALARM:
            self._on_alarm(GrblAlarm(parse_code(line)))
        elif kind is Kind.MESSAGE:
            self.last_message = line[5:-1]
            self._log.info("grbl_message", message=self.last_message)
            if self.last_message == "Reset to continue":
                self._needs_reset = True
        elif kind in (Kind.REPORT, Kind.SETTING) and self._pending:
            self._pending[0].replies.append(line)
        elif kind is Kind.BANNER:
            self._on_banner(line)
        elif kind is Kind.STARTUP:
            self._log.info("grbl_startup_line", line=line)
        else:
            self._unparsed(line, "unexpected line")

    def _unparsed(self, line: str, reason: str) -> None:
        self.unparsed_lines += 1
        self._log.warning("grbl_unparsed_line", line=line[:80], reason=reason)

    def _acknowledge(self, line: str, kind: Kind) -> None:
        if not self._pending:
            self._log.info("grbl_unsolicited_ack", line=line)
            return
        entry = self._pending.popleft()
        self._in_flight -= entry.size
        if entry.future.done():
            return
        if kind is Kind.OK:
            entry.future.set_result(entry.replies)
        else:
            entry.future.set_exception(GrblError(parse_code(line), entry.line))

    def _fail_pending(self, error: BaseException) -> None:
        while self._pending:
            entry = self._pending.popleft()
            if not entry.future.done():
                entry.future.set_exception(error)
                entry.future.exception()  # the caller may be gone; do not log it as lost
        self._in_flight = 0

    def _on_alarm(self, alarm: GrblAlarm) -> None:
        self._log.error("grbl_alarm", code=alarm.code, meaning=alarm.meaning)
        self.alarm = alarm
        self._alarm_seq += 1
        self._fail_pending(alarm)  # GRBL discards what it had buffered
        self._motion_end = None
        self._forget_motion_state()
        if alarm.position_lost:
            self._mark_position_lost(f"ALARM:{alarm.code}")

    def _on_banner(self, line: str) -> None:
        self._banner_seq += 1
        self._fail_pending(GrblReset(f"{self.url}: controller reset ({line})"))
        self._needs_reset = False
        self._motion_end = None
        self._forget_motion_state()
        if self._expect_banner:
            self._expect_banner = False
        else:
            self._log.error("grbl_unexpected_reset", banner=line)
            self._mark_position_lost("controller rebooted by itself")

    def _mark_position_lost(self, why: str) -> None:
        if not self._lost:
            self._log.warning("grbl_position_lost", reason=why)
        self._lost = True
        self._referenced = False

    def _forget_motion_state(self) -> None:
        super()._forget_motion_state()
        self._last_sent = None

    # -- waiting ---------------------------------------------------------------------------

    async def _wait_for(
        self,
        done: Callable[[], bool],
        what: str,
        *,
        deadline: float | None = None,
        liveness: bool = True,
        deadline_drops_link: bool = True,
    ) -> None:
        """Wait until ``done()``.

        ``liveness``: the controller must keep talking (the poller's status reports); silence
        for ``reply_timeout_s`` means it hung, so the link is dropped and re-opened.
        ``deadline``: when an answer is due; missing it drops the link too, unless it is only
        the caller's patience (``deadline_drops_link=False``, e.g. ``wait_until_idle``).
        """
        while not done():
            if not self._link_up:
                raise StageDisconnected(f"{self.url}: disconnected while waiting for {what}")
            if self._acknowledgement_lost():
                error = StageTimeout(f"{self.url}: acknowledgement of {self._pending[0].line!r} "
                                     f"lost (corrupted line?); resynchronising")
                self._link_lost(error)
                raise error
            tick = self._tick
            now = time.monotonic()
            wait_s = math.inf
            if liveness:
                wait_s = self._last_rx + self.config.reply_timeout_s - now
            if deadline is not None:
                wait_s = min(wait_s, deadline - now)
            try:
                async with asyncio.timeout(max(0.0, wait_s) if wait_s < math.inf else None):
                    await tick.wait()
            except TimeoutError:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    error = StageTimeout(f"{self.url}: timed out waiting for {what}")
                    if deadline_drops_link:
                        self._link_lost(error)
                    raise error from None
                if liveness and now - self._last_rx >= self.config.reply_timeout_s:
                    error = StageTimeout(
                        f"{self.url}: controller silent for {self.config.reply_timeout_s} s "
                        f"while waiting for {what}"
                    )
                    self._link_lost(error)
                    raise error from None

    def _acknowledgement_lost(self) -> bool:
        """The oldest line is long overdue although the controller reports it has nothing to
        do, so its ``ok`` was garbled on the wire and the character count is off."""
        if not self._pending or self.status is None:
            return False
        oldest = self._pending[0]
        overdue = oldest.sent_at + self.config.reply_timeout_s
        return self._status_at > overdue and self.status.state in ("Idle", "Alarm")

    async def _await_entry(self, entry: _Pending, deadline: float | None = None) -> list[str]:
        """The reply to a line: by ``deadline`` if given, else as long as the controller talks
        (a motion line's ``ok`` waits for a free planner block)."""
        await self._wait_for(entry.future.done, f"a reply to {entry.line!r}", deadline=deadline,
                             liveness=deadline is None)
        return entry.future.result()

    async def _await_status(self, deadline: float | None = None, prompt: bool = True) -> Status:
        """The next status report; ``prompt`` asks for it now instead of at the next poll."""
        seq = self._status_seq
        if prompt:
            self._poll_wake.set()
        await self._wait_for(lambda: self._status_seq > seq, "a status report",
                             deadline=deadline, deadline_drops_link=False)
        assert self.status is not None
        return self.status

    # -- sending ---------------------------------------------------------------------------

    async def _send(self, line: str) -> _Pending:
        """Queue a line under character counting: wait until the RX buffer has room."""
        size = len(line) + 1
        if significant_length(line) > LINE_MAX_SIGNIFICANT or size > self._rx_size - 1:
            raise LineTooLong(f"{line[:40]!r}...: GRBL accepts {LINE_MAX_SIGNIFICANT} "
                              f"significant characters per line")
        async with self._send_lock:
            link = self._require_link()
            await self._wait_for(lambda: self._in_flight + size <= self._rx_size - 1,
                                 "RX buffer space")
            return await self._write_counted(link, line, size)

    async def _write_counted(self, link: SerialLink, line: str, size: int) -> _Pending:
        entry = _Pending(line, size, asyncio.get_running_loop().create_future())
        self._pending.append(entry)
        self._in_flight += size
        try:
            await link.write(line.encode("ascii") + b"\n")
        except LinkError as exc:
            self._link_lost(StageDisconnected(str(exc)))
            raise StageDisconnected(str(exc)) from exc
        return entry

    async def _query(self, line: str, timeout: float | None = None) -> list[str]:
        """Send a ``$`` command alone (send-and-wait, never interleaved) and return its reply."""
        deadline = time.monotonic() + (timeout or self.config.reply_timeout_s)
        async with self._send_lock:
            link = self._require_link()
            await self._wait_for(lambda: not self._pending, "the queue to drain")
            entry = await self._write_counted(link, line, len(line) + 1)
            return await self._await_entry(entry, deadline)  # nothing else until it is done

    async def _realtime(self, byte: bytes) -> None:
        link = self._require_link()
        try:
            await link.write(byte)
        except LinkError as exc:
            self._link_lost(StageDisconnected(str(exc)))
            raise StageDisconnected(str(exc)) from exc

    async def _poll_loop(self, link: SerialLink) -> None:
        while True:
            self._poll_wake.clear()
            try:
                await link.write(STATUS_QUERY)
            except LinkError:
                return  # the reader reports the loss
            interval = 1 / self.config.poll_hz
            if self._motion_end is not None:
                remaining = self._motion_end - time.monotonic()
                interval = min(interval, remaining) if remaining > 0 else (
                    1 / self.config.settle_poll_hz)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._poll_wake.wait()

    # -- GRBL-specific public API ----------------------------------------------------------

    async def stream(self, lines: Iterable[str]) -> None:
        """Stream G-code with character counting; raise the first ``error:N`` at the end."""
        self._forget_motion_state()
        entries = [await self._send(line) for line in lines]
        errors: list[BaseException] = []
        for entry in entries:
            await self._wait_for(entry.future.done, f"a reply to {entry.line!r}")
            error = entry.future.exception()
            if error is not None:
                errors.append(error)
        if errors:
            raise errors[0]

    async def set_setting(self, number: int, value: float) -> None:
        """Write ``$N=value`` (alone on the line: EEPROM writes stall GRBL's serial input)."""
        if not math.isfinite(value):
            raise ValueError(f"${number}: {value!r} is not a finite number")
        text = f"{value:.6f}".rstrip("0").rstrip(".")
        await self._query(f"${number}={text}")
        self.settings[number] = float(text)

    async def feed_hold(self) -> None:
        await self._realtime(FEED_HOLD)

    async def resume(self) -> None:
        await self._realtime(CYCLE_START)

    async def jog_cancel(self) -> None:
        self._forget_motion_state()
        await self._realtime(JOG_CANCEL)

    async def soft_reset(self) -> None:
        """Ctrl-X: halt, flush every buffer, wait for the banner (in motion: position lost)."""
        seq = self._banner_seq
        self._expect_banner = True
        await self._realtime(SOFT_RESET)
        deadline = time.monotonic() + self.config.reply_timeout_s
        await self._wait_for(lambda: self._banner_seq > seq, "the banner after reset",
                             deadline=deadline, liveness=False)

    async def unlock(self) -> None:
        """``$X``: leave Alarm without homing (a critical alarm is reset first).

        This does not make a lost position valid again; only :meth:`home` does.
        """
        if self._needs_reset:
            await self.soft_reset()
        await self._query("$X")
        self.alarm = None
        await self._await_status()

    @property
    def homing_enabled(self) -> bool:
        return bool(self.settings.get(22, 0))

    # -- Stage hooks -----------------------------------------------------------------------

    def _mm_per_unit(self) -> float:
        return 25.4 if self.settings.get(13, 0) else 1.0

    def _do_get_position(self) -> XYZ:
        if self.status is None or self.status.mpos is None:
            raise StageDisconnected(f"{self.url}: no position reported yet")
        scale = self._mm_per_unit() * 1000
        return XYZ(*(v * scale for v in self.status.mpos))

    def _do_position_lost(self) -> bool:
        return self._lost or (self.homing_enabled and not self._referenced)

    def _do_get_limits(self) -> tuple[XYZ, XYZ] | None:
        if not self.settings.get(20, 0):
            return None
        travel = XYZ(*(-self.settings[130 + i] * 1000 for i in range(3)))
        return travel, XYZ(0.0, 0.0, 0.0)

    async def _do_home(self) -> None:
        if self._needs_reset:
            await self.soft_reset()
        self._motion_end = None
        await self._query("$H", timeout=self.config.homing_timeout_s)
        self._referenced = True
        self._lost = False
        self.alarm = None
        await self._await_status()

    def _predict_motion_end(self, start: XYZ, target: XYZ) -> None:
        rates = XYZ(*(self.settings.get(110 + i, 0.0) for i in range(3)))
        accels = XYZ(*(self.settings.get(120 + i, 0.0) for i in range(3)))
        if not self.config.predict_motion_end or min(rates) <= 0 or min(accels) <= 0:
            return
        delta = XYZ(*((t - s) / 1000 for s, t in zip(start, target, strict=True)))
        begin = max(time.monotonic(), self._motion_end or 0.0)
        self._motion_end = begin + rapid_move_s(delta, rates, accels)

    async def _do_move_absolute(self, target: XYZ) -> None:
        scale = self._mm_per_unit() * 1000
        words = "".join(f"{axis}{value / scale:.4f}" for axis, value in zip("XYZ", target,
                                                                            strict=True))
        start = self._last_sent or self.position_um
        entry = await self._send(f"G53G0{words}")
        self._last_sent = target
        self._predict_motion_end(start, target)
        self._poll_wake.set()
        await self._await_entry(entry)

    async def _do_jog(self, delta: XYZ, speed_um_s: float) -> None:
        scale = self._mm_per_unit() * 1000
        words = "".join(f"{axis}{value / scale:.4f}" for axis, value in zip("XYZ", delta,
                                                                            strict=True) if value)
        feed = speed_um_s * 60 / scale
        entry = await self._send(f"$J=G91{words}F{feed:.3f}")
        await self._await_entry(entry)

    async def _do_wait_until_idle(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        alarms = self._alarm_seq
        await self._wait_for(lambda: not self._pending, "the queued lines' replies",
                             deadline=deadline, deadline_drops_link=False)
        planner_blocks = self.build.planner_blocks if self.build else None
        prompt = True  # one fresh report now, then the poller's own cadence
        while True:
            status = await self._await_status(deadline, prompt)
            prompt = False
            if self._alarm_seq != alarms and self.alarm is not None:
                raise self.alarm
            if status.state == "Alarm":
                raise StageError(f"{self.url}: controller in Alarm state: home() or unlock()")
            if status.is_idle and (status.planner_free is None or planner_blocks is None
                                   or status.planner_free >= planner_blocks):
                break
        self._motion_end = None
        if self.config.settle_s:
            await asyncio.sleep(self.config.settle_s)

    async def _do_stop(self) -> None:
        status = await self._await_status()
        if status.state == "Jog":
            await self.jog_cancel()
            await self._do_wait_until_idle(None)
        elif status.state in ("Run", "Hold"):
            await self.feed_hold()
            braking_s = max(self.settings[110 + i] / 60 / max(self.settings[120 + i], 1e-3)
                            for i in range(3))
            deadline = time.monotonic() + self.config.reply_timeout_s + braking_s
            while (status := await self._await_status(deadline)).state != "Alarm":
                if status.state == "Hold" and status.substate == 0:
                    await self.soft_reset()  # drops queued motion; a completed hold keeps position
                    break
