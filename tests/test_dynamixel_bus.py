"""The Dynamixel driver against the simulated bus: transactions, errors, retries, watchdog."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from drivers.dynamixel import (
    XM430,
    DynamixelBus,
    DynamixelChain,
    DynamixelLinkError,
    DynamixelTimeout,
    ServoStatusError,
    ticks_to_rad,
)
from drivers.dynamixel_protocol import (
    BROADCAST_ID,
    CrcMismatch,
    Instruction,
    StatusErrorCode,
    encode_instruction,
    sync_read_params,
    sync_write_params,
)
from drivers.force_sensor import parse_line
from drivers.serial_link import SerialLink
from firmware_sim.dynamixel import (
    HW_OVERHEATING,
    HW_OVERLOAD,
    STALL_TORQUE_NM,
    UART_FIFO_BYTES,
    DynamixelSim,
    MotionLogFile,
)
from firmware_sim.link import Faults

IDS = [1, 2, 3, 4, 5]


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


@asynccontextmanager
async def rig(
    where: str = "tcp://127.0.0.1:0", faults: Faults | None = None, retries: int = 2
) -> AsyncIterator[tuple[DynamixelSim, DynamixelBus]]:
    sim = DynamixelSim(IDS)
    for servo in sim.servos:
        servo.table[9] = 0  # return delay 0, as medge configures real servos
    async with sim.serving(where, faults) as server, SerialLink.open(server.address) as link:
        yield sim, DynamixelBus(link, timeout_s=0.2, retries=retries)


@pytest.mark.parametrize("where", ["tcp://127.0.0.1:0", "pty"])
async def test_ping_read_write(where: str) -> None:
    async with rig(where) as (sim, bus):
        assert await bus.ping(3) == (1020, 46)
        await bus.write(3, XM430.RETURN_DELAY_TIME, 10)
        assert await bus.read(3, XM430.RETURN_DELAY_TIME) == 10
        assert sim.servo(3).return_delay_s == pytest.approx(20e-6)


async def test_eeprom_locked_while_torque_on() -> None:
    async with rig() as (_sim, bus):
        await bus.write(2, XM430.TORQUE_ENABLE, 1)
        with pytest.raises(ServoStatusError) as caught:
            await bus.write(2, XM430.OPERATING_MODE, 4)
        assert caught.value.code is StatusErrorCode.ACCESS_ERROR and caught.value.servo_id == 2
        await bus.write(2, XM430.TORQUE_ENABLE, 0)
        await bus.write(2, XM430.OPERATING_MODE, 4)
        assert await bus.read(2, XM430.OPERATING_MODE) == 4


async def test_read_only_and_limits_are_enforced() -> None:
    async with rig() as (_sim, bus):
        with pytest.raises(ServoStatusError, match="ACCESS_ERROR"):
            await bus.write(1, XM430.PRESENT_POSITION, 10)
        with pytest.raises(ServoStatusError, match="DATA_LIMIT_ERROR"):
            await bus.write(1, XM430.GOAL_POSITION, 5000)


async def test_chain_moves_servos_with_one_sync_write_and_reads_states() -> None:
    async with rig() as (sim, bus):
        chain = DynamixelChain(bus, IDS, profile_velocity_rad_s=2.0,
                               profile_acceleration_rad_s2=20.0)
        await chain.enable(watchdog_s=0)
        goals = [0.1, -0.2, 0.3, -0.4, 0.5]
        await bus.ping(1)  # a round trip: everything sent before it has been processed
        before = sim.packets_received
        await chain.write_goals(goals)
        await wait_for(lambda: sim.packets_received > before)
        await wait_for(lambda: all(abs(p - g) < 0.01 for p, g in
                                   zip(sim.positions(), goals, strict=True)))
        assert sim.packets_received == before + 1  # one Sync Write carried all five goals
        states = await chain.read_states()
        assert [s.servo_id for s in states] == IDS
        for state, goal in zip(states, goals, strict=True):
            assert state.position_rad == pytest.approx(goal, abs=0.01)
            assert state.voltage_v == pytest.approx(12.0)
            assert not state.faulted
        # the profile velocity bounded the motion
        peak = max(abs(v) for sample in sim.motion_log for v in sample.velocities)
        assert 1.0 < peak <= 2.0 + 0.05


async def test_bulk_read_mixes_registers() -> None:
    async with rig() as (_sim, bus):
        replies = await bus.bulk_read([(1, XM430.PRESENT_INPUT_VOLTAGE),
                                       (4, XM430.PRESENT_TEMPERATURE)])
        assert int.from_bytes(replies[1].params, "little") == 120
        assert int.from_bytes(replies[4].params, "little") == 30


async def test_corrupted_replies_are_retried_then_reported() -> None:
    faults = Faults(corrupt_rate=0.02, seed=7)
    async with rig(faults=faults, retries=8) as (_sim, bus):
        for _ in range(20):
            assert await bus.ping(1) == (1020, 46)
        assert bus.retried > 0
        faults.corrupt_rate = 1.0
        with pytest.raises((CrcMismatch, DynamixelTimeout)):
            await bus.ping(1)


async def test_silent_servo_times_out_after_bounded_retries() -> None:
    async with rig(retries=1) as (_sim, bus):
        with pytest.raises(DynamixelTimeout, match="servo 9: no status for PING"):
            await bus.ping(9)
        assert bus.retried == 1


async def test_unplugged_bus_is_a_link_error() -> None:
    faults = Faults()
    async with rig(faults=faults) as (_sim, bus):
        faults.disconnect()
        with pytest.raises(DynamixelLinkError) as caught:
            for _ in range(50):
                await bus.ping(1)
        assert str(caught.value).count(bus.link.url) == 1  # named once


async def test_overload_latches_until_reboot() -> None:
    async with rig() as (sim, bus):
        chain = DynamixelChain(bus, IDS)
        await chain.enable(watchdog_s=0)
        sim.servo(3).external_torque_nm = STALL_TORQUE_NM * 1.5
        await wait_for(lambda: sim.servo(3).hardware_error != 0)
        assert not sim.servo(3).torque_on
        states = await chain.read_states()
        assert states[2].hardware_error == 1 << HW_OVERLOAD and states[2].faulted
        sim.servo(3).external_torque_nm = 0.0
        with pytest.raises(ServoStatusError, match="RESULT_FAIL"):
            await bus.write(3, XM430.TORQUE_ENABLE, 1)  # only a reboot clears it
        await bus.reboot(3)
        assert await bus.read(3, XM430.HARDWARE_ERROR_STATUS) == 0
        await bus.write(3, XM430.TORQUE_ENABLE, 1)


async def test_bus_watchdog_stops_servo_when_host_goes_silent() -> None:
    async with rig() as (sim, bus):
        chain = DynamixelChain(bus, IDS, profile_velocity_rad_s=1.0)
        await chain.enable(watchdog_s=0.1)
        assert await bus.read(1, XM430.BUS_WATCHDOG) == 5
        await chain.write_goals([2.5, 0, 0, 0, 0])  # a long move, then the host goes quiet
        await wait_for(lambda: sim.servo(1).watchdog_tripped)
        stopped_at = sim.servo(1).position
        assert 0 < stopped_at < 1.0  # stopped mid-way, not at the goal
        await asyncio.sleep(0.05)  # let physics run: a stopped servo stays put
        assert sim.servo(1).position == stopped_at
        assert await bus.read(1, XM430.BUS_WATCHDOG, signed=True) == -1
        with pytest.raises(ServoStatusError, match="DATA_RANGE_ERROR"):
            await bus.write(1, XM430.GOAL_POSITION, 3000)
        await bus.write(1, XM430.BUS_WATCHDOG, 0)  # the explicit clear
        await bus.write(1, XM430.GOAL_POSITION, 2048)
        await wait_for(lambda: abs(sim.servo(1).position) < 0.01)


async def test_the_bus_measures_its_longest_silence_as_the_servos_watchdog_does() -> None:
    async with rig() as (_sim, bus):
        chain = DynamixelChain(bus, IDS)
        await chain.read_states()
        chain.take_longest_silence()
        await chain.read_states()
        assert chain.take_longest_silence() < 0.2
        await asyncio.sleep(0.25)  # no packet meanwhile
        await chain.read_states()
        assert chain.take_longest_silence() >= 0.25
        assert chain.take_longest_silence() == 0.0  # taken: starts over


async def test_chain_refuses_bad_goals() -> None:
    async with rig() as (_sim, bus):
        chain = DynamixelChain(bus, IDS)
        with pytest.raises(ValueError, match="4 goals for 5 joints"):
            await chain.write_goals([0.0] * 4)
        with pytest.raises(ValueError, match="non-finite"):
            await chain.write_goals([0.0, 0.0, math.nan, 0.0, 0.0])
        with pytest.raises(ValueError, match="distinct"):
            DynamixelChain(bus, [1, 1])


async def test_a_backlog_of_host_packets_overruns_instead_of_executing_late() -> None:
    """Packets that queued up while the simulator did not run are lost (a UART overrun), so
    the simulated servos never execute goals long after the host sent them."""
    async with rig() as (sim, bus):
        await bus.write(1, XM430.TORQUE_ENABLE, 1)
        goals = [2048 + 10 * i for i in range(1, 41)]
        backlog = b"".join(
            encode_instruction(0xFE, Instruction.SYNC_WRITE, sync_write_params(
                XM430.GOAL_POSITION.address, 4, {1: goal.to_bytes(4, "little")}))
            for goal in goals)
        assert len(backlog) > 2 * UART_FIFO_BYTES
        received = sim.packets_received
        await bus.link.write(backlog)  # one burst, as a stalled process finds its socket
        await wait_for(lambda: sim.servo(1).get(116, 4) == goals[-1])
        assert sim.overruns >= 1
        assert sim.packets_received - received < len(goals) // 2


def test_units() -> None:
    assert ticks_to_rad(3072) == pytest.approx(math.pi / 2)


def test_sustained_load_heats_the_motor_until_it_shuts_down() -> None:
    now = [0.0]
    sim = DynamixelSim([1], clock=lambda: now[0], step_s=0.01)
    servo = sim.servo(1)
    servo.put(64, 1, 1)
    servo.external_torque_nm = 3.5  # below stall: it holds, but draws ~2 A
    temperatures = []
    while servo.torque_on and now[0] < 3600:
        now[0] += 10.0
        sim.advance()
        temperatures.append(servo.temperature)
    assert servo.hardware_error == 1 << HW_OVERHEATING
    assert temperatures[0] < 40 and max(temperatures) > servo.table[31] - 2  # heated up to trip
    assert servo.error_byte() & 0x80  # every status packet now carries the alert bit


async def test_overheated_servo_reports_through_the_driver() -> None:
    async with rig() as (sim, bus):
        chain = DynamixelChain(bus, IDS)
        await chain.enable(watchdog_s=0)
        await wait_for(lambda: sim.servo(5).torque_on)
        sim.servo(5).temperature = 95.0
        await wait_for(lambda: sim.servo(5).hardware_error != 0)
        states = await chain.read_states()
        assert states[4].hardware_error == 1 << HW_OVERHEATING and states[4].temperature_c >= 90
        assert [s.faulted for s in states] == [False, False, False, False, True]
        sim.servo(5).temperature = 45.0  # cooled down; a reboot alone would not help when hot
        assert await chain.clear_faults() == [5]
        assert not any(s.faulted for s in await chain.read_states())


async def test_cli_serves_bus_and_load_cell_sharing_one_world() -> None:
    medge = str(Path(sys.executable).with_name("medge"))
    process = await asyncio.create_subprocess_exec(
        medge, "sim", "dynamixel", "--listen", "tcp://127.0.0.1:0", "--force-pty",
        stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            bus_url = (await process.stdout.readline()).decode().strip()
            force_line = (await process.stdout.readline()).decode().strip()
        assert bus_url.startswith("socket://") and force_line.startswith("force: /dev/")
        async with SerialLink.open(bus_url) as bus_link, \
                SerialLink.open(force_line.removeprefix("force: ")) as force_link:
            assert await DynamixelBus(bus_link, timeout_s=1.0).ping(5) == (1020, 46)
            line = await force_link.read_until(b"\n", timeout=5)
            line = await force_link.read_until(b"\n", timeout=5)  # a whole line for sure
            assert parse_line(line)[0] == "F"
    finally:
        process.terminate()
        await process.wait()


def test_motion_log_file_records_starts_stops_samples_and_watchdog_trips(tmp_path: Path) -> None:
    now = [100.0]
    sim = DynamixelSim([1, 2], clock=lambda: now[0], step_s=0.001)
    path = tmp_path / "motion.jsonl"
    sim.motion_file = MotionLogFile(path, sim.servos, now[0], every_s=0.05)
    mover = sim.servo(2)
    mover.put(64, 1, 1)
    mover.put(116, 4, 2048 + 256)  # a move of 0.39 rad
    now[0] += 0.5
    sim.advance()  # moves, then settles at the goal
    mover.put(98, 1, 5)  # Bus Watchdog 100 ms, then the host stays silent
    mover.put(116, 4, 2048 + 2048)
    now[0] += 0.5
    sim.advance()
    sim.motion_file.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["event"] == "open" and lines[0]["ids"] == [1, 2]
    changes = [line for line in lines if line["event"] == "change"]
    assert [c["moving"] for c in changes[:3]] == [[0, 1], [0, 0], [0, 1]]
    settled = changes[1]
    assert 100.0 < settled["t"] < 100.5
    assert settled["pos"][1] == pytest.approx(256 * 2 * math.pi / 4096, abs=1e-6)
    assert settled["goal"][1] == settled["pos"][1]
    tripped = next(c for c in changes if c["tripped"] == [0, 1])
    assert tripped["t"] == pytest.approx(100.6, abs=0.005)  # silent since 100.5
    assert lines[-1]["moving"] == [0, 0] and lines[-1]["pos"][1] < math.pi  # stopped short
    samples = [line for line in lines if line["event"] == "sample"]
    assert samples and all(s["moving"] == [0, 1] for s in samples)
    times = [line["t"] for line in lines]
    assert times == sorted(times)
    assert len(lines) < 30  # one step in a thousand: at rest and between samples, nothing


async def test_cli_writes_the_motion_log(tmp_path: Path) -> None:
    path = tmp_path / "motion.jsonl"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "medge.cli", "sim", "dynamixel", "--listen", "tcp://127.0.0.1:0",
        "--motion-log", str(path), stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            bus_url = (await process.stdout.readline()).decode().strip()
        async with SerialLink.open(bus_url) as link:
            chain = DynamixelChain(DynamixelBus(link, timeout_s=1.0), IDS)
            await chain.enable(watchdog_s=0)
            await chain.write_goals([0.2, 0, 0, 0, 0])

            def stopped() -> bool:
                lines = [json.loads(line) for line in path.read_text().splitlines()]
                return any(line["moving"] == [1, 0, 0, 0, 0] for line in lines) and \
                    lines[-1]["moving"] == [0] * 5

            await wait_for(stopped, timeout=10)
    finally:
        process.terminate()
        await process.wait()
    assert json.loads(path.read_text().splitlines()[-1])["pos"][0] == pytest.approx(0.2, abs=2e-3)


def test_cli_refuses_load_cell_without_the_five_servos(capsys: pytest.CaptureFixture[str]) -> None:
    from medge.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["sim", "dynamixel", "--pty", "--ids", "1,2", "--force-pty"])
    assert exited.value.code not in (0, None)


async def test_a_late_reply_to_an_earlier_read_is_skipped_by_the_next_read() -> None:
    """Protocol 2.0 has no sequence numbers: a retried read leaves a second set of replies,
    which arrives during the next transaction. A reply of another length is that late answer,
    not ours (seen as "sync read returned 21 of 1 bytes" and an E-stop under load)."""
    async with rig() as (_sim, bus):
        earlier = encode_instruction(BROADCAST_ID, Instruction.SYNC_READ,
                                     sync_read_params(126, 21, IDS))
        await bus.link.write(earlier)  # its replies are not read: they come in late
        replies = await bus.sync_read(XM430.BUS_WATCHDOG.address, 1, IDS)
        assert sorted(replies) == IDS and all(len(r.params) == 1 for r in replies.values())
