"""The teleoperation rig for tests and bench/teleop: real mosquitto, simulators in-process.

``rig(broker_port, tmp_path)`` starts the Dynamixel simulator (TCP), the load cell (pty) over
the patient surface, the virtual RGB-D camera (fed by the simulator's *true* servo angles), and
the manipulator daemon composed exactly as ``medge run manipulator`` composes it; ``operator()``
connects a :class:`~medge.teleop.TeleopClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemons.manipulator.daemon import ManipulatorConfig, ManipulatorDaemon, ManipulatorSection
from daemons.manipulator.registration import RegistrationSection
from daemons.manipulator.teleop_protocol import Command
from firmware_sim.dynamixel import DynamixelSim, Packet
from firmware_sim.force import ForceSim
from firmware_sim.link import Endpoint, Faults, SimulatorServer
from firmware_sim.probe_world import ProbeWorld
from firmware_sim.rgbd_camera import VirtualRgbdCamera
from medge.runtime import Runtime
from medge.settings import MqttSection, NodeSection
from medge.teleop import Broker, RequestTimeout, RobotTopics, TeleopClient
from tests.helpers import frozen_heap

SITE, NODE, ROBOT = "test-site", "edge-1", "probe-arm"
SYNC_WRITE = 0x83
GOAL_POSITION = 116


class RecordingSim(DynamixelSim):
    """The Dynamixel simulator, noting the host-clock receipt time of every goal Sync Write."""

    def __init__(self) -> None:
        super().__init__()
        self.goal_writes: list[float] = []

    def handle(self, packet: Packet) -> list[tuple[bytes, float]]:
        if packet.instruction == SYNC_WRITE and packet.params[:2] == GOAL_POSITION.to_bytes(
                2, "little"):
            self.goal_writes.append(self.clock())
        return super().handle(packet)


@dataclass
class Rig:
    sim: RecordingSim
    force: ForceSim
    world: ProbeWorld
    camera: VirtualRgbdCamera
    daemon: ManipulatorDaemon
    cfg: ManipulatorConfig
    broker: Broker

    @property
    def topics(self) -> RobotTopics:
        return self.daemon.topics

    def tip(self) -> tuple[float, float, float]:
        return self.world.tip_and_axis()[0]

    @contextlib.asynccontextmanager
    async def operator(self, name: str = "alice") -> AsyncIterator[TeleopClient]:
        async with TeleopClient(self.broker, self.topics, name) as client:
            yield client

    def moved_after(self, since: float) -> list[float]:
        """Simulation times after ``since`` at which any servo position changed."""
        samples = [s for s in self.sim.motion_log if s.time > since]
        return [b.time for a, b in itertools.pairwise(samples)
                if a.positions != b.positions]


def manipulator_config(state_dir: Path, port: int, **section: Any) -> ManipulatorConfig:
    return ManipulatorConfig(
        node=NodeSection(site=SITE, node=NODE, state_dir=state_dir),
        mqtt=MqttSection(port=port, reconnect_min=0.05, reconnect_max=0.5, keepalive=5),
        manipulator=ManipulatorSection(**section),
    )


@contextlib.asynccontextmanager
async def rig(
    port: int, state_dir: Path, *, camera_options: dict[str, Any] | None = None,
    bus_faults: Faults | None = None, **section: Any,
) -> AsyncIterator[Rig]:
    sim = RecordingSim()
    for servo in sim.servos:
        servo.table[9] = 0  # return delay 0, as configured on the real bus
    world = ProbeWorld(sim.positions)
    force = ForceSim(lambda: world.contact_force()[0], noise_n=0.0)
    camera = VirtualRgbdCamera(sim.positions, **(camera_options or {}))
    section.setdefault("registration", RegistrationSection(camera="simulated"))
    with frozen_heap():
        async with sim.serving(faults=bus_faults) as bus_server, \
                SimulatorServer(force.serve, Endpoint("pty")) as force_server:
            cfg = manipulator_config(state_dir, port, bus=bus_server.address,
                                     force_sensor=force_server.address, **section)
            async with Runtime(cfg, "manipulator") as rt, \
                    ManipulatorDaemon(cfg, rt, camera) as daemon:
                await rt.link.wait_connected(10)
                ready = Rig(sim, force, world, camera, daemon, cfg, Broker(port=port))
                await wait_subscribed(ready)
                yield ready


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def wait_subscribed(r: Rig) -> None:
    """The daemon subscribes in the background: probe until its request path answers."""
    async with r.operator("readiness-probe") as probe:
        async with asyncio.timeout(10):
            while True:
                try:
                    await probe.request(Command.MODE, {"mode": "normal"}, timeout=0.5)
                    break
                except RequestTimeout:
                    continue
    r.daemon.rejected.clear()
    r.daemon.last_rejected_operator = None
