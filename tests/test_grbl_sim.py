"""The GRBL 1.1h simulator: exact wire output (golden lines from protocols.md §1) over TCP and
a pty, and the stage physics (trapezoids, backlash, hold, reset in motion) on a fake clock."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.serial_link import SerialLink
from firmware_sim.grbl import serve
from firmware_sim.grbl_machine import GRBL_DEFAULTS, Busy, GrblMachine
from firmware_sim.grbl_motion import move_time
from firmware_sim.link import Endpoint, SimulatorServer

GOLDEN_BANNER = b"\r\nGrbl 1.1h ['$' for help]\r\n"
GOLDEN_IDLE = b"<Idle|MPos:0.000,0.000,0.000|FS:0,0|WCO:0.000,0.000,0.000>\r\n"
GOLDEN_BUILD = b"[VER:1.1h.20190830:]\r\n[OPT:V,15,128]\r\nok\r\n"
GOLDEN_HELP = b"[HLP:$$ $# $G $I $N $x=val $Nx=line $J=line $SLP $C $X $H ~ ! ? ctrl-x]\r\n"
UNLOCK_HINT = b"[MSG:'$H'|'$X' to unlock]\r\n"


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@contextlib.asynccontextmanager
async def wire(machine: GrblMachine, where: str = "tcp://127.0.0.1:0") -> AsyncIterator[SerialLink]:
    async with (
        SimulatorServer(serve(machine), Endpoint.parse(where)) as server,
        SerialLink.open(server.address) as link,
    ):
        # the serial session starts with a power-up: the banner comes first
        assert await link.read_exactly(len(GOLDEN_BANNER), timeout=5) == GOLDEN_BANNER
        if machine.settings[22]:
            assert await lines(link, 1) == [UNLOCK_HINT]
        yield link


async def lines(link: SerialLink, count: int) -> list[bytes]:
    return [await link.read_until(b"\r\n", timeout=5) for _ in range(count)]


def no_homing() -> GrblMachine:
    return GrblMachine(GRBL_DEFAULTS, time_scale=50)


async def test_golden_status_build_info_and_help() -> None:
    async with wire(no_homing()) as link:
        await link.write(b"?")
        assert await lines(link, 1) == [GOLDEN_IDLE]
        await link.write(b"?")  # Ov follows one report after WCO, then neither for a while
        assert await lines(link, 1) == [b"<Idle|MPos:0.000,0.000,0.000|FS:0,0|Ov:100,100,100>\r\n"]
        await link.write(b"?")
        assert await lines(link, 1) == [b"<Idle|MPos:0.000,0.000,0.000|FS:0,0>\r\n"]
        await link.write(b"$I\n$\n")
        assert b"".join(await lines(link, 5)) == GOLDEN_BUILD + GOLDEN_HELP + b"ok\r\n"
        await link.write(b"$G\n$#\n")
        replies = await lines(link, 14)
        assert replies[0] == b"[GC:G0 G54 G17 G21 G90 G94 M5 M9 T0 F0 S0]\r\n"
        assert replies[2] == b"[G54:0.000,0.000,0.000]\r\n"
        assert replies[-2:] == [b"[PRB:0.000,0.000,0.000:0]\r\n", b"ok\r\n"]


async def test_settings_dump_and_writes() -> None:
    async with wire(no_homing()) as link:
        await link.write(b"$$\n")
        dump = await lines(link, len(GRBL_DEFAULTS) + 1)
        assert dump[0] == b"$0=10\r\n" and dump[-1] == b"ok\r\n"
        assert b"$110=500.000\r\n" in dump and b"$11=0.010\r\n" in dump
        await link.write(b"$110=800\n$999=1\n$110=-5\n$110=abc\n$20=1\n$Q\n")
        assert await lines(link, 6) == [b"ok\r\n", b"error:3\r\n", b"error:4\r\n",
                                        b"error:2\r\n", b"error:10\r\n", b"error:3\r\n"]
        await link.write(b"$$\n")
        assert b"$110=800.000\r\n" in await lines(link, len(GRBL_DEFAULTS) + 1)


async def test_boots_in_alarm_with_homing_and_unlocks() -> None:
    machine = GrblMachine(time_scale=200)
    async with wire(machine) as link:  # checks the unlock hint after the banner
        await link.write(b"G0X-1\n?")
        replies = await lines(link, 2)
        assert replies[0] == b"error:9\r\n" and replies[1].startswith(b"<Alarm|")
        await link.write(b"$X\n")
        assert await lines(link, 2) == [b"[MSG:Caution: Unlocked]\r\n", b"ok\r\n"]
        await link.write(b"$H\n")
        assert await lines(link, 1) == [b"ok\r\n"]
        assert machine.state == "Idle"
        assert machine.motor_position_mm() == (-0.5, -0.5, -0.5)  # pull-off $27 from the switch


async def test_homing_disabled_is_error_5() -> None:
    async with wire(no_homing()) as link:
        await link.write(b"$H\n")
        assert await lines(link, 1) == [b"error:5\r\n"]


async def test_line_limit_is_79_significant_characters() -> None:
    async with wire(no_homing()) as link:
        line79 = "G0X" + "0" * 76
        await link.write(line79.encode() + b"\n")
        assert await lines(link, 1) == [b"ok\r\n"]
        await link.write(line79.encode() + b"0\n")
        assert await lines(link, 1) == [b"error:11\r\n"]
        # spaces and comments do not count
        await link.write(b"g0 x" + b"0 " * 76 + b"(comment) ; more\n")
        assert await lines(link, 1) == [b"ok\r\n"]


async def test_realtime_bytes_are_filtered_out_of_a_line() -> None:
    machine = no_homing()
    async with wire(machine) as link:
        await link.write(b"G0X-1?.5\n")
        replies = await lines(link, 2)
        assert replies[0].startswith(b"<") and replies[1] == b"ok\r\n"
        assert machine.planned == [-1.5, 0.0, 0.0]


async def test_errors_for_bad_gcode_and_jogs() -> None:
    machine = GrblMachine({**GRBL_DEFAULTS, 22: 1, 20: 1}, time_scale=200)
    async with wire(machine) as link:
        await link.write(b"$X\nM3S100\nG1X-1\nX\nG0X--1\n$J=X-1\n$J=G91X-1F100M3\n")
        assert await lines(link, 8) == [
            b"[MSG:Caution: Unlocked]\r\n", b"ok\r\n", b"error:20\r\n", b"error:22\r\n",
            b"error:2\r\n", b"error:2\r\n", b"error:22\r\n", b"error:16\r\n"]
        await link.write(b"$J=G91X-300F100\n")  # beyond travel: rejected, no alarm
        assert await lines(link, 1) == [b"error:15\r\n"]
        await link.write(b"$J=G91X1F100\n")  # 0 is the top of the travel
        assert await lines(link, 1) == [b"error:15\r\n"]
        assert machine.state == "Idle"


async def test_move_beyond_travel_is_a_critical_alarm_until_reset() -> None:
    machine = GrblMachine({**GRBL_DEFAULTS, 22: 1, 20: 1}, time_scale=200)
    async with wire(machine) as link:
        await link.write(b"$X\nG0X-300\n")
        assert await lines(link, 4) == [b"[MSG:Caution: Unlocked]\r\n", b"ok\r\n",
                                        b"ALARM:2\r\n", b"[MSG:Reset to continue]\r\n"]
        # silent until reset: no status report, the queued line is not executed
        await link.write(b"?G0X-1\n\x18")
        assert await link.read_exactly(len(GOLDEN_BANNER), timeout=5) == GOLDEN_BANNER
        assert await lines(link, 1) == [UNLOCK_HINT]
        assert machine.planned == [0.0, 0.0, 0.0]


async def test_rx_buffer_drops_bytes_beyond_127_while_the_planner_is_full() -> None:
    machine = GrblMachine(GRBL_DEFAULTS, time_scale=0.01)  # motion crawls: the planner stays full
    async with wire(machine) as link:
        await link.write(b"".join(b"G0X-%d\n" % (i + 1) for i in range(16)))
        assert await lines(link, 15) == [b"ok\r\n"] * 15  # the 16th line waits for a block
        await link.write(b"G0X-20\n" * 30 + b"$10=3\n")
        await link.write(b"?")
        report = await link.read_until(b"\r\n", timeout=5)
        assert b"|Bf:" not in report or b"Bf:0," in report
        assert machine.max_rx_used == 127
        assert machine.rx_overflows > 0
        await link.write(b"\x18")  # leave nothing running


async def test_spurious_reset_reboots_with_counters_at_zero() -> None:
    machine = GrblMachine(time_scale=200)
    async with wire(machine) as link:
        await link.write(b"$H\n")
        assert await lines(link, 1) == [b"ok\r\n"]
        before = machine.true_position_um()
        machine.spurious_reset()
        assert b"".join(await lines(link, 3)) == GOLDEN_BANNER + UNLOCK_HINT
        assert machine.motor_position_mm() == (0.0, 0.0, 0.0)
        assert machine.true_position_um() == pytest.approx(before)


async def test_pty_serves_the_same_protocol() -> None:
    async with wire(no_homing(), "pty") as link:
        await link.write(b"\x18")
        assert await link.read_exactly(len(GOLDEN_BANNER), timeout=5) == GOLDEN_BANNER
        await link.write(b"$I\n")
        assert b"".join(await lines(link, 3)) == GOLDEN_BUILD


def test_cli_serves_grbl_on_tcp() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "medge.cli", "sim", "grbl", "--listen", "tcp://127.0.0.1:0",
         "--no-homing"], stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()
        assert address.startswith("socket://127.0.0.1:")

        async def talk() -> bytes:
            async with SerialLink.open(address) as link:
                return await link.read_exactly(len(GOLDEN_BANNER), timeout=10)

        assert asyncio.run(talk()) == GOLDEN_BANNER
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_cli_help_documents_the_options() -> None:
    out = subprocess.run([sys.executable, "-m", "medge.cli", "sim", "grbl", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for option in ("--homing", "--no-homing", "--backlash-um", "--time-scale", "--setting",
                   "--spurious-reset-every", "--pty", "--listen"):
        assert option in out


# -- physics on a fake clock -----------------------------------------------------------------


def rig(clock: FakeClock, backlash_um: float = 20.0) -> GrblMachine:
    machine = GrblMachine({**GRBL_DEFAULTS, 100: 1000, 101: 1000, 102: 1000},
                          backlash_um=(backlash_um,) * 3, clock=clock)
    return machine


def test_trapezoid_timing_and_position_along_the_move() -> None:
    clock = FakeClock()
    machine = rig(clock)
    assert machine.execute_line("G0X-10Y-5") == ["ok"]
    duration = move_time((0, 0, 0), (-10, -5, 0), (500, 500, 500), (10, 10, 10))
    clock.t = duration / 2  # symmetric profile: half way at half time
    x, y, _ = machine.motor_position_mm()
    assert (x, y) == pytest.approx((-5.0, -2.5), abs=0.002)
    assert machine.is_moving and machine.state == "Run"
    clock.t = duration - 1e-6
    assert machine.is_moving
    clock.t = duration
    assert not machine.is_moving and machine.state == "Idle"
    assert machine.motor_position_mm() == (-10.0, -5.0, 0.0)


def test_backlash_lags_on_reversal_only() -> None:
    clock = FakeClock()
    machine = rig(clock, backlash_um=30)
    for line, true_x in [("G0X-2", -1970.0), ("G0X-3", -2970.0), ("G0X-1", -1000.0),
                         ("G0X-0.5", -500.0), ("G0X-0.51", -500.0), ("G0X-0.49", -490.0),
                         ("G0X-0.45", -450.0)]:
        machine.execute_line(line)
        clock.t += 100
        assert machine.true_position_um()[0] == pytest.approx(true_x), line


def test_true_position_follows_the_motion_in_progress() -> None:
    clock = FakeClock()
    machine = rig(clock, backlash_um=0)
    machine.execute_line("G0X-1")
    samples = []
    for step in range(1, 10):
        clock.t = step * 0.1
        samples.append(machine.true_position_um()[0])
    assert all(a >= b for a, b in itertools.pairwise(samples))
    assert samples[0] > -1000 and samples[-1] == pytest.approx(-1000)


def test_feed_hold_brakes_and_resume_finishes() -> None:
    clock = FakeClock()
    machine = rig(clock)
    machine.execute_line("G0X-100")
    clock.t = 3.0  # cruising at 500 mm/min
    machine.feed_hold()
    assert machine.status_report(128).startswith("<Hold:1|")  # type: ignore[union-attr]
    braking = (500 / 60) ** 2 / (2 * 10)
    x_hold = machine.motor_position_mm()[0]
    clock.t = 3.0 + 500 / 60 / 10  # v / a later the hold is complete
    assert machine.status_report(128).startswith("<Hold:0|")  # type: ignore[union-attr]
    assert machine.motor_position_mm()[0] == pytest.approx(x_hold - braking, abs=0.002)
    clock.t += 100
    assert machine.state == "Hold"  # stays held until ~
    machine.cycle_start()
    clock.t += 100
    assert machine.state == "Idle" and machine.motor_position_mm()[0] == -100.0


def test_reset_in_motion_raises_alarm_3_and_loses_steps() -> None:
    clock = FakeClock()
    machine = rig(clock, backlash_um=0)
    out: list[str] = []
    machine.attach(out.append)
    machine.execute_line("G0X-20")
    clock.t = 3.0
    machine.soft_reset()
    assert out[:3] == ["ALARM:3", "", "Grbl 1.1h ['$' for help]"]
    assert machine.state == "Alarm" and not machine.is_moving
    mpos_um = machine.motor_position_mm()[0] * 1000
    assert machine.true_position_um()[0] < mpos_um - 100  # the carriage coasted on
    machine.soft_reset()  # a reset at rest keeps the position, no alarm
    assert out.count("ALARM:3") == 1


def test_planner_holds_15_blocks() -> None:
    clock = FakeClock()
    machine = rig(clock)
    for i in range(15):
        assert machine.execute_line(f"G0X-{i + 1}") == ["ok"]
    assert machine.execute_line("G0X-20") is Busy.PLANNER_FULL
    machine.settings[10] = 3
    assert "|Bf:0,100|" in machine.status_report(100)  # type: ignore[operator]
    clock.t = 1000
    assert machine.execute_line("G0X-20") == ["ok"]


def test_jog_cancel_brakes_and_flushes() -> None:
    clock = FakeClock()
    machine = rig(clock)
    assert machine.execute_line("$J=G91X-50F500") == ["ok"]
    assert machine.execute_line("$J=G91X-50F500") == ["ok"]
    assert machine.execute_line("G0X-1") == ["error:9"]
    clock.t = 2.0
    machine.jog_cancel()
    clock.t = 10.0
    assert machine.state == "Idle" and not machine.queue
    assert -50 < machine.motor_position_mm()[0] < 0


def test_machine_rejects_bad_construction() -> None:
    with pytest.raises(ValueError, match="time_scale"):
        GrblMachine(time_scale=0)
    with pytest.raises(ValueError, match="backlash"):
        GrblMachine(backlash_um=(-1, 0, 0))
    assert math.isfinite(GrblMachine().now())


LAST_REPLIES = {"ok", *(f"error:{n}" for n in range(1, 40))}


@given(st.text(alphabet="GMXYZFNLPJ$=.-+0123456789 ;()", max_size=79))
def test_any_line_gets_a_reply_or_waits(line: str) -> None:
    clock = FakeClock()
    machine = GrblMachine({22: 0, 20: 0}, clock=clock)
    cleaned = "".join(c for c in line if c != " ")
    result = machine.execute_line(cleaned)
    assert isinstance(result, Busy) or machine.critical or result[-1] in LAST_REPLIES


async def test_spurious_reset_fault_from_the_command_line() -> None:
    from firmware_sim import grbl

    parser = argparse.ArgumentParser()
    grbl.add_arguments(parser)
    args = parser.parse_args(["--spurious-reset-every", "0.05", "--time-scale", "10"])
    grbl.create(args)
    machine: GrblMachine = args.grbl_machine
    task = asyncio.create_task(grbl.background(args, None))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(5):
            while machine.resets < 2:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
