"""GrblStage against the GRBL simulator (and scripted fake devices) for every behaviour of
the driver, faults included. Motion runs faster than real time (``time_scale``); every wait is
on a condition with a timeout."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from drivers.grbl import GrblConfig, GrblStage
from drivers.grbl_protocol import GrblAlarm, GrblError, LineTooLong, NotGrblError
from drivers.stage import (
    Backlash,
    PositionLostError,
    SoftLimitError,
    StageDisconnected,
    StageError,
    StageTimeout,
)
from firmware_sim.grbl import serve
from firmware_sim.grbl_machine import GrblMachine
from firmware_sim.link import DeviceLink, Endpoint, Faults, HostDisconnected, SimulatorServer

FAST = GrblConfig(poll_hz=20, settle_poll_hz=100, reply_timeout_s=1.0, banner_timeout_s=0.3,
                  reconnect_min_s=0.05, reconnect_max_s=0.2)


@contextlib.asynccontextmanager
async def rig(
    time_scale: float = 20.0,
    backlash: Backlash | None = None,
    config: GrblConfig = FAST,
    where: str = "tcp://127.0.0.1:0",
    faults: Faults | None = None,
    backlash_um: float = 20.0,
) -> AsyncIterator[tuple[GrblStage, GrblMachine, Faults]]:
    machine = GrblMachine(time_scale=time_scale, backlash_um=(backlash_um,) * 3)
    faults = faults or Faults()
    async with SimulatorServer(serve(machine), Endpoint.parse(where), faults) as server:
        stage = GrblStage(server.address, config, backlash)
        await stage.connect()
        try:
            yield stage, machine, faults
        finally:
            await stage.close()


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def underway(stage: GrblStage) -> bool:
    """Running and a good way along (past the backlash pre-position)."""
    return stage.status is not None and stage.status.state == "Run" and stage.position_um.x < -3000


async def start_long_move(stage: GrblStage) -> None:
    await stage.home()
    await stage.move_to(x=-30000, wait=False)
    await eventually(lambda: underway(stage))


async def fake_device(script: Callable[[DeviceLink], Awaitable[None]]) -> SimulatorServer:
    async def handler(link: DeviceLink) -> None:
        with contextlib.suppress(HostDisconnected):
            await script(link)

    return SimulatorServer(handler, Endpoint.parse("tcp://127.0.0.1:0"))


# -- start-up ------------------------------------------------------------------------------


async def test_connect_reads_build_info_settings_and_state() -> None:
    async with rig() as (stage, _machine, _):
        assert stage.build is not None and stage.build.version == "1.1h.20190830"
        assert stage.rx_buffer_bytes == 128
        assert stage.settings[110] == 600.0 and stage.settings[22] == 1
        assert stage.status is not None and stage.status.state == "Alarm"
        assert stage.position_lost  # homing enabled and not homed yet
        assert stage.limits_um == ((-75000.0, -50000.0, -10000.0), (0.0, 0.0, 0.0))
        with pytest.raises(PositionLostError):
            await stage.move_to(x=-1000)
        await stage.home()
        assert not stage.position_lost
        assert stage.position_um == (-500.0, -500.0, -500.0)


async def test_connect_over_a_pty() -> None:
    async with rig(where="pty") as (stage, _machine, _):
        await stage.home()
        await stage.move_to(-1000, -1000, -1000)
        assert stage.position_um == (-1000.0, -1000.0, -1000.0)


SETTINGS = {10: 1, 13: 0, 20: 0, 22: 0, 110: 500, 111: 500, 112: 500, 120: 10, 121: 10,
            122: 10, 130: 200, 131: 200, 132: 200}


async def test_without_a_banner_the_driver_soft_resets() -> None:
    machine = GrblMachine(time_scale=20)
    async with SimulatorServer(serve(machine), Endpoint.parse("pty")) as server:
        async with GrblStage(server.address, FAST) as stage:
            await stage.home()
        resets = machine.resets
        async with GrblStage(server.address, FAST) as stage:  # same session: no power-up banner
            assert machine.resets == resets + 1  # woken with "\r\n\r\n" + Ctrl-X
            assert stage.status is not None and stage.status.state == "Idle"
            assert stage.position_lost  # a new connection never trusts the old position


class ScriptedGrbl:
    """A minimal GRBL answering with the reference's golden lines and a 64-byte RX buffer.

    With ``hold_settings`` it never acknowledges a settings write (an EEPROM write that takes
    forever) and records every line that arrives meanwhile."""

    def __init__(self, hold_settings: bool = False) -> None:
        self.hold_settings = hold_settings
        self.holding = asyncio.Event()
        self.while_held: list[bytes] = []

    async def __call__(self, link: DeviceLink) -> None:
        await link.write(b"\r\nGrbl 1.1h ['$' for help]\r\n")
        buffer = b""
        while True:
            buffer += await link.read()
            while b"?" in buffer:
                buffer = buffer.replace(b"?", b"", 1)
                await link.write(b"<Hold:0|WPos:1.000,2.000,3.000|Bf:15,64|Ln:7|FS:0,0|Pn:P|"
                                 b"WCO:-1.000,-1.000,-1.000|Ov:100,100,100|A:F>\r\n")
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                await self._answer(link, line)

    async def _answer(self, link: DeviceLink, line: bytes) -> None:
        if self.holding.is_set():
            self.while_held.append(line)
        elif line == b"$I":
            await link.write(b"[VER:1.1h.20190830:]\r\n[OPT:V,15,64]\r\nok\r\n")
        elif line == b"$$":
            await link.write(b"".join(b"$%d=%d\r\n" % (n, v) for n, v in SETTINGS.items())
                             + b"ok\r\n")
        elif self.hold_settings and line.startswith(b"$110="):
            self.holding.set()
        else:
            await link.write(b"ok\r\n")


async def test_golden_lines_from_a_scripted_controller() -> None:
    async with await fake_device(ScriptedGrbl()) as server:
        async with GrblStage(server.address, FAST) as stage:
            assert stage.rx_buffer_bytes == 64  # from [OPT:V,15,64]
            assert stage.settings == SETTINGS
            status = stage.status
            assert status is not None
            assert (status.state, status.substate, status.line_number) == ("Hold", 0, 7)
            assert status.mpos == (0.0, 1.0, 2.0)  # WPos + WCO
            assert status.pins == "P" and status.accessories == "F"
            assert stage.position_um == (0.0, 1000.0, 2000.0)
            assert not stage.position_lost  # homing disabled: nothing to lose
            assert stage.limits_um is None


async def test_a_settings_write_is_sent_alone() -> None:
    device = ScriptedGrbl(hold_settings=True)
    async with await fake_device(device) as server:
        async with GrblStage(server.address, GrblConfig(reply_timeout_s=0.5)) as stage:
            write = asyncio.create_task(stage.set_setting(110, 800))
            await device.holding.wait()
            move = asyncio.create_task(stage.stream(["G0X1"]))
            with pytest.raises(StageTimeout):
                await write  # never acknowledged
            with pytest.raises(StageDisconnected):
                await move
            assert device.while_held == []  # nothing was sent behind the settings write


async def test_refuses_a_device_that_is_not_grbl() -> None:
    async def marlin(link: DeviceLink) -> None:
        await link.write(b"start\r\nMarlin 2.1.2\r\n")
        while True:
            await link.read()
            await link.write(b"echo:Unknown command\r\n")

    async with await fake_device(marlin) as server:
        with pytest.raises(NotGrblError, match="no GRBL 1.1 banner.*Marlin"):
            await GrblStage(server.address, FAST).connect()


async def test_refuses_grbl_0_9_and_newline_free_garbage() -> None:
    async def old(link: DeviceLink) -> None:
        await link.write(b"\r\nGrbl 0.9j ['$' for help]\r\n")
        await link.read()

    async def noise(link: DeviceLink) -> None:
        await link.write(bytes(range(14, 250)) * 4)
        await link.read()

    async with await fake_device(old) as server:
        with pytest.raises(NotGrblError, match=r"0\.9j is not supported"):
            await GrblStage(server.address, FAST).connect()
    async with await fake_device(noise) as server:
        with pytest.raises(NotGrblError):
            await GrblStage(server.address, FAST).connect()


async def test_unreachable_device_is_a_typed_error() -> None:
    with pytest.raises(StageDisconnected, match="socket://127.0.0.1:1"):
        await GrblStage("socket://127.0.0.1:1", FAST).connect()


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="poll_hz"):
        GrblConfig(poll_hz=0)
    with pytest.raises(ValueError, match="settle_s"):
        GrblConfig(settle_s=-1)
    assert GrblConfig().poll_hz == 5.0


# -- motion --------------------------------------------------------------------------------


async def test_absolute_and_relative_moves_reach_their_targets() -> None:
    async with rig() as (stage, machine, _):
        await stage.home()
        await stage.move_to(-2000, -3000, -1500)
        assert stage.position_um == (-2000.0, -3000.0, -1500.0)
        await stage.move_by(dx=-250, dz=100)
        assert stage.position_um == (-2250.0, -3000.0, -1400.0)
        assert machine.true_position_um() == pytest.approx((-2250.0, -3000.0, -1400.0))
        assert not machine.is_moving


async def test_homing_may_outlast_the_reply_timeout() -> None:
    """GRBL sends no status reports while homing; that silence is not a hang."""
    config = GrblConfig(poll_hz=20, reply_timeout_s=0.3, homing_timeout_s=30)
    async with rig(time_scale=1, config=config) as (stage, machine, _):
        started = machine.now()
        await stage.home()
        assert machine.now() - started > 1.0  # real-time homing: ~1.3 s of silence
        assert not stage.position_lost and stage.connection_losses == 0


async def test_soft_limits_are_checked_before_sending() -> None:
    async with rig() as (stage, machine, _):
        await stage.home()
        planned = list(machine.planned)
        with pytest.raises(SoftLimitError, match="x = 100.0 µm is outside"):
            await stage.move_to(x=100)
        with pytest.raises(SoftLimitError, match="z"):
            await stage.move_by(dz=-20000)
        with pytest.raises(SoftLimitError):
            await stage.jog_by(dy=-60000, speed_um_s=1000)
        with pytest.raises(ValueError, match="finite"):
            await stage.move_to(x=float("nan"))
        assert machine.planned == planned and machine.state == "Idle"


async def test_backlash_compensation_removes_the_backlash() -> None:
    """Visit one target from above and from below; measure where the carriage really is."""

    async def landings(backlash: Backlash) -> list[float]:
        async with rig(backlash=backlash, backlash_um=20) as (stage, machine, _):
            await stage.home()
            found = []
            for start in (-3000, -1000, -3000, -1000):
                await stage.move_to(x=start)
                await stage.move_to(x=-2000)
                found.append(machine.true_position_um()[0])
            return found

    compensated = await landings(Backlash())
    assert max(compensated) - min(compensated) < 1.0
    assert compensated[0] == pytest.approx(-2000.0, abs=1.0)
    uncompensated = await landings(Backlash.off())
    assert max(uncompensated) - min(uncompensated) == pytest.approx(20.0, abs=1.0)


async def test_jog_and_jog_cancel() -> None:
    async with rig(time_scale=2) as (stage, machine, _):
        await stage.home()
        await stage.jog_by(dx=-20000, speed_um_s=5000)
        await eventually(lambda: stage.status is not None and stage.status.state == "Jog")
        await stage.stop()
        await stage.wait_until_idle(timeout=5)
        x = stage.position_um.x
        assert -20000 < x < -500
        assert not machine.queue


async def test_feed_hold_and_resume() -> None:
    async with rig(time_scale=2) as (stage, machine, _):
        await start_long_move(stage)
        await stage.feed_hold()
        await eventually(lambda: stage.status is not None and stage.status.state == "Hold"
                         and stage.status.substate == 0)
        held = machine.true_position_um()[0]
        assert -30000 < held < -500
        await stage.resume()
        await stage.wait_until_idle(timeout=20)
        assert stage.position_um.x == -30000.0


async def test_status_reports_interleave_with_acknowledgements() -> None:
    async with rig(time_scale=5, config=GrblConfig(poll_hz=200, reply_timeout_s=1.0)) as (
        stage, machine, _
    ):
        await stage.home()
        seq = stage._status_seq
        await stage.stream(f"G1X-{(i % 5) / 10 + 1:.1f}F3000" for i in range(40))
        await stage.wait_until_idle(timeout=30)
        assert stage._status_seq > seq + 5
        assert machine.planned == [-1.4, -0.5, -0.5]


async def test_character_counting_never_overflows_the_rx_buffer() -> None:
    async with rig(time_scale=10) as (stage, machine, _):
        await stage.home()
        machine.max_rx_used = 0
        await stage.stream(f"G1X-{1 + (i % 2) / 100:.2f}F6000 (counted)" for i in range(150))
        await stage.wait_until_idle(timeout=60)
        assert machine.rx_overflows == 0
        assert 60 < machine.max_rx_used <= 127  # the buffer really filled, and never spilled


async def test_stop_during_a_move_keeps_the_position() -> None:
    async with rig(time_scale=2) as (stage, _machine, _):
        await start_long_move(stage)
        await stage.stop()
        assert not stage.position_lost
        await stage.wait_until_idle(timeout=5)
        await stage.move_to(x=-1000)
        assert stage.position_um.x == -1000.0


# -- errors and alarms -----------------------------------------------------------------------


async def test_error_codes_become_typed_errors_with_their_meaning() -> None:
    async with rig() as (stage, _machine, _):
        await stage.home()
        with pytest.raises(GrblError, match="error:20 for 'M3S100'") as info:
            await stage.stream(["G0X-1", "M3S100", "G0X-2"])
        assert info.value.code == 20 and "unsupported" in info.value.meaning
        await stage.wait_until_idle(timeout=5)
        with pytest.raises(GrblError) as jog:
            await stage.stream(["$J=G91X-1"])
        assert jog.value.code == 22
        with pytest.raises(LineTooLong):
            await stage.stream(["G0X" + "0" * 77])
        with pytest.raises(GrblError) as setting:
            await stage.set_setting(999, 1)
        assert setting.value.code == 3


async def test_settings_are_written_one_at_a_time() -> None:
    async with rig() as (stage, machine, _):
        await stage.set_setting(110, 800)
        assert stage.settings[110] == 800.0 and machine.settings[110] == 800.0


async def test_gcode_in_alarm_is_refused_and_unlock_keeps_position_lost() -> None:
    async with rig() as (stage, _machine, _):
        with pytest.raises(GrblError) as locked:
            await stage.stream(["G0X-1"])
        assert locked.value.code == 9
        await stage.unlock()
        assert stage.status is not None and stage.status.state == "Idle"
        assert stage.position_lost  # unlocking is not homing
        with pytest.raises(PositionLostError):
            await stage.move_by(dx=-10)


async def test_soft_limit_alarm_is_reset_and_unlocked() -> None:
    async with rig() as (stage, _machine, _):
        await stage.home()
        with pytest.raises(GrblAlarm) as alarm:
            await stage.stream(["G0X-100"])  # bypasses the driver's own check
            await stage.wait_until_idle(timeout=5)
        assert alarm.value.code == 2 and not alarm.value.position_lost
        assert not stage.position_lost
        await stage.unlock()  # soft reset (critical alarm), then $X
        await stage.move_to(x=-1000)
        assert stage.position_um.x == -1000.0


async def test_reset_during_motion_loses_the_position_until_rehomed() -> None:
    async with rig(time_scale=2) as (stage, machine, _):
        await start_long_move(stage)
        await stage.soft_reset()
        await eventually(lambda: stage.alarm is not None)
        assert stage.alarm is not None and stage.alarm.code == 3
        assert stage.position_lost
        with pytest.raises(PositionLostError):
            await stage.move_to(x=-1000)
        assert abs(machine.true_position_um()[0] - stage.position_um.x) > 10  # steps lost
        await stage.home()
        await stage.move_to(x=-1000)
        assert machine.true_position_um()[0] == pytest.approx(-1000.0, abs=1)


async def test_spurious_reboot_marks_the_position_lost() -> None:
    async with rig() as (stage, machine, _):
        await stage.home()
        await stage.move_to(x=-2000)
        machine.spurious_reset()
        await eventually(lambda: stage.position_lost)
        with pytest.raises(PositionLostError):
            await stage.move_to(x=-1000)


# -- link faults -----------------------------------------------------------------------------


async def test_unplug_and_replug_reconnects_and_distrusts_the_position() -> None:
    async with rig() as (stage, _machine, faults):
        await stage.home()
        await stage.move_to(x=-2000)
        faults.disconnect()
        await eventually(lambda: stage.connection_losses == 1)
        assert stage.position_lost
        await stage.wait_connected(timeout=5)
        assert stage.position_lost
        with pytest.raises(PositionLostError):
            await stage.move_to(x=-1000)
        await stage.home()
        await stage.move_to(x=-1000)
        assert stage.position_um.x == -1000.0


async def test_commands_while_unplugged_fail_fast() -> None:
    config = GrblConfig(poll_hz=20, reply_timeout_s=1.0, reconnect=False)
    async with rig(config=config) as (stage, _machine, faults):
        faults.disconnect()
        await eventually(lambda: stage.connection_losses == 1)
        with pytest.raises(StageDisconnected):
            await stage.set_setting(110, 700)
        with pytest.raises(StageDisconnected):
            await stage.feed_hold()


async def test_stalled_replies_time_out_then_the_driver_recovers() -> None:
    async with rig() as (stage, machine, _):
        await stage.home()
        machine.stall_replies()
        with pytest.raises(StageTimeout, match="silent"):
            await stage.wait_until_idle()
        assert stage.connection_losses == 1 and stage.position_lost
        machine.stall_replies(False)
        await stage.wait_connected(timeout=10)
        await stage.home()
        await stage.move_to(y=-1000)
        assert stage.position_um.y == -1000.0


async def test_a_reader_failing_unexpectedly_drops_the_link_and_reconnects(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Chaos found a reader killed by an exception it did not expect (a connection reset): the
    link then went unread and the reconnection died re-raising it; the stage never came back."""
    async with rig() as (stage, _machine, _):
        await stage.home()
        dispatch = stage._dispatch

        def fail_once(line: str) -> None:
            monkeypatch.setattr(stage, "_dispatch", dispatch)
            raise RuntimeError("unforeseen")

        monkeypatch.setattr(stage, "_dispatch", fail_once)
        await eventually(lambda: stage.connection_losses == 1)
        await stage.wait_connected(timeout=10)
        assert stage.position_lost
        await stage.home()
        await stage.move_to(x=-1000)
        assert stage.position_um.x == -1000.0


async def test_hung_link_times_out() -> None:
    async with rig() as (stage, _machine, faults):
        faults.stall()
        with pytest.raises(StageTimeout):
            await stage.set_setting(110, 700)
        faults.stall(False)
        await stage.wait_connected(timeout=10)


async def test_corrupted_bytes_give_typed_errors_never_a_hang() -> None:
    faults = Faults(seed=7)
    async with rig(faults=faults) as (stage, _machine, _):
        await stage.home()
        faults.corrupt_rate = 0.01
        outcomes = []
        for i in range(20):
            try:
                async with asyncio.timeout(10):
                    if stage.position_lost:
                        await stage.wait_connected(timeout=5)
                        await stage.home()
                    await stage.move_to(x=-1000 - 100 * i)
                outcomes.append("ok")
            except StageError as exc:
                outcomes.append(type(exc).__name__)
        assert len(outcomes) == 20
        assert stage.unparsed_lines > 0  # the faults were real
        assert outcomes.count("ok") >= 5  # and the driver kept recovering from them
