"""Sweep protocols on the simulated robot through mosquitto: a sweep completes under the
supervisor with frames stamped by the true pose and a valid DICOM recording; E-stop and the
force limit stop it; a doctor takes over (lease passes, sweep stops) and hands back (it
resumes and completes); bad requests are refused by name."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from daemons.manipulator import us_dicom
from daemons.manipulator.kinematics import HolderKinematics, Twist, probe_axis
from daemons.manipulator.supervisor import Supervisor
from daemons.manipulator.sweeps import (
    Phase,
    Surface,
    SweepError,
    SweepSpec,
    check_reachable,
    path_pose,
)
from daemons.manipulator.ultrasound import UltrasoundSection, UltrasoundService, attach
from firmware_sim.ultrasound import ImageGeometry, SimulatedUltrasound, world_probe
from medge.exitcodes import EXIT_USAGE
from medge.localbroker import Mosquitto
from medge.teleop import TeleopClient
from medge.uscli import UsTopics, us_request
from tests.teleop_rig import Rig, rig, wait_for

MEDGE = Path(sys.executable).with_name("medge")
SHORT = SweepSpec(start=(-0.008, 0.0), end=(0.008, 0.0), speed=0.02, press_m=0.003)
FAN = SweepSpec(kind="fan", start=(0.0, 0.0), fan_rad=0.1, speed=0.02, press_m=0.003)
DEEP = SweepSpec(start=(-0.008, 0.0), end=(0.008, 0.0), speed=0.02, press_m=0.02)
SLOW = SweepSpec(start=(-0.01, 0.0), end=(0.01, 0.0), speed=0.004, press_m=0.003)
SECTION = UltrasoundSection(resolution=(160, 120), live_rate_hz=0.0,
                            sweeps={"short": SHORT, "fan": FAN, "deep": DEEP, "slow": SLOW})


SHARED_BOX_WATCHDOG_S = 1.0
"""The servo bus watchdog for rigs that sweep (the default is 0.1 s). This rig runs the bus and
load-cell simulators, the phantom renderer and the daemon in one test process, so any stall of
that process is a bus silence; on a busy shared 2-core box (load 6-9, 2026-11-22) the same
sweep *without* ultrasound latched ``estop_servo_watchdog`` at 0.1 s in 4 of 6 runs (longest
event-loop stall per run 72-159 ms): the trips are the box's, not the sweep's. What the
ultrasound side adds to the daemon's loop is measured with each part in its own process
(bench/ultrasound, docs/ultrasound.md "Effect on the control loop"), not by these tests.
0.3 s still tripped once in a clean-clone `make test` while a chaos run and a soak shared the
box (test_cli_lists_starts_and_refuses: the `medge us` processes start beside the rig); 1.0 s,
as the console's browser tests use. The watchdog itself is tested in test_supervisor_control."""


@contextlib.asynccontextmanager
async def us_rig(port: int, tmp_path: Path) -> AsyncIterator[tuple[Rig, UltrasoundService]]:
    async with rig(port, tmp_path, watchdog_s=SHARED_BOX_WATCHDOG_S) as r:
        source = SimulatedUltrasound(world_probe(r.world), frame_rate_hz=30,
                                     geometry=ImageGeometry(160, 120))
        yield r, await attach(r.daemon, SECTION, source)


@contextlib.asynccontextmanager
async def us_client(r: Rig, operator: str) -> AsyncIterator[TeleopClient]:
    topics = UsTopics(r.topics.site, r.topics.node, r.topics.robot)
    async with TeleopClient(r.broker, topics, operator) as client:
        yield client


def true_tip(r: Rig, at: float) -> tuple[float, float, float]:
    """The simulator's own tip position at time ``at`` (its motion log, its kinematics)."""
    log = list(r.sim.motion_log)
    index = min(bisect.bisect_left([s.time for s in log], at), len(log) - 1)
    return r.world._pose_at(log[index].positions)[0]


def test_paths_follow_the_surface_and_the_fan_turns_about_the_tip() -> None:
    surface = Surface([[0.008, 0.0, -0.21]], default_z_m=-0.22)
    assert path_pose(SHORT, surface, 0.0).tip_z == pytest.approx(-0.22 - 0.003)  # none near
    middle = path_pose(SHORT, surface, SHORT.length / 2)
    assert middle.tip == pytest.approx((0.0, 0.0, -0.213))  # the registered point, 8 mm away
    first, last = path_pose(FAN, surface, 0.0), path_pose(FAN, surface, FAN.length)
    assert first.tip == last.tip and (first.tilt_a, last.tilt_a) == pytest.approx((-0.1, 0.1))
    assert path_pose(SHORT, surface, 99.0).tip_x == pytest.approx(0.008)  # clamped


def tilted_plane(degrees: float) -> tuple[Surface, object]:
    """Skin rising along +x at ``degrees``, sampled every 3 mm with 0.2 mm of depth noise."""
    slope = math.tan(math.radians(degrees))
    return _sampled(lambda x, y: -0.22 + slope * x), \
        lambda x, y: np.array([-slope, 0.0, 1.0]) / math.hypot(slope, 1.0)


def dome(radius: float = 0.08) -> tuple[Surface, object]:
    """A sphere cap of ``radius`` (a thin patient's flank) topping at z = -0.20."""
    centre = -0.20 - radius
    return _sampled(lambda x, y: centre + math.sqrt(radius ** 2 - x * x - y * y)), \
        lambda x, y: np.array([x, y, math.sqrt(radius ** 2 - x * x - y * y)]) / radius


def _sampled(height: object) -> Surface:
    rng = np.random.default_rng(3)
    grid = np.arange(-0.05, 0.0501, 0.003)
    points = [(x, y, height(x, y) + rng.normal(0, 0.0002))  # type: ignore[operator]
              for x in grid for y in grid]
    return Surface(points)


def expected_axis(normal: np.ndarray, tilt: tuple[float, float]) -> np.ndarray:
    """The set tilt measured from the inward normal, by SciPy's smallest rotation up -> normal."""
    rotation, _ = Rotation.align_vectors([normal], [[0.0, 0.0, 1.0]])
    return np.asarray(rotation.apply(probe_axis(*tilt)))


@pytest.mark.parametrize("surface_of", [lambda: tilted_plane(15.0), dome])
@pytest.mark.parametrize("spec", [
    SweepSpec(start=(-0.02, -0.01), end=(0.02, 0.01), tilt=(0.0, 0.15), press_m=0.003),
    SweepSpec(start=(-0.015, 0.0), end=(0.015, 0.0), tilt=(-0.1, 0.05), press_m=0.002),
    SweepSpec(kind="fan", start=(0.01, 0.005), fan_rad=0.2, fan_axis="b", press_m=0.003),
])
def test_probe_axis_is_the_set_tilt_from_the_surface_normal_at_every_waypoint(
        surface_of: object, spec: SweepSpec) -> None:
    surface, true_normal = surface_of()  # type: ignore[operator]
    for index in range(41):
        progress = spec.length * index / 40
        pose = path_pose(spec, surface, progress)
        if spec.kind == "linear":
            fraction = progress / spec.length
            x = spec.start[0] + (spec.end[0] - spec.start[0]) * fraction
            y = spec.start[1] + (spec.end[1] - spec.start[1]) * fraction
            tilt = spec.tilt
        else:
            (x, y), angle = spec.start, progress - spec.fan_rad
            tilt = (0.0, angle)
        normal = true_normal(x, y)
        want = expected_axis(normal, tilt)
        error = math.degrees(math.acos(min(1.0, float(np.dot(pose.axis, want)))))
        assert error < 1.0, (index, error)
        # the tip is press_m into the skin along the normal from the point under the path
        skin = np.array(pose.tip) + spec.press_m * normal
        assert skin[:2] == pytest.approx([x, y], abs=1e-4)


def test_a_sweep_needing_an_unreachable_tilt_names_the_waypoint() -> None:
    """The holder's tilt joints stop at ±0.6 rad (0.55 with the supervisor's margin): a 28°
    slope plus a set tilt of 0.1 rad the same way is past it; 10° is not."""
    supervisor = Supervisor(HolderKinematics(), [0.0] * 5)
    steep, _ = tilted_plane(28.0)
    spec = SweepSpec(start=(0.02, 0.0), end=(0.04, 0.0), tilt=(0.0, -0.1))
    with pytest.raises(SweepError, match=r"waypoint 0 of 21 \(x 20.0 mm.*2[78].\d° from "
                                         r"vertical.*b -3\d.\d°: joint tilt_b .*outside its "
                                         r"limits") as refused:
        check_reachable("flank", spec, steep, supervisor)
    assert refused.value.reason == "unreachable_waypoint"
    level_then_steep = Surface([(x, y, -0.22 + max(0.0, x - 0.005) * math.tan(math.radians(40)))
                                for x in np.arange(-0.05, 0.05, 0.003)
                                for y in np.arange(-0.05, 0.05, 0.003)])
    across = SweepSpec(start=(-0.02, 0.0), end=(0.02, 0.0), tilt=(0.0, -0.1))
    with pytest.raises(SweepError, match=r"waypoint (2\d|3\d) of 41"):  # past the bend
        check_reachable("flank", across, level_then_steep, supervisor)
    assert check_reachable("flank", spec, tilted_plane(10.0)[0], supervisor) == 21


async def test_unreachable_sweep_is_refused_before_any_motion(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with us_rig(broker.port, tmp_path) as (r, svc):
        steep, _ = tilted_plane(35.0)
        since = r.sim.clock()
        with pytest.raises(SweepError) as refused:
            svc.start_sweep("short", r.daemon.control, steep)
        assert refused.value.reason == "unreachable_waypoint"
        assert "waypoint 0 of 17" in str(refused.value)
        assert r.daemon.control.supervisor.operator is None  # the lease was never taken
        assert svc.sweep is None and svc.recording is None
        await wait_for(lambda: r.sim.clock() > since + 0.5, 10)
        assert r.moved_after(since) == []


@pytest.mark.parametrize("spec", [dict(start=(0.0, 0.0), end=(0.0, 0.0)),
                                  dict(kind="fan", fan_rad=0.0), dict(speed=0.0)])
def test_bad_sweeps_are_refused_by_the_config(spec: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SweepSpec(**spec)  # type: ignore[arg-type]


async def test_sweep_completes_with_pose_stamped_frames_and_a_valid_recording(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with us_rig(broker.port, tmp_path) as (r, svc), us_client(r, "dr-lee") as doctor:
        reply = await us_request(doctor, "sweep_start", {"name": "short"})
        assert (reply.ok, reply.reason) == (True, "ok")
        run = svc.sweep
        assert run is not None
        assert await run.finished(30) == "completed"
        await wait_for(lambda: bool(svc.written), 20)
        listing = (await us_request(doctor, "list")).detail
    assert listing["sweep"]["outcome"] == "completed" and listing["recording"] is None
    ds = us_dicom.load(svc.written[0])
    assert us_dicom.validate(svc.written[0]) == []
    records = us_dicom.read_pose_sequence(ds)
    xs = [rec.tip_m[0] for rec in records]
    assert min(xs) < -0.006 and max(xs) > 0.006  # the recording spans the sweep
    assert max(rec.force_n or 0.0 for rec in records) > 2.0  # in contact, below the limits
    assert max(rec.force_n or 0.0 for rec in records) < SECTION.sweeps["short"].press_m * 1e4
    pixels = ds.pixel_array
    bright = [float(p.mean()) for p, rec in zip(pixels, records, strict=True)
              if (rec.force_n or 0) > 2.0]
    assert bright and min(bright) > 15


async def test_frames_carry_the_true_pose_at_their_capture_time(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with us_rig(broker.port, tmp_path) as (r, svc):
        run = svc.start_sweep("short", r.daemon.control, Surface())
        stamped = []
        while run.running:
            frame = await svc.next_frame()
            if frame.pose is not None and run.phase is Phase.SWEEPING:
                stamped.append(frame)
        assert run.outcome == "completed" and len(stamped) > 10
        for frame in stamped:
            assert frame.pose is not None
            truth = true_tip(r, frame.captured_at)
            # the tip moves at most 20 mm/s: 1 mm is 50 ms of timing error
            assert math.dist(frame.pose.pose.tip, truth) < 0.001


async def test_estop_mid_sweep_stops_it_and_the_robot(broker: Mosquitto, tmp_path: Path) -> None:
    async with us_rig(broker.port, tmp_path) as (r, svc), r.operator("dr-lee") as doctor:
        run = svc.start_sweep("slow", r.daemon.control, Surface())
        await wait_for(lambda: run.phase is Phase.SWEEPING and run.progress > 0.002, 20)
        await doctor.estop()
        assert await run.finished(5) == "estop_command"
        stopped_at = r.sim.clock()
        await wait_for(lambda: not r.moved_after(stopped_at + 1.0) and
                       r.sim.clock() > stopped_at + 1.5, 10)
        assert run.phase is Phase.STOPPED
        state = await doctor.wait_state(lambda s: s["state"] == "estop")
        assert state["lease"] is None
        await wait_for(lambda: bool(svc.written), 20)  # what was captured is kept


async def test_force_limit_stops_the_sweep(broker: Mosquitto, tmp_path: Path) -> None:
    async with us_rig(broker.port, tmp_path) as (r, svc):
        run = svc.start_sweep("deep", r.daemon.control, Surface())
        assert await run.finished(30) == "force_limit"
        assert r.daemon.control.supervisor.operator is None
        assert r.world.contact_force()[0] < SECTION.sweeps["deep"].press_m * 1500


async def test_take_over_passes_the_lease_and_hand_back_resumes(
        broker: Mosquitto, tmp_path: Path) -> None:
    async with us_rig(broker.port, tmp_path) as (r, svc), \
            us_client(r, "dr-lee") as doctor_us, r.operator("dr-lee") as doctor:
        assert (await us_request(doctor_us, "sweep_start", {"name": "slow"})).ok
        run = svc.sweep
        assert run is not None
        await wait_for(lambda: run.phase is Phase.SWEEPING and run.progress > 0.002, 20)
        paused = await us_request(doctor_us, "sweep_pause")
        assert paused.ok and paused.detail["phase"] == "paused"
        held = run.progress
        reply = await us_request(doctor_us, "take_over")
        assert reply.ok and reply.detail["phase"] == "taken_over"
        assert r.daemon.control.supervisor.operator == "dr-lee"
        assert run.progress == held and run.running
        # the doctor steers: their setpoints move the robot, the sweep's no longer arrive
        doctor.command(True, Twist((0.01, 0.0, 0.0), (0.0, 0.0, 0.0)))
        await doctor.start_stream(100)
        start_x = r.tip()[0]

        def commanded_x() -> float:
            output = r.daemon.control.last_output
            return -1.0 if output is None else output.pose.tip_x
        try:  # the supervisor follows the doctor now (the commanded pose is theirs)
            await wait_for(lambda: commanded_x() > start_x + 0.002, 20)
        except TimeoutError:
            pytest.fail(f"the doctor could not steer: {r.daemon.state_document()}")
        await doctor.stop_stream()
        refused = await us_request(doctor_us, "sweep_resume")
        assert (refused.ok, refused.reason) == (False, "wrong_phase")
        back = await us_request(doctor_us, "hand_back")
        assert back.ok and back.detail["phase"] == "approach"
        assert r.daemon.control.supervisor.operator == run.operator
        outcome = await run.finished(60)
        assert outcome == "completed", (outcome, r.sim.watchdog_trips)
        assert run.progress == pytest.approx(run.spec.length)
        assert r.tip()[0] == pytest.approx(SLOW.end[0], abs=0.0015)  # back on its path, at the end


async def test_sweep_requests_are_refused_by_name(broker: Mosquitto, tmp_path: Path) -> None:
    async with us_rig(broker.port, tmp_path) as (r, _), us_client(r, "dr-lee") as doctor_us, \
            r.operator("alice") as alice:
        unknown = await us_request(doctor_us, "sweep_start", {"name": "nope"})
        assert (unknown.ok, unknown.reason) == (False, "unknown_sweep")
        nothing = await us_request(doctor_us, "take_over")
        assert (nothing.ok, nothing.reason) == (False, "no_sweep")
        assert (await alice.arm()).ok  # someone else holds the lease: no sweep
        busy = await us_request(doctor_us, "sweep_start", {"name": "short"})
        assert (busy.ok, busy.reason) == (False, "foreign_operator")
        stop = await us_request(doctor_us, "record_stop")
        assert (stop.ok, stop.reason) == (False, "not_recording")
        await alice.disarm()


async def medge_us(r: Rig, *argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        str(MEDGE), "us", "--broker", f"127.0.0.1:{r.broker.port}",
        "--robot", f"{r.topics.site}/{r.topics.node}", "--user", "dr-lee", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_cli_lists_starts_and_refuses(broker: Mosquitto, tmp_path: Path) -> None:
    async with us_rig(broker.port, tmp_path) as (r, svc):
        code, output = await medge_us(r, "list")
        assert code == 0, output
        listing = json.loads(output)
        assert listing["ok"] and set(listing["sweeps"]) == set(SECTION.sweeps)
        code, output = await medge_us(r, "sweep", "start", "nope")
        assert code == 1 and json.loads(output)["reason"] == "unknown_sweep"
        code, output = await medge_us(r, "sweep", "start")
        assert code == EXIT_USAGE and "NAME" in output
        code, output = await medge_us(r, "sweep", "start", "short")
        assert code == 0, output
        run = svc.sweep
        assert run is not None and run.operator == "sweep.short"
        assert r.daemon.control.supervisor.operator == "sweep.short"
        code, output = await medge_us(r, "sweep", "abort")
        assert code == 0, output
        assert await run.finished(5) == "aborted"
        assert r.daemon.control.supervisor.operator is None
