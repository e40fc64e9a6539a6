"""The E1381 receiver (driver) against a scripted sender, the simulator against a scripted host,
and the driver against the simulator, with line faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from drivers.astm_link import ACK, ENQ, EOT, NAK, AstmReceiver, AstmTimers, checksum
from drivers.serial_link import LinkError, SerialLink
from firmware_sim.link import DeviceLink, Endpoint, SimulatorServer
from tests.test_astm_vectors import GOLDEN_FRAMES, GOLDEN_MESSAGE, GOLDEN_RECORDS

FAST = AstmTimers(frame=2.0, frame_complete=0.3)
TCP = Endpoint.parse("tcp://127.0.0.1:0")
PTY = Endpoint.parse("pty")


def frame(number: int, text: bytes, final: bool = True) -> bytes:
    body = b"%d" % number + text + (b"\x03" if final else b"\x17")
    return b"\x02" + body + checksum(body) + b"\r\n"


@asynccontextmanager
async def raw_device(where: Endpoint = TCP) -> AsyncIterator[tuple[SerialLink, DeviceLink]]:
    """A host link plus the raw device end, which the test drives byte by byte (shared by the
    printout and uroflow tests)."""
    connected: asyncio.Future[DeviceLink] = asyncio.get_running_loop().create_future()
    finished = asyncio.Event()

    async def handler(link: DeviceLink) -> None:
        connected.set_result(link)
        await finished.wait()

    async with SimulatorServer(handler, where) as server, SerialLink.open(server.address) as host:
        device = await asyncio.wait_for(connected, 5)
        try:
            yield host, device
        finally:
            finished.set()


async def reply(device: DeviceLink) -> bytes:
    return await asyncio.wait_for(device.read(), 5)


async def send_all(device: DeviceLink, frames: list[bytes]) -> None:
    """One sender session. A message ending with a terminator (L) frame stops there: the host
    holds that frame's ACK until its consumer asks for the next message (see held_ack tests)."""
    await device.write(ENQ)
    assert await reply(device) == ACK
    for data in frames:
        await device.write(data)
        if holds_ack(data):
            return
        assert await reply(device) == ACK
    await device.write(EOT)


def holds_ack(data: bytes) -> bool:
    """A final frame whose last record is the terminator (L): the host holds its ACK."""
    return data[-5:-4] == b"\x03" and data[2:-5].rstrip(b"\r").split(b"\r")[-1][:1] == b"L"


async def send_frames(device: DeviceLink, frames: list[bytes]) -> None:
    """Frames inside an open session, each ACKed but a terminator frame (held)."""
    for data in frames:
        await device.write(data)
        if not holds_ack(data):
            assert await reply(device) == ACK


async def test_receiver_takes_golden_session_after_garbage() -> None:
    async with raw_device() as (host, device):
        receiver = AstmReceiver(host, FAST)
        task = asyncio.create_task(receiver.receive_message())
        await device.write(b"\x00noise\r\n")
        await send_all(device, GOLDEN_FRAMES)
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE
        assert receiver.garbage_bytes == 8


async def test_bad_checksum_is_naked_and_retransmission_accepted() -> None:
    async with raw_device() as (host, device):
        receiver = AstmReceiver(host, FAST)
        task = asyncio.create_task(receiver.receive_message())
        await device.write(ENQ)
        assert await reply(device) == ACK
        await device.write(GOLDEN_FRAMES[0])
        assert await reply(device) == ACK
        await device.write(GOLDEN_FRAMES[1].replace(b"0A\r\n", b"FF\r\n"))
        assert await reply(device) == NAK
        await device.write(GOLDEN_FRAMES[1])
        assert await reply(device) == ACK
        await send_frames(device, GOLDEN_FRAMES[2:])
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE
        assert receiver.rejected_frames == 1


async def test_duplicate_frame_is_acked_once_and_ignored() -> None:
    async with raw_device() as (host, device):
        task = asyncio.create_task(AstmReceiver(host, FAST).receive_message())
        await send_all(device, [*GOLDEN_FRAMES[:3], GOLDEN_FRAMES[2], *GOLDEN_FRAMES[3:]])
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE


async def test_frame_out_of_sequence_is_naked() -> None:
    async with raw_device() as (host, device):
        task = asyncio.create_task(AstmReceiver(host, FAST).receive_message())
        await device.write(ENQ)
        assert await reply(device) == ACK
        await device.write(GOLDEN_FRAMES[1])  # frame 2 first
        assert await reply(device) == NAK
        task.cancel()


async def test_half_frame_is_naked_after_timeout_then_resent() -> None:
    async with raw_device() as (host, device):
        task = asyncio.create_task(AstmReceiver(host, FAST).receive_message())
        await device.write(ENQ)
        assert await reply(device) == ACK
        await device.write(GOLDEN_FRAMES[0][:20])
        assert await reply(device) == NAK
        await send_frames(device, GOLDEN_FRAMES)
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE


async def test_lost_frame_end_resynchronises_on_next_stx() -> None:
    async with raw_device() as (host, device):
        task = asyncio.create_task(AstmReceiver(host, FAST).receive_message())
        await device.write(ENQ)
        assert await reply(device) == ACK
        await device.write(GOLDEN_FRAMES[0][:30] + GOLDEN_FRAMES[0])  # retransmitted at once
        assert await reply(device) == ACK
        await send_frames(device, GOLDEN_FRAMES[1:])
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE


async def test_session_aborted_before_last_frame_delivers_nothing() -> None:
    async with raw_device() as (host, device):
        task = asyncio.create_task(AstmReceiver(host, FAST).receive_message())
        await send_all(device, [frame(1, b"H|\\^&\r", final=False)])
        await send_all(device, GOLDEN_FRAMES)  # the next session is complete
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE


async def test_etb_continuation_frames_are_joined() -> None:
    first, second = GOLDEN_MESSAGE[:100], GOLDEN_MESSAGE[100:]
    async with raw_device() as (host, device):
        task = asyncio.create_task(AstmReceiver(host, FAST).receive_message())
        await send_all(device, [frame(1, first, final=False), frame(2, second)])
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE


@pytest.mark.parametrize("wrap_to", [0, 1])
async def test_frame_numbers_wrap_mod_8_or_to_1(wrap_to: int) -> None:
    records = [b"H|\\^&\r", *[b"C|%d|I|x\r" % i for i in range(1, 8)], b"L|1|N\r"]
    numbers = [1, 2, 3, 4, 5, 6, 7, wrap_to, wrap_to + 1]
    async with raw_device() as (host, device):
        task = asyncio.create_task(AstmReceiver(host, FAST).receive_message())
        await send_all(device, [frame(n, r) for n, r in zip(numbers, records, strict=True)])
        assert await asyncio.wait_for(task, 5) == b"".join(records)


async def test_silent_sender_times_out_and_partial_message_is_dropped() -> None:
    timers = AstmTimers(frame=0.2, frame_complete=0.2)
    async with raw_device() as (host, device):
        task = asyncio.create_task(AstmReceiver(host, timers).receive_message())
        await device.write(ENQ)
        assert await reply(device) == ACK
        await device.write(frame(1, GOLDEN_MESSAGE[:100], final=False))
        assert await reply(device) == ACK
        # Both ends share this event loop, so the receiver's earlier deadline fires first.
        await asyncio.sleep(timers.frame * 2)
        await device.write(GOLDEN_FRAMES[1])
        assert await reply(device) == NAK  # a frame outside any session
        await send_all(device, GOLDEN_FRAMES)
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE


async def test_complete_message_survives_a_lost_eot() -> None:
    async with raw_device() as (host, device):
        receiver = AstmReceiver(host, FAST)
        task = asyncio.create_task(receiver.receive_message())
        await device.write(ENQ)
        assert await reply(device) == ACK
        await send_frames(device, GOLDEN_FRAMES[:-1])
        await device.write(frame(7, b"C|1|I|no terminator in this frame\r"))
        assert await reply(device) == ACK
        await device.write(ENQ)  # EOT lost; the next session starts
        assert await reply(device) == ACK
        assert await asyncio.wait_for(task, 5) == (
            GOLDEN_MESSAGE[:-len(GOLDEN_RECORDS[-1])] + b"C|1|I|no terminator in this frame\r")
        task = asyncio.create_task(receiver.receive_message())
        await device.write(frame(1, b"H|\\^&\rL|1|N\r"))
        assert await asyncio.wait_for(task, 5) == b"H|\\^&\rL|1|N\r"


async def test_unplugged_mid_frame_raises_link_error() -> None:
    async with raw_device() as (host, device):
        task = asyncio.create_task(AstmReceiver(host, FAST).receive_message())
        await device.write(ENQ)
        assert await reply(device) == ACK
        await device.write(GOLDEN_FRAMES[0][:25])
        device.closed = True
        await host.close()
        with pytest.raises(LinkError):
            await asyncio.wait_for(task, 5)


async def wait_for_input(host: SerialLink) -> None:
    """Until bytes the device wrote have reached the host's buffer (a pty link buffers them as
    they come; a socket link only when read)."""
    async with asyncio.timeout(5):
        while not host.pending():
            await asyncio.sleep(0.01)


async def test_terminator_ack_waits_until_the_consumer_asks_for_the_next_message() -> None:
    """The analyzer deletes a result on this ACK: it must not come before the result is stored."""
    async with raw_device() as (host, device):
        receiver = AstmReceiver(host, FAST)
        task = asyncio.create_task(receiver.receive_message())
        await send_all(device, GOLDEN_FRAMES)
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(device.read(), 0.3)
        task = asyncio.create_task(receiver.receive_message())  # "stored; next, please"
        assert await reply(device) == ACK
        await device.write(EOT)
        await send_all(device, GOLDEN_FRAMES)
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE
        task.cancel()


async def test_terminator_repeated_while_held_is_acked_once() -> None:
    async with raw_device(PTY) as (host, device):
        receiver = AstmReceiver(host, FAST)
        task = asyncio.create_task(receiver.receive_message())
        await send_all(device, GOLDEN_FRAMES)
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE
        await device.write(GOLDEN_FRAMES[-1])  # the sender's ACK timeout: it re-sends
        await wait_for_input(host)
        task = asyncio.create_task(receiver.receive_message())
        assert await reply(device) == ACK
        await device.write(EOT)
        await device.write(ENQ)
        assert await reply(device) == ACK  # one byte: no stray second ACK
        task.cancel()


async def test_sender_giving_up_while_held_gets_no_ack_and_sends_again() -> None:
    async with raw_device(PTY) as (host, device):
        receiver = AstmReceiver(host, FAST)
        task = asyncio.create_task(receiver.receive_message())
        await send_all(device, GOLDEN_FRAMES)
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE
        await device.write(EOT)  # the sender gave up on the ACK and keeps the result
        await wait_for_input(host)
        task = asyncio.create_task(receiver.receive_message())
        await send_all(device, GOLDEN_FRAMES)  # ENQ answered by one ACK, not the held one
        assert await asyncio.wait_for(task, 5) == GOLDEN_MESSAGE
