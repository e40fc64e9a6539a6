"""The control loop against the simulated manipulator: servos, load cell and patient surface.

Each safety rule is exercised end to end through the real driver, the real line protocols
and the simulators' physics; the simulator's motion log is the witness.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemons.manipulator.control import ControlLoop, RecentSamples
from daemons.manipulator.kinematics import HolderKinematics, Twist
from daemons.manipulator.supervisor import ArmState, Reason, Setpoint, Status, SupervisorConfig
from drivers.dynamixel import DynamixelBus, DynamixelChain
from drivers.dynamixel_protocol import DynamixelError
from drivers.force_sensor import ForceSensor
from drivers.serial_link import SerialLink
from firmware_sim.dynamixel import HW_OVERLOAD, STALL_TORQUE_NM, DynamixelSim
from firmware_sim.force import ForceSim
from firmware_sim.link import Endpoint, Faults, SimulatorServer
from firmware_sim.probe_world import ProbeWorld
from tests.helpers import frozen_heap

WATCHDOG_S = 0.1


@dataclass
class Manipulator:
    sim: DynamixelSim
    force: ForceSim
    world: ProbeWorld
    loop: ControlLoop
    task: asyncio.Task[None]

    def status(self) -> Status:
        assert self.loop.last_output is not None
        return self.loop.last_output.status

    def status_reasons(self) -> frozenset[Reason]:
        return self.status().reasons


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@contextlib.asynccontextmanager
async def manipulator(
    start_z_servo: float = 0.0, config: SupervisorConfig | None = None,
    bus_faults: Faults | None = None,
) -> AsyncIterator[Manipulator]:
    sim = DynamixelSim()
    for servo in sim.servos:
        servo.table[9] = 0  # return delay 0, as configured on the real bus
    sim.servo(3).position = start_z_servo
    world = ProbeWorld(sim.positions)
    sim.loads = world.servo_loads  # pressing on the belly loads the servos too
    force = ForceSim(lambda: world.contact_force()[0], noise_n=0.0)
    with frozen_heap():
        async with sim.serving(faults=bus_faults) as bus_server, \
                SimulatorServer(force.serve, Endpoint("pty")) as force_server, \
                SerialLink.open(bus_server.address) as bus_link, \
                SerialLink.open(force_server.address) as force_link:
            sensor = ForceSensor(force_link)
            reader = asyncio.create_task(sensor.run())
            chain = DynamixelChain(DynamixelBus(bus_link, timeout_s=0.1), [1, 2, 3, 4, 5])
            loop = ControlLoop(chain, HolderKinematics(), lambda: sensor.latest, config,
                               watchdog_s=WATCHDOG_S)
            try:
                await sensor.wait_reading(2.0)
                await loop.start()
                task = asyncio.create_task(loop.run())
                await wait_for(lambda: loop.last_output is not None)
                yield Manipulator(sim, force, world, loop, task)
            finally:
                for pending in (locals().get("task"), reader):
                    if pending is not None:
                        await cancel(pending)


@contextlib.asynccontextmanager
async def operator(
    loop: ControlLoop, twist: Twist, name: str = "alice"
) -> AsyncIterator[Callable[[bool], None]]:
    """Send enabled setpoints at 100 Hz while inside; the yielded setter flips the dead-man."""
    enable = [True]
    seq = itertools.count(1)

    async def send() -> None:
        while True:
            now = time.monotonic()
            loop.submit(Setpoint(name, next(seq), enable[0], now, now, twist))
            await asyncio.sleep(0.01)

    task = asyncio.create_task(send())
    try:
        yield lambda on: enable.__setitem__(0, on)
    finally:
        await cancel(task)


def settled_after(sim: DynamixelSim, since: float) -> bool:
    samples = [s for s in sim.motion_log if s.time > since]
    assert len(samples) > 10, "the observation window must contain simulator samples"
    return all(s.positions == samples[0].positions and not any(s.velocities) for s in samples)


async def test_fresh_setpoints_move_the_robot_and_jitter_is_measured() -> None:
    async with manipulator() as m:
        assert m.loop.arm("alice").granted
        async with operator(m.loop, Twist((0.02, 0, 0), (0, 0, 0))):
            await wait_for(lambda: m.world.tip_and_axis()[0][0] > 0.005)
        tip, axis = m.world.tip_and_axis()
        assert tip[1] == pytest.approx(0, abs=1e-3) and tip[2] == pytest.approx(-0.2, abs=1e-3)
        assert axis == pytest.approx((0, 0, -1), abs=1e-3)
        stats = m.loop.stats()
        assert stats.cycles > 10 and 0 <= stats.jitter_p50_s <= stats.jitter_p99_s


async def test_cutting_setpoints_stops_the_robot() -> None:
    async with manipulator() as m:
        m.loop.arm("alice")
        async with operator(m.loop, Twist((0.03, 0, 0), (0, 0, 0))):
            await wait_for(lambda: m.world.tip_and_axis()[0][0] > 0.005)
        # the operator's link is cut here: no release message, just silence
        await wait_for(lambda: Reason.COMMAND_STALE in m.status_reasons())
        await wait_for(lambda: not m.status().moving)
        commanded_stop = m.sim.clock()
        await asyncio.sleep(0.3)  # an observation window, not a wait for luck
        assert settled_after(m.sim, commanded_stop + 0.05)
        assert m.status().state is ArmState.ARMED  # stopped, not yet lost


async def test_deadman_release_stops_and_pressing_again_resumes() -> None:
    async with manipulator() as m:
        m.loop.arm("alice")
        async with operator(m.loop, Twist((0, 0.03, 0), (0, 0, 0))) as set_enable:
            await wait_for(lambda: m.world.tip_and_axis()[0][1] > 0.003)
            set_enable(False)
            await wait_for(lambda: Reason.DEADMAN_RELEASED in m.status_reasons()
                           and not m.status().moving)
            stopped_y = m.world.tip_and_axis()[0][1]
            set_enable(True)
            await wait_for(lambda: m.world.tip_and_axis()[0][1] > stopped_y + 0.003)


async def test_force_spike_stops_and_retracts_along_the_probe_axis() -> None:
    async with manipulator(start_z_servo=-0.6) as m:  # tip 2 mm above the belly
        m.loop.arm("alice")
        async with operator(m.loop, Twist((0, 0, -0.02), (0, 0, 0))):
            await wait_for(lambda: m.world.contact_force()[0] > 3.0)
            m.force.spike_n = 30.0  # a sudden push (patient moves): over the 25 N limit
            await wait_for(lambda: Reason.FORCE_LIMIT in m.status_reasons())
            spike_z = m.world.tip_and_axis()[0][2]
            m.force.spike_n = 0.0
            await wait_for(lambda: not m.status().moving
                           and m.world.tip_and_axis()[0][2] > spike_z + 0.005)
            assert Reason.FORCE_LIMIT in m.status_reasons()  # held against the operator's push
        tip, _ = m.world.tip_and_axis()
        assert tip[2] >= spike_z + m.loop.config.retract_distance_m - 0.002
        assert m.world.contact_force()[0] < m.loop.config.force_warn_n


async def test_servo_overload_latches_estop_until_reset_and_rearm() -> None:
    async with manipulator() as m:
        m.loop.arm("alice")
        async with operator(m.loop, Twist((0, 0.02, 0), (0, 0, 0))):
            await wait_for(lambda: m.world.tip_and_axis()[0][1] > 0.002)
            m.sim.servo(2).external_torque_nm = STALL_TORQUE_NM * 1.5
            await wait_for(lambda: Reason.ESTOP_SERVO_FAULT in m.status_reasons())
        assert m.sim.servo(2).hardware_error == 1 << HW_OVERLOAD
        assert m.loop.arm("alice").reason is Reason.ESTOP_SERVO_FAULT
        await wait_for(lambda: not m.status().moving)
        m.sim.servo(2).external_torque_nm = 0.0
        decision = await m.loop.reset()
        assert decision.granted
        assert m.sim.servo(2).hardware_error == 0 and m.sim.servo(2).torque_on
        await wait_for(lambda: m.status().state is ArmState.DISARMED)
        assert m.loop.arm("alice").granted


async def test_frozen_daemon_is_stopped_by_the_servo_watchdog() -> None:
    async with manipulator() as m:
        m.loop.arm("alice")
        async with operator(m.loop, Twist((0.03, 0, 0), (0, 0, 0))):
            await wait_for(lambda: m.world.tip_and_axis()[0][0] > 0.005)
            await cancel(m.task)  # the daemon freezes mid-motion: no more bus traffic
            await wait_for(lambda: len(m.sim.watchdog_trips) == 5, timeout=5)
        silent_since = m.sim.last_packet_at
        assert silent_since is not None
        for _servo_id, tripped_at in m.sim.watchdog_trips:
            assert tripped_at - silent_since <= WATCHDOG_S + 2 * m.sim.step_s
        await asyncio.sleep(0.1)  # observation window
        assert settled_after(m.sim, max(t for _, t in m.sim.watchdog_trips))


async def test_unplugged_servo_bus_latches_estop() -> None:
    faults = Faults()
    async with manipulator(bus_faults=faults) as m:
        m.loop.arm("alice")
        async with operator(m.loop, Twist((0.02, 0, 0), (0, 0, 0))):
            await wait_for(lambda: m.world.tip_and_axis()[0][0] > 0.002)
            with capture_logs() as logs:
                faults.disconnect()  # the USB adapter is pulled out mid-motion
                await wait_for(lambda: Reason.ESTOP_SERVO_LINK in m.status_reasons())
                await asyncio.sleep(WATCHDOG_S * 3)  # dozens of cycles without the bus
        assert m.loop.arm("alice").reason is Reason.ESTOP_SERVO_LINK
        events = [entry["event"] for entry in logs]
        assert events.count("servo watchdog gap") == 1, events  # once, not every cycle


async def test_a_stalled_servo_bus_is_logged_failed_once_until_it_answers_again() -> None:
    faults = Faults()
    async with manipulator(bus_faults=faults) as m:
        with capture_logs() as logs:
            faults.stall()  # the servos stop answering; goal writes still "succeed" (no reply)
            await wait_for(lambda: Reason.ESTOP_SERVO_LINK in m.status_reasons())
            await asyncio.sleep(WATCHDOG_S * 5)
            faults.stall(False)
            await wait_for(lambda: any(e["event"] == "servo bus ok" for e in logs))
        events = [entry["event"] for entry in logs if entry["event"].startswith("servo bus")]
        assert events == ["servo bus failed", "servo bus ok"]


async def test_a_freeze_while_a_cycle_awaits_the_bus_latches_estop() -> None:
    """The process freezes between a cycle's read and its goal write: the next cycle starts on
    time, yet the servos heard nothing for longer than their watchdog and have tripped."""
    async with manipulator() as m:
        m.loop.arm("alice")
        servos = m.loop.servos
        read_states = servos.read_states
        frozen = [False]

        async def freezing() -> list[Any]:
            states = await read_states()
            if not frozen[0]:
                frozen[0] = True
                time.sleep(WATCHDOG_S * 1.5)  # the whole process stops, mid-cycle
            return states

        async with operator(m.loop, Twist((0.03, 0, 0), (0, 0, 0))):
            await wait_for(lambda: m.world.tip_and_axis()[0][0] > 0.003)
            servos.read_states = freezing  # type: ignore[method-assign]
            await wait_for(lambda: Reason.ESTOP_SERVO_WATCHDOG in m.status_reasons())
        assert m.sim.watchdog_trips, "the servos did trip"


async def reset_rearm_and_move(m: Manipulator) -> None:
    """After a watchdog E-stop: reset (refused while the commanded stop still decelerates),
    re-arm, and the robot follows the operator again."""
    async with asyncio.timeout(5):
        while not (await m.loop.reset()).granted:
            await asyncio.sleep(0.05)
    assert m.loop.arm("alice").granted
    start_x = m.world.tip_and_axis()[0][0]
    async with operator(m.loop, Twist((0.03, 0, 0), (0, 0, 0))):
        await wait_for(lambda: m.world.tip_and_axis()[0][0] > start_x + 0.003)


async def test_servos_that_tripped_while_every_packet_left_on_time_latch_estop() -> None:
    """Found by the chaos campaign: after the bus simulator restarted, all five servos tripped
    their watchdog although the daemon sent every cycle on time (the servos count from what
    they *receive*), and the daemon armed and commanded them for two minutes. Here the bus
    falls 0.3 s behind on its own: the daemon must notice from the servos themselves."""
    async with manipulator() as m:
        m.loop.arm("alice")
        async with operator(m.loop, Twist((0.03, 0, 0), (0, 0, 0))):
            await wait_for(lambda: m.world.tip_and_axis()[0][0] > 0.003)
            sim_clock = m.sim.clock
            m.sim.clock = lambda: sim_clock() + 0.3  # the bus's time jumps past the watchdog
            await wait_for(lambda: Reason.ESTOP_SERVO_WATCHDOG in m.status_reasons())
            assert m.sim.watchdog_trips, "the servos tripped on their own"
        await reset_rearm_and_move(m)


async def test_a_stall_longer_than_the_servo_watchdog_latches_estop_until_reset() -> None:
    """If the daemon's loop stalls past the servos' watchdog, the servos stop and ignore goals:
    the daemon must latch an E-stop instead of believing it is still moving them."""
    async with manipulator() as m:
        m.loop.arm("alice")
        async with operator(m.loop, Twist((0.03, 0, 0), (0, 0, 0))):
            await wait_for(lambda: m.world.tip_and_axis()[0][0] > 0.003)
            time.sleep(WATCHDOG_S * 2)  # the whole event loop hangs, as a blocked daemon would
            await wait_for(lambda: Reason.ESTOP_SERVO_WATCHDOG in m.status_reasons())
            assert m.sim.watchdog_trips, "the servos tripped on their own"
        assert m.loop.arm("alice").reason is Reason.ESTOP_SERVO_WATCHDOG
        await reset_rearm_and_move(m)


@pytest.mark.parametrize("after_enable", ["slow bus", "read fails"])
async def test_reset_after_a_servo_power_cycle_holds_where_the_servos_stand(
        after_enable: str) -> None:
    """Found by the chaos robot part: after the bus came back with its servos elsewhere (power
    cycled; here moved to 0, as the restarted simulator does), the reset enabled torque and a
    control cycle then wrote the goal the supervisor still held from *before* — the servos drove
    back to it with no setpoint. Two ways in: a cycle between the enable and the re-base (a
    slow bus widens that window here), and a reset failing after the enable (a noisy bus). A
    reset now re-bases on where the servos stand before enabling, and keeps cycles out."""
    async with manipulator() as m:
        m.loop.arm("alice")
        async with operator(m.loop, Twist((0, 0.03, 0), (0, 0, 0))):
            await wait_for(lambda: m.world.tip_and_axis()[0][1] > 0.01)
        m.loop.estop()
        await wait_for(lambda: not m.status().moving)
        for servo in m.sim.servos:  # power cycle: torque off, standing elsewhere
            servo.reboot()
            servo.position = 0.0
        await wait_for(lambda: all(abs(s.position_rad) < 1e-3 for s in m.loop.last_states))
        servos, enable, read_states = m.loop.servos, m.loop.servos.enable, m.loop.servos.read_states
        enabled = [False]

        async def enable_then(**kwargs: Any) -> None:
            await enable(**kwargs)
            enabled[0] = True
            await asyncio.sleep(0.05)  # five control periods: cycles would run here

        async def read_failing_once_enabled() -> list[Any]:
            if enabled[0] and after_enable == "read fails":
                enabled[0] = False
                raise DynamixelError("status packet: CRC mismatch (noisy bus)")
            return await read_states()

        servos.enable = enable_then  # type: ignore[method-assign]
        servos.read_states = read_failing_once_enabled  # type: ignore[method-assign]
        reset_at = m.sim.clock()
        if after_enable == "read fails":
            with pytest.raises(DynamixelError):
                await m.loop.reset()
        else:
            assert (await m.loop.reset()).granted
        await asyncio.sleep(0.1)
        moved = [s for s in m.sim.motion_log if s.time > reset_at and any(s.velocities)]
        assert not moved, f"servos moved after the reset with no setpoint: {moved[0]}"
        assert all(servo.torque_on for servo in m.sim.servos)


def test_the_loop_statistics_hold_the_newest_samples_in_a_fixed_buffer() -> None:
    samples = RecentSamples(3)
    assert len(samples.values()) == 0
    for value in (1.0, 2.0):
        samples.append(value)
    assert sorted(samples.values()) == [1.0, 2.0]
    for value in (3.0, 4.0, 5.0):
        samples.append(value)
    assert sorted(samples.values()) == [3.0, 4.0, 5.0]
