"""Probe manipulator: control-loop jitter, stop after link loss, watchdog stop, per-cycle costs.

    .venv/bin/python -m bench.manipulator [--seconds 10] [--trials 10]

Runs the real control loop (driver → pty/TCP → Dynamixel simulator, load cell over a pty) with
the same rig as tests/test_supervisor_control.py, and prints:
- loop period jitter (lateness of each cycle start vs its deadline) and cycle time (Sync Read +
  supervisor + Sync Write) at 100 Hz while an operator streams setpoints at 100 Hz;
- after the operator's link is cut: last setpoint → supervisor commands zero velocity, and
  → the simulated servos are at rest (from the simulator's motion log);
- daemon frozen: last bus packet → Bus Watchdog trip (simulation time);
- pure CPU costs: one supervisor step, one Sync Write encode + status decode.
Targets (issue 7): jitter p99 < 2 ms; stop within 250 ms + the decelerating stop's duration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import platform
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from daemons.manipulator.control import ControlLoop, LoopStats
from daemons.manipulator.kinematics import HolderKinematics, Twist
from daemons.manipulator.supervisor import Setpoint, Supervisor, SupervisorConfig
from drivers import dynamixel_protocol as proto
from drivers.dynamixel import XM430, DynamixelBus, DynamixelChain
from drivers.force_sensor import ForceReading, ForceSensor
from drivers.serial_link import SerialLink
from medge import log
from tests.test_supervisor_control import cancel, manipulator, operator, wait_for

MS = 1000.0
IDS = [1, 2, 3, 4, 5]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def row(name: str, values: list[float], unit: str = "ms", scale: float = MS) -> str:
    return (f"| {name} | {len(values)} | {pct(values, 50) * scale:.2f} | "
            f"{pct(values, 99) * scale:.2f} | {max(values) * scale:.2f} | {unit} |")


async def loop_jitter(seconds: float) -> LoopStats:
    async with manipulator() as m:
        m.loop.arm("bench")
        for direction in range(round(seconds)):
            sign = 1 if direction % 2 == 0 else -1
            async with operator(m.loop, Twist((0.02 * sign, 0, 0), (0, 0, 0)), "bench"):
                await asyncio.sleep(1.0)
        return m.loop.stats()


@contextlib.asynccontextmanager
async def simulator_process(*args: str) -> AsyncIterator[str]:
    """``medge sim ARGS`` in its own process (as on a bench rig); yields the address it prints."""
    medge = str(Path(sys.executable).with_name("medge"))
    process = await asyncio.create_subprocess_exec(
        medge, "sim", *args, "--listen", "tcp://127.0.0.1:0", stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        yield (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
    finally:
        process.terminate()
        await process.wait()


async def loop_jitter_alone(seconds: float) -> LoopStats:
    """The control loop alone in this process; the simulators run in their own processes."""
    async with simulator_process("dynamixel") as bus_url, \
            simulator_process("force", "--force", "2") as force_url, \
            SerialLink.open(bus_url) as bus_link, SerialLink.open(force_url) as force_link:
        bus = DynamixelBus(bus_link)
        for servo_id in IDS:
            await bus.write(servo_id, XM430.RETURN_DELAY_TIME, 0)  # as on the real robot
        sensor = ForceSensor(force_link)
        reader = asyncio.create_task(sensor.run())
        loop = ControlLoop(DynamixelChain(bus, IDS), HolderKinematics(), lambda: sensor.latest)
        await loop.start()
        runner = asyncio.create_task(loop.run())
        loop.arm("bench")
        for direction in range(round(seconds)):
            sign = 1 if direction % 2 == 0 else -1
            async with operator(loop, Twist((0.02 * sign, 0, 0), (0, 0, 0)), "bench"):
                await asyncio.sleep(1.0)
        for task in (runner, reader):
            await cancel(task)
        return loop.stats()


async def link_loss(trials: int) -> tuple[list[float], list[float]]:
    to_command, to_rest = [], []
    async with manipulator() as m:
        stopped_at: list[float] = []
        m.loop.listeners.append(lambda out, _states: stopped_at.append(time.monotonic())
                                if not out.status.moving else None)
        for trial in range(trials):
            m.loop.arm("bench")
            sign = 1 if trial % 2 == 0 else -1
            async with operator(m.loop, Twist((0.03 * sign, 0, 0), (0, 0, 0)), "bench"):
                await asyncio.sleep(0.5)
                stopped_at.clear()
                cut = time.monotonic()  # the operator task is cancelled on leaving the block
            await wait_for(lambda: bool(stopped_at))
            to_command.append(stopped_at[0] - cut)
            await asyncio.sleep(0.4)
            log_after = [s for s in m.sim.motion_log if s.time > cut]
            moved = [after.time for before, after in itertools.pairwise(log_after)
                     if after.positions != before.positions]
            to_rest.append((max(moved) if moved else cut) - cut)
            m.loop.disarm("bench")
    return to_command, to_rest


async def watchdog_stop(trials: int) -> list[float]:
    delays = []
    for _ in range(trials):
        async with manipulator() as m:
            m.loop.arm("bench")
            async with operator(m.loop, Twist((0.03, 0, 0), (0, 0, 0)), "bench"):
                await asyncio.sleep(0.3)
                await cancel(m.task)
                await wait_for(lambda: len(m.sim.watchdog_trips) == 5)
            assert m.sim.last_packet_at is not None
            delays.append(max(t for _, t in m.sim.watchdog_trips) - m.sim.last_packet_at)
    return delays


def cpu_costs(repeats: int) -> tuple[list[float], list[float]]:
    now = [0.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    sup = Supervisor(HolderKinematics(), (0, 0, 0, 0, 0), SupervisorConfig(), clock=clock)
    sup.arm("bench", (0, 0, 0, 0, 0))
    steps = []
    for seq in range(repeats):
        now[0] += 0.01
        sup.submit(Setpoint("bench", seq + 1, True, now[0], now[0],
                            Twist((0.01, 0, 0), (0.1, 0, 0))))
        started = time.perf_counter()
        sup.step(ForceReading(1.0, seq, 0, now[0]))
        steps.append(time.perf_counter() - started)
        if seq % 200 == 199:
            sup.arm("bench", (0, 0, 0, 0, 0))  # stay inside the limits
    status = proto.encode_instruction(1, 0x55, bytes([0]) + bytes(21))
    codec = []
    for _ in range(repeats):
        started = time.perf_counter()
        proto.encode_instruction(0xFE, proto.Instruction.SYNC_WRITE, proto.sync_write_params(
            116, 4, {i: (2048 + i).to_bytes(4, "little") for i in range(1, 6)}))
        for _ in range(5):
            proto.decode_status(status)
        codec.append(time.perf_counter() - started)
    return steps, codec


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    log.configure(level="warning")
    print(f"# bench.manipulator — {platform.python_version()}, {platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}")
    alone = await loop_jitter_alone(args.seconds)
    loop = await loop_jitter(args.seconds)
    to_command, to_rest = await link_loss(args.trials)
    watchdog = await watchdog_stop(max(1, args.trials // 2))
    steps, codec = cpu_costs(5000)
    stop_budget = 0.25 + SupervisorConfig().stopping_time()
    print("| measurement | n | p50 | p99 | max | unit |")
    print("|---|---|---|---|---|---|")
    for label, stats in (("simulators in other processes", alone),
                         ("simulators in the same process", loop)):
        print(f"| loop start lateness (jitter) at 100 Hz, {label} | {stats.cycles} | "
              f"{stats.jitter_p50_s * MS:.2f} | {stats.jitter_p99_s * MS:.2f} | "
              f"{stats.jitter_max_s * MS:.2f} | ms |")
        print(f"| cycle (Sync Read + supervisor + Sync Write), {label} | {stats.cycles} | "
              f"{stats.cycle_p50_s * MS:.2f} | {stats.cycle_p99_s * MS:.2f} | "
              f"{stats.cycle_max_s * MS:.2f} | ms |")
    print(row("link cut → supervisor commands zero velocity", to_command))
    print(row("link cut → simulated servos at rest", to_rest))
    print(row("daemon frozen → Bus Watchdog trip (sim time)", watchdog))
    print(row("supervisor step (CPU)", steps, "µs", 1e6))
    print(row("Sync Write encode + 5 status decodes (CPU)", codec, "µs", 1e6))
    print(f"\nstop budget: 250 ms + decelerating stop {SupervisorConfig().stopping_time() * MS:.0f}"
          f" ms = {stop_budget * MS:.0f} ms; jitter target p99 < 2 ms; "
          f"overruns {alone.overruns} / {loop.overruns}")


if __name__ == "__main__":
    asyncio.run(main())
