"""A third-party host library (ROBOTIS' own dynamixel-sdk) drives the simulated bus over a pty.

This is what ``medge sim dynamixel --pty`` promises: the simulator is a Dynamixel bus, not a
medge-specific fake. The SDK is blocking, so it runs in a worker thread of its own executor
while the simulator serves from the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from drivers.dynamixel import rad_to_ticks
from firmware_sim.dynamixel import DynamixelSim

sdk: Any = pytest.importorskip("dynamixel_sdk")

T = TypeVar("T")
ADDR_TORQUE_ENABLE, ADDR_GOAL_POSITION, ADDR_PRESENT_POSITION = 64, 116, 132


async def in_thread(executor: ThreadPoolExecutor, work: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(executor, work)


async def test_robotis_sdk_pings_writes_and_sync_reads_the_simulator() -> None:
    sim = DynamixelSim()
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        async with sim.serving("pty") as server:
            port = sdk.PortHandler(server.address)
            packets = sdk.PacketHandler(2.0)
            assert await in_thread(executor, port.openPort)
            try:
                model, result, error = await in_thread(executor, lambda: packets.ping(port, 4))
                assert (model, result, error) == (1020, sdk.COMM_SUCCESS, 0)

                result, error = await in_thread(executor, lambda: packets.write1ByteTxRx(
                    port, 4, ADDR_TORQUE_ENABLE, 1))
                assert (result, error) == (sdk.COMM_SUCCESS, 0)
                # EEPROM is locked while torque is on: the SDK sees the servo's Access Error
                result, error = await in_thread(executor, lambda: packets.write1ByteTxRx(
                    port, 4, 11, 4))
                assert result == sdk.COMM_SUCCESS and error == 7

                goals = sdk.GroupSyncWrite(port, packets, ADDR_GOAL_POSITION, 4)
                for servo_id, angle in ((4, 0.3), (5, -0.2)):
                    assert goals.addParam(servo_id, list(rad_to_ticks(angle).to_bytes(4, "little")))
                await in_thread(executor, lambda: packets.write1ByteTxRx(
                    port, 5, ADDR_TORQUE_ENABLE, 1))
                assert await in_thread(executor, goals.txPacket) == sdk.COMM_SUCCESS

                states = sdk.GroupSyncRead(port, packets, ADDR_PRESENT_POSITION, 4)
                assert states.addParam(4) and states.addParam(5)

                def settled() -> bool:
                    if states.txRxPacket() != sdk.COMM_SUCCESS:
                        return False
                    return (states.getData(4, ADDR_PRESENT_POSITION, 4) == rad_to_ticks(0.3)
                            and states.getData(5, ADDR_PRESENT_POSITION, 4) == rad_to_ticks(-0.2))

                async with asyncio.timeout(10):
                    while not await in_thread(executor, settled):
                        await asyncio.sleep(0.01)
            finally:
                await in_thread(executor, port.closePort)
    finally:
        executor.shutdown(wait=True)
