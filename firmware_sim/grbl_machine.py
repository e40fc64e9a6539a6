"""The simulated GRBL 1.1h controller and the stage it drives, without any serial line.

:class:`GrblMachine` holds the controller state (settings, modal G-code state, planner,
alarms) and the mechanics (trapezoidal motion in real time, per-axis backlash, steps lost on a
reset during motion). :mod:`firmware_sim.grbl` puts it on a serial line; other simulators (the
virtual slide camera) create one in-process and ask where the stage really is:

* ``machine.true_position_um() -> (x, y, z)``: the *mechanical* carriage position in µm in the
  machine frame (the frame ``MPos`` uses once homed), including backlash lag, steps lost on a
  reset during motion, and the motion in progress at the current time.
* ``machine.is_moving``: True while a block executes, a hold decelerates or homing runs.

Lines handed to :meth:`GrblMachine.execute_line` are already cleaned as GRBL's serial loop
does (spaces and comments dropped, upper case). Replies are returned; asynchronous output
(``ALARM:N``, banner, status reports) goes to the sink given to :meth:`GrblMachine.attach`.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from firmware_sim.grbl_motion import (
    Profile,
    Vec3,
    axis_limited,
    backlash_follow,
    plan_profile,
)

VERSION = "1.1h"
BUILD_DATE = "20190830"
BANNER = f"Grbl {VERSION} ['$' for help]"
HELP = "[HLP:$$ $# $G $I $N $x=val $Nx=line $J=line $SLP $C $X $H ~ ! ? ctrl-x]"
RX_BUFFER_SIZE = 128
PLANNER_BLOCKS = 15
LINE_BUFFER_SIZE = 80
MSG_UNLOCK_HINT = "[MSG:'$H'|'$X' to unlock]"
MSG_UNLOCKED = "[MSG:Caution: Unlocked]"
MSG_RESET_TO_CONTINUE = "[MSG:Reset to continue]"
WCO_REFRESH_IDLE, WCO_REFRESH_BUSY = 10, 30
OVR_REFRESH_IDLE, OVR_REFRESH_BUSY = 10, 20

GRBL_DEFAULTS: dict[int, float] = {
    0: 10, 1: 25, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 10: 1, 11: 0.010, 12: 0.002, 13: 0,
    20: 0, 21: 0, 22: 0, 23: 0, 24: 25.0, 25: 500.0, 26: 250, 27: 1.0, 30: 1000, 31: 0,
    32: 0, 100: 250.0, 101: 250.0, 102: 250.0, 110: 500.0, 111: 500.0, 112: 500.0,
    120: 10.0, 121: 10.0, 122: 10.0, 130: 200.0, 131: 200.0, 132: 200.0,
}
"""``defaults.h`` (DEFAULTS_GENERIC) of GRBL 1.1h, in ``$$`` order."""

RIG_DEFAULTS: dict[int, float] = {
    **GRBL_DEFAULTS,
    20: 1, 22: 1, 24: 100.0, 25: 1000.0, 27: 0.5,
    100: 1000.0, 101: 1000.0, 102: 1000.0, 110: 600.0, 111: 600.0, 112: 120.0,
    120: 50.0, 121: 50.0, 122: 20.0, 130: 75.0, 131: 50.0, 132: 10.0,
}
"""The simulated microscope rig: homing switches and soft limits on, 1 µm steps, a
75 × 50 × 10 mm stage with 10 mm/s XY, 2 mm/s Z."""

INTEGER_SETTINGS = frozenset({0, 1, 2, 3, 4, 5, 6, 10, 13, 20, 21, 22, 23, 26, 30, 31, 32})
AXES = "XYZ"
_WORD = re.compile(r"([A-Z])([-+]?(?:\d+\.?\d*|\.\d+))?")
_SETTING = re.compile(r"\$(\d+)=(.*)")


class Busy(Enum):
    """Why a line cannot complete yet; the serial loop waits and retries (GRBL blocks too)."""

    PLANNER_FULL = "planner full"
    HOMING = "homing"


@dataclass
class Block:
    """One straight move in the planner."""

    start: Vec3
    end: Vec3
    unit: Vec3
    profile: Profile
    jog: bool
    start_time: float = 0.0
    carriage_at_start: Vec3 = (0.0, 0.0, 0.0)

    def motor_at(self, elapsed: float) -> Vec3:
        d = self.profile.distance_at(elapsed)
        return (
            self.start[0] + self.unit[0] * d,
            self.start[1] + self.unit[1] * d,
            self.start[2] + self.unit[2] * d,
        )


def _axis_values(values: Vec3) -> str:
    return ",".join(f"{v:.3f}" for v in values)


def _format_setting(number: int, value: float) -> str:
    if number in INTEGER_SETTINGS:
        return f"${number}={int(value)}"
    return f"${number}={value:.3f}"


class GrblMachine:
    """GRBL 1.1h controller state plus stage mechanics; usable without a serial line.

    ``settings`` overrides some ``$N`` values of :data:`RIG_DEFAULTS` (pass
    :data:`GRBL_DEFAULTS` for a stock board); ``time_scale`` > 1 runs motion faster than real
    time; ``clock`` lets tests drive time by hand.
    """

    def __init__(
        self,
        settings: dict[int, float] | None = None,
        *,
        time_scale: float = 1.0,
        backlash_um: Vec3 = (20.0, 20.0, 10.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        if any(b < 0 for b in backlash_um):
            raise ValueError(f"backlash_um must be >= 0, got {backlash_um}")
        self.settings = {**RIG_DEFAULTS, **(settings or {})}
        self.time_scale = time_scale
        self.backlash_mm: Vec3 = (
            backlash_um[0] / 1000, backlash_um[1] / 1000, backlash_um[2] / 1000
        )
        self._clock = clock
        self._t0 = clock()
        self._output: Callable[[str], None] = lambda line: None
        self.changed = asyncio.Event()
        """Set on every real-time event, so a waiting serial loop re-checks the machine."""
        self.replies_flowing = asyncio.Event()
        """Cleared by the stalled-replies fault: the serial loop then holds back its output."""
        self.replies_flowing.set()
        self.resets = 0
        self.max_rx_used = 0
        self.motion_time_s = 0.0
        """Simulated seconds spent executing completed blocks: the motion profiles' own time."""
        self.rx_overflows = 0
        self.motor: list[float] = [0.0, 0.0, 0.0]
        self.carriage: list[float] = [0.0, 0.0, 0.0]
        self.lost_mm: list[float] = [0.0, 0.0, 0.0]
        """Physical position minus carriage-in-motor-frame: steps lost, or a re-zeroed counter."""
        self.g54: list[float] = [0.0, 0.0, 0.0]
        """The G54 work offset (kept in EEPROM: survives resets and power cycles)."""
        self._state = "Idle"
        self._power_up()

    # -- time and output -------------------------------------------------------------------

    def now(self) -> float:
        """Simulated seconds since construction (wall clock times ``time_scale``)."""
        return (self._clock() - self._t0) * self.time_scale

    def attach(self, output: Callable[[str], None]) -> None:
        """Send asynchronous output lines (without line end) to ``output``."""
        self._output = output

    def _emit(self, line: str) -> None:
        self._output(line)

    # -- power-up and reset ----------------------------------------------------------------

    def _power_up(self) -> None:
        self.queue: deque[Block] = deque()
        self.current: Block | None = None
        self.planned: list[float] = list(self.motor)
        self.hold_pending_resume = False
        self.hold_cancels_jog = False
        self.critical = False
        self.homing_end: float | None = None
        self.absolute = True
        self.inches = False
        self.motion = "G0"
        self.feed_mm_min = 0.0
        self.wco_counter = 0
        self.ovr_counter = 0
        self._state = "Alarm" if self._homing_enabled() else "Idle"

    def boot(self) -> None:
        """Print what GRBL prints at power-up (the serial loop calls this per connection)."""
        self._emit("")
        self._emit(BANNER)
        if self._state == "Alarm":
            self._emit(MSG_UNLOCK_HINT)

    def power_cycle(self) -> None:
        """A reboot (USB port re-opened, brown-out): step counters restart at 0."""
        physical = self._physical_now()
        self.motor = [0.0, 0.0, 0.0]
        self.carriage = [0.0, 0.0, 0.0]
        self.lost_mm = list(physical)
        self.resets += 1
        self._power_up()
        self.changed.set()

    def stall_replies(self, on: bool = True) -> None:
        """Fault: the firmware keeps working but its replies are held back until released."""
        if on:
            self.replies_flowing.clear()
        else:
            self.replies_flowing.set()

    def spurious_reset(self) -> None:
        """Fault: the controller reboots by itself (watchdog, brown-out) and says so."""
        self.power_cycle()
        self.boot()

    def soft_reset(self) -> None:
        """Real-time 0x18: halt at once; a reset in motion loses position (ALARM:3/6)."""
        alarm = None
        if self.homing_end is not None:
            alarm = 6
        elif self.current is not None:
            alarm = 3
            self._halt_losing_steps()
        self.resets += 1
        keep_alarm = self._state == "Alarm" or alarm is not None
        self.queue.clear()
        self.current = None
        self.homing_end = None
        self.planned = list(self.motor)
        self.hold_pending_resume = False
        self.hold_cancels_jog = False
        self.critical = False
        self.absolute, self.inches, self.motion, self.feed_mm_min = True, False, "G0", 0.0
        self.wco_counter = self.ovr_counter = 0
        if alarm is not None:
            self._emit(f"ALARM:{alarm}")
        self._state = "Alarm" if keep_alarm else "Idle"
        self.boot()
        self.changed.set()

    def _halt_losing_steps(self) -> None:
        """Stop the step counter now; the carriage coasts on (steps lost to inertia)."""
        block = self.current
        assert block is not None
        elapsed = self.now() - block.start_time
        motor = block.motor_at(elapsed)
        velocity = block.profile.velocity_at(elapsed)
        coast = velocity * velocity / (2 * block.profile.accel)
        carriage = self._carriage_during(block, motor)
        for i in range(3):
            self.lost_mm[i] += block.unit[i] * coast
        self.motor = [self._quantize(i, m) for i, m in enumerate(motor)]
        self.carriage = list(carriage)

    # -- mechanics -------------------------------------------------------------------------

    def _steps_per_mm(self, axis: int) -> float:
        return self.settings[100 + axis]

    def _quantize(self, axis: int, mm: float) -> float:
        spm = self._steps_per_mm(axis)
        return round(mm * spm) / spm

    def _carriage_during(self, block: Block, motor: Vec3) -> Vec3:
        c = block.carriage_at_start
        b = self.backlash_mm
        return (
            backlash_follow(c[0], motor[0], b[0]),
            backlash_follow(c[1], motor[1], b[1]),
            backlash_follow(c[2], motor[2], b[2]),
        )

    def _physical_now(self) -> Vec3:
        self.advance()
        carriage: Vec3 = (self.carriage[0], self.carriage[1], self.carriage[2])
        if self.current is not None:
            block = self.current
            carriage = self._carriage_during(block, block.motor_at(self.now() - block.start_time))
        return (
            carriage[0] + self.lost_mm[0],
            carriage[1] + self.lost_mm[1],
            carriage[2] + self.lost_mm[2],
        )

    def true_position_um(self) -> tuple[float, float, float]:
        """Mechanical stage position now, in µm (machine frame), backlash and all."""
        p = self._physical_now()
        return (p[0] * 1000, p[1] * 1000, p[2] * 1000)

    @property
    def state(self) -> str:
        """GRBL's machine state now (``Idle``, ``Run``, ``Hold``, ``Jog``, ``Alarm``, ``Home``)."""
        self.advance()
        return self._state

    @property
    def is_moving(self) -> bool:
        self.advance()
        return self.current is not None or self.homing_end is not None

    def motor_position_mm(self) -> Vec3:
        """The step counter's position now (what ``MPos`` reports)."""
        self.advance()
        if self.current is None:
            return (self.motor[0], self.motor[1], self.motor[2])
        m = self.current.motor_at(self.now() - self.current.start_time)
        return (self._quantize(0, m[0]), self._quantize(1, m[1]), self._quantize(2, m[2]))

    def advance(self) -> None:
        """Bring the machine up to the current time: finish blocks, start queued ones."""
        now = self.now()
        if self.homing_end is not None and now >= self.homing_end:
            self._finish_homing()
        while self.current is not None:
            block = self.current
            end_time = block.start_time + block.profile.duration
            if now < end_time:
                return
            self.motor = list(block.end)
            self.carriage = list(self._carriage_during(block, block.end))
            self.motion_time_s += block.profile.duration
            self.current = None
            if self._state == "Hold":
                if self.hold_cancels_jog:
                    self._flush_planner()
                    self._state = "Idle"
                return
            if self.queue:
                self._start_next(end_time)
            else:
                self._state = "Idle"

    def _start_next(self, at: float) -> None:
        block = self.queue.popleft()
        block.start_time = at
        block.carriage_at_start = (self.carriage[0], self.carriage[1], self.carriage[2])
        self.current = block
        self._state = "Jog" if block.jog else "Run"

    def _flush_planner(self) -> None:
        self.queue.clear()
        self.planned = list(self.motor)
        self.hold_pending_resume = False
        self.hold_cancels_jog = False

    def seconds_until_event(self) -> float | None:
        """Wall-clock seconds until the machine changes by itself (block or homing end)."""
        self.advance()
        now = self.now()
        ends = []
        if self.current is not None:
            ends.append(self.current.start_time + self.current.profile.duration)
        if self.homing_end is not None:
            ends.append(self.homing_end)
        if not ends:
            return None
        return max(0.0, (min(ends) - now) / self.time_scale)

    def planner_used(self) -> int:
        self.advance()
        return len(self.queue) + (self.current is not None)

    # -- real-time commands ----------------------------------------------------------------

    def _decelerate(self) -> None:
        """Replace the running block by its braking ramp; the rest waits in the queue."""
        block = self.current
        assert block is not None
        elapsed = self.now() - block.start_time
        travelled = block.profile.distance_at(elapsed)
        velocity = block.profile.velocity_at(elapsed)
        remaining = block.profile.length - travelled
        braking = min(velocity * velocity / (2 * block.profile.accel), remaining)
        if braking >= remaining - 1e-12:
            return  # already braking to the end of this block
        here = block.motor_at(elapsed)
        stop = tuple(here[i] + block.unit[i] * braking for i in range(3))
        rest_length = math.dist(stop, block.end)
        rest = Block(
            (stop[0], stop[1], stop[2]), block.end, block.unit,
            plan_profile(rest_length, block.profile.v_peak, block.profile.accel),
            block.jog,
        )
        self.queue.appendleft(rest)
        ramp = Block(
            here, (stop[0], stop[1], stop[2]), block.unit,
            plan_profile(braking, velocity, block.profile.accel, v0=velocity), block.jog,
            start_time=self.now(), carriage_at_start=self._carriage_during(block, here),
        )
        self.current = ramp

    def feed_hold(self) -> None:
        """Real-time ``!``: Run decelerates to Hold:0; Jog is cancelled; Idle becomes Hold:0."""
        self.advance()
        if self._state == "Run":
            self._decelerate()
            self._state = "Hold"
            self.hold_pending_resume = True
        elif self._state == "Jog":
            self.jog_cancel()
        elif self._state == "Idle":
            self._state = "Hold"
        self.changed.set()

    def cycle_start(self) -> None:
        """Real-time ``~``: resume after a completed hold."""
        self.advance()
        if self._state != "Hold" or self.current is not None:
            return
        self.hold_pending_resume = False
        if self.queue:
            self._start_next(self.now())
        else:
            self._state = "Idle"
        self.changed.set()

    def jog_cancel(self) -> None:
        """Real-time 0x85: brake and drop every queued jog."""
        self.advance()
        if self._state != "Jog":
            return
        self._decelerate()
        self._state = "Hold"
        self.hold_cancels_jog = True
        self.changed.set()

    def status_report(self, rx_available: int) -> str | None:
        """The ``?`` answer, or None when GRBL stays silent (homing, critical alarm)."""
        self.advance()
        if self.homing_end is not None or self.critical:
            return None
        busy = self._state in ("Run", "Jog", "Hold", "Home")
        state = self._state
        if state == "Hold":
            state = "Hold:1" if self.current is not None else "Hold:0"
        mpos = self.motor_position_mm()
        mask = int(self.settings[10])
        fields = [state]
        if mask & 1:
            fields.append(f"MPos:{_axis_values(mpos)}")
        else:
            wpos = (mpos[0] - self.g54[0], mpos[1] - self.g54[1], mpos[2] - self.g54[2])
            fields.append(f"WPos:{_axis_values(wpos)}")
        if mask & 2:
            fields.append(f"Bf:{PLANNER_BLOCKS - self.planner_used()},{rx_available}")
        rate = 0.0
        if self.current is not None:
            rate = self.current.profile.velocity_at(self.now() - self.current.start_time) * 60
        fields.append(f"FS:{rate:.0f},0")
        if self.wco_counter > 0:
            self.wco_counter -= 1
        else:
            self.wco_counter = (WCO_REFRESH_BUSY if busy else WCO_REFRESH_IDLE) - 1
            if self.ovr_counter == 0:
                self.ovr_counter = 1
            fields.append(f"WCO:{_axis_values((self.g54[0], self.g54[1], self.g54[2]))}")
        if self.ovr_counter > 0:
            self.ovr_counter -= 1
        else:
            self.ovr_counter = (OVR_REFRESH_BUSY if busy else OVR_REFRESH_IDLE) - 1
            fields.append("Ov:100,100,100")
        return "<" + "|".join(fields) + ">"

    # -- line execution --------------------------------------------------------------------

    def execute_line(self, line: str) -> list[str] | Busy:
        """Run one cleaned line; return the reply lines (ending in ok/error) or why it waits."""
        self.advance()
        if self.homing_end is not None:
            return Busy.HOMING
        if line == "":
            return ["ok"]
        if line.startswith("$"):
            return self._system_command(line)
        if self._state in ("Alarm", "Jog"):
            return ["error:9"]
        return self._gcode(line, jog=False)

    def homing_finished(self) -> bool:
        self.advance()
        return self.homing_end is None

    def _homing_enabled(self) -> bool:
        return bool(self.settings[22])

    def _idle_or_alarm(self) -> bool:
        return self._state in ("Idle", "Alarm")

    def _system_command(self, line: str) -> list[str] | Busy:
        if line == "$":
            return [HELP, "ok"]
        if line == "$G":
            return [self._gcode_modes(), "ok"]
        if line == "$X":
            if self._state == "Alarm":
                self._state = "Idle"
                return [MSG_UNLOCKED, "ok"]
            return ["ok"]
        if line.startswith("$J="):
            if self._state not in ("Idle", "Jog"):
                return ["error:8"]
            return self._gcode(line[3:], jog=True)
        if not self._idle_or_alarm():
            return ["error:8"]
        if line == "$$":
            return [_format_setting(n, v) for n, v in self.settings.items()] + ["ok"]
        if line == "$#":
            return [*self._parameters(), "ok"]
        if line == "$I":
            return [f"[VER:{VERSION}.{BUILD_DATE}:]", f"[OPT:V,{PLANNER_BLOCKS},{RX_BUFFER_SIZE}]",
                    "ok"]
        if line == "$N":
            return ["$N0=", "$N1=", "ok"]
        if line == "$H":
            return self._start_homing()
        match = _SETTING.fullmatch(line)
        if match is None:
            return ["error:3"]
        return [self._write_setting(int(match[1]), match[2])]

    def _write_setting(self, number: int, text: str) -> str:
        if number not in self.settings:
            return "error:3"
        try:
            value = float(text)
        except ValueError:
            return "error:2"
        if not math.isfinite(value):
            return "error:2"
        if value < 0:
            return "error:4"
        if number == 0 and value < 3:
            return "error:6"
        if number == 20 and value and not self._homing_enabled():
            return "error:10"
        self.settings[number] = float(int(value)) if number in INTEGER_SETTINGS else value
        return "ok"

    def _parameters(self) -> list[str]:
        zero = _axis_values((0.0, 0.0, 0.0))
        lines = [f"[G54:{_axis_values((self.g54[0], self.g54[1], self.g54[2]))}]"]
        lines += [f"[G{n}:{zero}]" for n in (55, 56, 57, 58, 59, 28, 30, 92)]
        return [*lines, "[TLO:0.000]", f"[PRB:{zero}:0]"]

    def _gcode_modes(self) -> str:
        return (
            f"[GC:{self.motion} G54 G17 {'G20' if self.inches else 'G21'} "
            f"{'G90' if self.absolute else 'G91'} G94 M5 M9 T0 "
            f"F{self.feed_mm_min / (25.4 if self.inches else 1):.0f} S0]"
        )

    def _start_homing(self) -> list[str] | Busy:
        if not self._homing_enabled():
            return ["error:5"]
        physical = self._physical_now()
        seek, feed = self.settings[25] / 60, self.settings[24] / 60
        pulloff = self.settings[27]
        duration = 0.0
        for cycle in ((2,), (0, 1)):  # GRBL homes Z first, then X and Y together
            switch = [self._switch_mm(i) for i in cycle]
            seek_distance = max(abs(s - physical[i]) for s, i in zip(switch, cycle, strict=True))
            duration += seek_distance / seek + 2 * pulloff / feed + pulloff / seek
        self._state = "Home"
        self.homing_end = self.now() + duration
        return Busy.HOMING

    def _switch_mm(self, axis: int) -> float:
        homes_negative = int(self.settings[23]) & (1 << axis)
        return -self.settings[130 + axis] if homes_negative else 0.0

    def _finish_homing(self) -> None:
        pulloff = self.settings[27]
        for i in range(3):
            homes_negative = int(self.settings[23]) & (1 << i)
            home = -self.settings[130 + i] + pulloff if homes_negative else -pulloff
            self.motor[i] = self.carriage[i] = self._quantize(i, home)
            self.lost_mm[i] = 0.0
        self.planned = list(self.motor)
        self.homing_end = None
        self._state = "Idle"
        self.changed.set()

    def _gcode(self, text: str, *, jog: bool) -> list[str] | Busy:
        words: dict[str, float] = {}
        g_codes: list[float] = []
        position = 0
        while position < len(text):
            match = _WORD.match(text, position)
            if match is None:
                return ["error:1"]
            if match[2] is None:
                return ["error:2"]
            letter, value = match[1], float(match[2])
            position = match.end()
            if letter == "G":
                g_codes.append(value)
            elif letter in "FNXYZLP":
                if letter in words:
                    return ["error:25"]
                words[letter] = value
            else:
                return ["error:16" if jog else "error:20"]
        return self._execute_words(g_codes, words, jog)

    def _execute_words(
        self, g_codes: list[float], words: dict[str, float], jog: bool
    ) -> list[str] | Busy:
        allowed = {20, 21, 53, 90, 91} if jog else {0, 1, 10, 17, 20, 21, 53, 54, 80, 90, 91, 94}
        if any(g not in allowed for g in g_codes):
            return ["error:16" if jog else "error:20"]
        inches = 20 in g_codes or (21 not in g_codes and self.inches)
        absolute = 90 in g_codes or (91 not in g_codes and self.absolute)
        scale = 25.4 if inches else 1.0
        motion = "G1" if 1 in g_codes else "G0" if 0 in g_codes else self.motion
        if 80 in g_codes:
            motion = "G80"
        if 10 in g_codes:
            return [self._set_work_offset(words, scale)]
        if jog and ("L" in words or "P" in words):
            return ["error:16"]
        feed = words["F"] * scale if "F" in words else (None if jog else self.feed_mm_min)
        axes_given = [a for a in AXES if a in words]
        if jog and feed is None:
            return ["error:22"]
        if 53 in g_codes and motion not in ("G0", "G1"):
            return ["error:30"]
        target = list(self.planned)
        for i, axis in enumerate(AXES):
            if axis not in words:
                continue
            value = words[axis] * scale
            if 53 in g_codes:
                target[i] = value
            elif absolute:
                target[i] = value + self.g54[i]
            else:
                target[i] = self.planned[i] + value
            target[i] = self._quantize(i, target[i])
        if jog and not axes_given:
            return ["error:16"]
        if axes_given and motion == "G1" and not jog and not feed:
            return ["error:22"]
        if axes_given and motion == "G80":
            return ["error:31"]
        if axes_given and self.settings[20] and not self._within_travel(target):
            if jog:
                return ["error:15"]
            self._soft_limit_alarm()
            return []
        if axes_given and target != self.planned and self.planner_used() >= PLANNER_BLOCKS:
            return Busy.PLANNER_FULL
        if not jog:
            self.inches, self.absolute, self.motion = inches, absolute, motion
            if "F" in words:
                self.feed_mm_min = words["F"] * scale
        if axes_given and target != self.planned:
            rate = math.inf if (motion == "G0" and not jog) else (feed or 0.0) / 60
            self._queue_block((target[0], target[1], target[2]), rate, jog)
        return ["ok"]

    def _set_work_offset(self, words: dict[str, float], scale: float) -> str:
        mode, coord = words.get("L"), words.get("P", 0)
        if mode not in (2, 20) or coord not in (0, 1):
            return "error:20"
        for i, axis in enumerate(AXES):
            if axis in words:
                value = words[axis] * scale
                self.g54[i] = value if mode == 2 else self.planned[i] - value
        self.wco_counter = 0
        return "ok"

    def _within_travel(self, target: list[float]) -> bool:
        return all(
            -self.settings[130 + i] - 1e-9 <= target[i] <= 1e-9 for i in range(3)
        )

    def _soft_limit_alarm(self) -> None:
        """GRBL holds, resets and raises critical ALARM:2; position is kept."""
        if self.current is not None:
            here = self.current.motor_at(self.now() - self.current.start_time)
            self.carriage = list(self._carriage_during(self.current, here))
            self.motor = [self._quantize(i, m) for i, m in enumerate(here)]
        self.current = None
        self._flush_planner()
        self._state = "Alarm"
        self.critical = True
        self._emit("ALARM:2")
        self._emit(MSG_RESET_TO_CONTINUE)
        self.changed.set()

    def _queue_block(self, target: Vec3, rate_mm_s: float, jog: bool) -> None:
        start = (self.planned[0], self.planned[1], self.planned[2])
        delta = [t - s for s, t in zip(start, target, strict=True)]
        length = math.sqrt(sum(d * d for d in delta))
        unit = (delta[0] / length, delta[1] / length, delta[2] / length)
        max_rates = (self.settings[110] / 60, self.settings[111] / 60, self.settings[112] / 60)
        accels = (self.settings[120], self.settings[121], self.settings[122])
        v_max = min(rate_mm_s, axis_limited(unit, max_rates))
        profile = plan_profile(length, v_max, axis_limited(unit, accels))
        self.queue.append(Block(start, target, unit, profile, jog))
        self.planned = list(target)
        if self.current is None and self._state in ("Idle", "Run", "Jog"):
            self._start_next(self.now())
