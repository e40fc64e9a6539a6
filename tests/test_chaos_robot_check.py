"""bench/chaos_robot's checker on constructed logs (the robot may move only within a fresh enabled
setpoint's window; a motion outside it must be caught and measured) and its pieces."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from bench.chaos_robot import (
    CuttableLink,
    Motion,
    RobotPart,
    SetpointLog,
    SetpointRun,
    judge,
    read_motion,
    read_setpoint_runs,
    stop_delay,
    unanswered,
    uncovered,
    windows,
)
from daemons.manipulator.kinematics import Twist

ALLOWED_S = 0.4  # stale_s 0.25 + stopping time 0.15 (SupervisorConfig defaults)
TOLERANCE_S = 0.01
RIGHT = Twist((0.02, 0.0, 0.0), (0.0, 0.0, 0.0))


def motion_lines(*records: tuple[str, float, int, int]) -> list[str]:
    """(event, t, moving, tripped) for a one-servo log, as the simulator writes it."""
    lines = []
    for event, t, moving, tripped in records:
        record = {"event": event, "t": t, "moving": [] if event == "open" else [moving],
                  "pos": [0.0], "goal": [0.0], "tripped": [] if event == "open" else [tripped]}
        lines.append(json.dumps(record))
    return lines


def sent(log: SetpointLog, start: float, end: float, enable: bool = True,
         period: float = 0.01) -> None:
    steps = round((end - start) / period)
    for i in range(steps + 1):
        log.note(start + i * period, enable, RIGHT if enable else None)


def test_motion_inside_the_windows_passes(tmp_path: Path) -> None:
    log = SetpointLog(tmp_path / "setpoints.jsonl", ALLOWED_S)
    sent(log, 10.0, 13.0)  # 3 s with the dead-man held
    sent(log, 13.01, 13.2, enable=False)  # released
    log.close_run()
    runs = read_setpoint_runs((tmp_path / "setpoints.jsonl").read_text().splitlines())
    assert [(r.enable, r.count) for r in runs] == [(True, 301), (False, 20)]
    motion = read_motion(motion_lines(("open", 1.0, 0, 0), ("change", 10.005, 1, 0),
                                      ("sample", 11.0, 1, 0), ("change", 13.12, 0, 0)))
    verdict = judge(motion, runs, ALLOWED_S, TOLERANCE_S)
    assert (verdict.intervals, verdict.violations, verdict.worst_excess_s) == (1, 0, 0.0)


def test_motion_after_the_window_is_caught_and_measured(tmp_path: Path) -> None:
    log = SetpointLog(tmp_path / "setpoints.jsonl", ALLOWED_S)
    sent(log, 10.0, 11.0)
    log.close_run()
    runs = read_setpoint_runs((tmp_path / "setpoints.jsonl").read_text().splitlines())
    # kept moving 0.15 s beyond 11.0 + 0.4
    motion = read_motion(motion_lines(("open", 1.0, 0, 0), ("change", 10.01, 1, 0),
                                      ("change", 11.55, 0, 0)))
    verdict = judge(motion, runs, ALLOWED_S, TOLERANCE_S)
    assert verdict.violations == 1
    assert verdict.worst_excess_s == pytest.approx(0.15)
    assert verdict.worst_at == 10.01


def test_motion_without_any_setpoint_or_with_the_deadman_released_is_caught(
        tmp_path: Path) -> None:
    log = SetpointLog(tmp_path / "setpoints.jsonl", ALLOWED_S)
    sent(log, 10.0, 11.0, enable=False)  # a stream, but the dead-man is not held
    log.close_run()
    runs = read_setpoint_runs((tmp_path / "setpoints.jsonl").read_text().splitlines())
    motion = read_motion(motion_lines(("open", 1.0, 0, 0), ("change", 10.5, 1, 0),
                                      ("change", 10.6, 0, 0), ("change", 20.0, 1, 0),
                                      ("change", 20.02, 0, 0)))
    verdict = judge(motion, runs, ALLOWED_S, TOLERANCE_S)
    assert (verdict.intervals, verdict.violations) == (2, 2)
    assert verdict.worst_excess_s == pytest.approx(0.1)


def test_a_hole_in_the_stream_longer_than_the_window_is_not_covered(tmp_path: Path) -> None:
    log = SetpointLog(tmp_path / "setpoints.jsonl", ALLOWED_S)
    sent(log, 10.0, 10.5)
    sent(log, 11.5, 12.0)  # one second of silence in between: a new run
    log.close_run()
    runs = read_setpoint_runs((tmp_path / "setpoints.jsonl").read_text().splitlines())
    assert len(runs) == 2
    assert windows(runs, ALLOWED_S) == [(10.0, pytest.approx(10.9)),
                                        (11.5, pytest.approx(12.4))]
    motion = read_motion(motion_lines(("open", 1.0, 0, 0), ("change", 10.1, 1, 0),
                                      ("change", 12.3, 0, 0)))
    verdict = judge(motion, runs, ALLOWED_S, TOLERANCE_S)
    assert verdict.violations == 1
    assert verdict.worst_excess_s == pytest.approx(0.6)  # 10.9 .. 11.5


def test_within_the_tolerance_is_reported_but_not_a_violation() -> None:
    runs = [SetpointRun(10.0, 11.0, 101, True, (0.02, 0, 0, 0, 0, 0), 0.01)]
    motion = Motion([(10.0, 11.405)], [], 1)
    verdict = judge(motion, runs, ALLOWED_S, TOLERANCE_S)
    assert verdict.violations == 0 and verdict.worst_excess_s == pytest.approx(0.005)


def test_a_simulator_killed_mid_motion_ends_its_interval_at_its_last_line() -> None:
    motion = read_motion(motion_lines(
        ("open", 1.0, 0, 0), ("change", 10.0, 1, 0), ("sample", 10.25, 1, 0),
        ("open", 20.0, 0, 0), ("change", 21.0, 1, 0), ("change", 21.5, 1, 1),
        ("change", 21.501, 0, 1)))
    assert motion.segments == 2
    assert motion.intervals == [(10.0, 10.25), (21.0, 21.501)]
    assert motion.trips == [21.5]
    assert stop_delay(motion, 21.2) == pytest.approx(0.301)
    assert stop_delay(motion, 15.0) is None


def test_uncovered_counts_only_what_no_window_covers() -> None:
    allowed = [(0.0, 1.0), (2.0, 3.0), (5.0, 6.0)]
    assert uncovered((0.5, 0.9), allowed) == 0.0
    assert uncovered((0.5, 2.5), allowed) == pytest.approx(1.0)
    assert uncovered((3.5, 4.0), allowed) == pytest.approx(0.5)
    assert uncovered((-1.0, 7.0), allowed) == pytest.approx(5.0)
    assert uncovered((1.0, 2.0), []) == pytest.approx(1.0)


def test_pauses_between_control_cycles_join_into_one_motion_but_not_across_restarts() -> None:
    lines = motion_lines(("open", 1.0, 0, 0), ("change", 10.0, 1, 0), ("change", 10.004, 0, 0),
                         ("change", 10.01, 1, 0), ("change", 10.5, 0, 0),
                         ("change", 11.0, 1, 0), ("change", 11.1, 0, 0),
                         ("open", 11.105, 0, 0), ("change", 11.11, 1, 0),
                         ("change", 11.2, 0, 0))
    assert read_motion(lines).intervals == [(10.0, 10.004), (10.01, 10.5), (11.0, 11.1),
                                            (11.11, 11.2)]
    assert read_motion(lines, join_s=0.02).intervals == [(10.0, 10.5), (11.0, 11.1),
                                                         (11.11, 11.2)]


def test_the_daemons_alarms_about_itself_fail_the_check(tmp_path: Path) -> None:
    part = RobotPart()
    part.work = tmp_path
    log = tmp_path / "manipulator.log"
    log.write_text(json.dumps({"event": "servo bus failed", "error": "timeout"}) + "\n"
                   "a line that is not JSON\n")
    assert part._check_daemon_log().ok
    with log.open("a") as out:
        out.write(json.dumps({"event": "control loop stalled", "awaiting": ["control.py:180 run"],
                              "timestamp": "t"}) + "\n")
    check = part._check_daemon_log()
    assert not check.ok and "control loop stalled" in check.detail and "control.py" in check.detail


async def test_the_operators_relay_passes_bytes_until_cut() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server, CuttableLink(server.sockets[0].getsockname()[1]) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        link.cut()  # no goodbye: the client sees its connection end
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(100), 5) == b""
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)  # reconnects
        writer.write(b"pong")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"pong"
        writer.close()


def test_moves_the_robot_did_not_answer_are_counted_and_a_dead_stretch_measured() -> None:
    def move(first: float, seconds: float = 3.0) -> SetpointRun:
        return SetpointRun(first, first + seconds, 300, True, (0.02, 0, 0, 0, 0, 0), 0.01)

    runs = [move(10.0), move(14.0), move(18.0), move(22.0), move(26.0, 0.5), move(30.0)]
    motion = Motion([(10.05, 13.2), (30.1, 33.0)], [], 1)  # the three in between: nothing
    assert unanswered(motion, runs, 1.0, ALLOWED_S) == (3, pytest.approx(25.0 - 14.0))
    assert unanswered(Motion([], [], 1), runs[:1], 1.0, ALLOWED_S) == (1, pytest.approx(3.0))
    released = [SetpointRun(10.0, 13.0, 300, False, (0.0,) * 6, 0.01)]
    assert unanswered(Motion([], [], 1), released, 1.0, ALLOWED_S) == (0, 0.0)
