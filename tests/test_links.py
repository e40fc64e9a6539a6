"""The driver-side SerialLink against the simulator-side SimulatorServer, over TCP and a pty."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import pytest

from drivers.serial_link import LinkError, SerialLink
from firmware_sim.link import DeviceLink, Endpoint, Faults, HostDisconnected, SimulatorServer


async def echo_upper(link: DeviceLink) -> None:
    try:
        while True:
            await link.write((await link.read()).upper())
    except HostDisconnected:
        pass


@pytest.mark.parametrize("where", ["tcp://127.0.0.1:0", "pty"])
async def test_round_trip(where: str) -> None:
    async with SimulatorServer(echo_upper, Endpoint.parse(where)) as server:
        async with SerialLink.open(server.address) as link:
            await link.write(b"hello\n")
            assert await link.read_until(b"\n", timeout=2) == b"HELLO\n"
            await link.write(b"abc")
            assert await link.read_exactly(3, timeout=2) == b"ABC"


async def test_read_timeout_when_device_stalls() -> None:
    faults = Faults()
    async with SimulatorServer(echo_upper, Endpoint.parse("tcp://127.0.0.1:0"), faults) as server:
        async with SerialLink.open(server.address) as link:
            faults.stall()
            await link.write(b"ping\n")
            with pytest.raises(TimeoutError):
                await link.read_until(b"\n", timeout=0.2)
            faults.stall(False)
            await link.write(b"pong\n")
            assert await link.read_until(b"\n", timeout=2) == b"PONG\n"


async def test_disconnect_is_reported() -> None:
    faults = Faults()
    async with SimulatorServer(echo_upper, Endpoint.parse("tcp://127.0.0.1:0"), faults) as server:
        async with SerialLink.open(server.address) as link:
            faults.disconnect()
            with pytest.raises(LinkError, match="disconnected"):
                await link.read(timeout=2)
            with pytest.raises(LinkError, match="disconnected"):  # not dropped with a warning
                await link.write(b"anyone there?\n")


async def test_a_connection_reset_closes_the_link() -> None:
    """A device end that vanishes with a reset (no end of file) leaves the link not open, so
    its owner knows to reopen it."""
    async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        linger_off = struct.pack("ii", 1, 0)  # close with a RST, as a killed process may
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   linger_off)
        writer.transport.abort()

    server = await asyncio.start_server(reset_at_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with SerialLink.open(f"socket://127.0.0.1:{port}") as link:
            assert link.is_open
            await link.write(b"xyz")
            with pytest.raises(LinkError, match="disconnected"):  # as an end of file: the
                await link.read(timeout=2)  # GRBL reader only expects LinkError (chaos)
            assert not link.is_open
            with pytest.raises(LinkError, match="disconnected"):
                await link.write(b"y")
    finally:
        server.close()
        with contextlib.suppress(ConnectionError):
            await server.wait_closed()


async def test_corruption_changes_bytes() -> None:
    faults = Faults(corrupt_rate=1.0, seed=1)
    async with SimulatorServer(echo_upper, Endpoint.parse("tcp://127.0.0.1:0"), faults) as server:
        async with SerialLink.open(server.address) as link:
            await link.write(b"abcdef")
            data = await link.read_exactly(6, timeout=2)
            assert data != b"ABCDEF"
            assert all(bin(a ^ b).count("1") == 1 for a, b in zip(data, b"ABCDEF", strict=True))


async def test_open_unreachable_url_names_it() -> None:
    with pytest.raises(LinkError, match="socket://127.0.0.1:1"):
        await SerialLink.open("socket://127.0.0.1:1").connect()


def test_bad_listen_url() -> None:
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        Endpoint.parse("udp://x")
