"""Teleoperation over MQTT: setpoint → Sync Write latency, loop jitter, stop after link loss.

    .venv/bin/python -m bench.teleop [--seconds 10] [--trials 5]

Mosquitto on loopback, the manipulator daemon composed as ``medge run manipulator`` composes
it, the Dynamixel simulator (TCP) and load cell (pty) in the same process (tests/teleop_rig.py),
and an operator :class:`~medge.teleop.TeleopClient` streaming setpoints at 100 Hz. All times
are ``time.monotonic()`` in this one process: the client notes each setpoint's publish time,
the daemon stamps its receipt, and the simulator notes the receipt of every goal Sync Write.

- setpoint → serial: publish → the first goal Sync Write the servo bus receives after the
  daemon accepted that setpoint (split into MQTT transport and the wait for the next cycle);
- loop jitter: lateness of each 100 Hz cycle start against its absolute deadline;
- link cut: the operator's stream stops mid-motion (no release message) → the supervisor
  commands zero velocity, and → the simulated servos are at rest (motion log).
Targets (issue 7): p99 ≤ 5 ms; jitter p99 < 2 ms; stop within 250 ms + the stop's duration.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import platform
import sys
import tempfile
import time
from pathlib import Path

from daemons.manipulator.kinematics import Twist
from daemons.manipulator.supervisor import Reason, Setpoint, SupervisorConfig
from medge import log
from medge.localbroker import Mosquitto
from tests.teleop_rig import Rig, rig, wait_for

MS = 1000.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def row(name: str, values: list[float]) -> str:
    if not values:
        return f"| {name} | 0 | – | – | – | ms |"
    return (f"| {name} | {len(values)} | {pct(values, 50) * MS:.2f} | {pct(values, 99) * MS:.2f}"
            f" | {max(values) * MS:.2f} | ms |")


def note_receipts(r: Rig) -> dict[int, float]:
    """Wrap the control loop's submit to keep each accepted setpoint's receipt time."""
    received: dict[int, float] = {}
    loop = r.daemon.control
    submit = loop.submit

    def noting(setpoint: Setpoint) -> Reason:
        reason = submit(setpoint)
        if reason is Reason.OK:
            received[setpoint.seq] = setpoint.received_at
        return reason

    loop.submit = noting  # type: ignore[method-assign]
    return received


async def streaming(r: Rig, seconds: float) -> tuple[list[float], list[float], list[float]]:
    received = note_receipts(r)
    async with r.operator("bench") as op:
        op.record_sends = True
        assert (await op.arm()).ok
        for leg in range(max(1, round(seconds))):
            sign = 1 if leg % 2 == 0 else -1
            op.command(True, Twist((0.02 * sign, 0, 0), (0, 0, 0)))
            await op.start_stream(100)
            await asyncio.sleep(1.0)
        await op.stop_stream()
        await op.disarm()
        writes = list(r.sim.goal_writes)
        total, transport, wait = [], [], []
        for seq, sent in op.sent.items():
            got = received.get(seq)
            if got is None:
                continue
            index = bisect.bisect_right(writes, got)
            if index == len(writes):
                continue
            total.append(writes[index] - sent)
            transport.append(got - sent)
            wait.append(writes[index] - got)
        return total, transport, wait


async def link_cut(r: Rig, trials: int) -> tuple[list[float], list[float]]:
    to_command, to_rest = [], []
    loop = r.daemon.control
    async with r.operator("bench-cut") as op:
        for trial in range(trials):
            assert (await op.arm()).ok
            sign = 1 if trial % 2 == 0 else -1
            op.command(True, Twist((0.03 * sign, 0, 0), (0, 0, 0)))
            op.record_sends = True
            await op.start_stream(100)
            await asyncio.sleep(0.5)
            await op.stop_stream()  # the link is cut: silence, no release message
            last_sent = max(op.sent.values())
            await wait_for(lambda: loop.last_output is not None
                           and not loop.last_output.status.moving)  # polled every 5 ms
            to_command.append(time.monotonic() - last_sent)
            await asyncio.sleep(0.4)  # observation window for the motion log
            moves = r.moved_after(last_sent)
            to_rest.append((max(moves) if moves else last_sent) - last_sent)
            await op.wait_state(lambda s: s["state"] == "disarmed", timeout=5)  # lease lapses
            op.sent.clear()
    return to_command, to_rest


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    log.configure(level="warning")
    with tempfile.TemporaryDirectory() as directory:
        broker = Mosquitto(Path(directory) / "broker")
        broker.start()
        try:
            async with rig(broker.port, Path(directory)) as r:
                print("streaming…", file=sys.stderr)
                total, transport, wait = await streaming(r, args.seconds)
                stats = r.daemon.control.stats()
                print("link cuts…", file=sys.stderr)
                to_command, to_rest = await link_cut(r, args.trials)
                print("done, stopping the rig", file=sys.stderr)
        finally:
            broker.stop()
    budget = SupervisorConfig().stale_s + SupervisorConfig().stopping_time()
    print(f"# bench.teleop — Python {platform.python_version()}, {platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| measurement | n | p50 | p99 | max | unit |")
    print("|---|---|---|---|---|---|")
    print(row("setpoint publish → goal Sync Write at the servo bus", total))
    print(row("… publish → daemon receipt (MQTT QoS 0 via mosquitto)", transport))
    print(row("… receipt → next Sync Write (wait for the 100 Hz cycle)", wait))
    print(f"| loop start lateness (jitter) at 100 Hz | {stats.cycles} | "
          f"{stats.jitter_p50_s * MS:.2f} | {stats.jitter_p99_s * MS:.2f} | "
          f"{stats.jitter_max_s * MS:.2f} | ms |")
    print(row("link cut (last setpoint) → zero commanded velocity", to_command))
    print(row("link cut (last setpoint) → simulated servos at rest", to_rest))
    print(f"\nstop budget 250 ms + stop {SupervisorConfig().stopping_time() * MS:.0f} ms = "
          f"{budget * MS:.0f} ms; overruns {stats.overruns}")


if __name__ == "__main__":
    asyncio.run(main())
