"""The sender contract shared by C-STORE and STOW-RS, the error classes the spool acts on, and
the helper that runs blocking network code in a thread that is always joined."""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")


class PacsError(Exception):
    """Delivery failed; the message names the destination, the instance and the reason."""


class TransientPacsError(PacsError):
    """Worth retrying later: PACS down, association rejected transiently, HTTP 5xx, timeout."""


class PermanentPacsError(PacsError):
    """Retrying will not help (wrong AE title, SOP class refused, auth refused): needs a human.
    The spooled data is kept."""


@dataclass(frozen=True)
class InstanceRef:
    """What a sender needs to know about a file before opening the connection."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


async def run_blocking(function: Callable[[], T], name: str) -> T:
    """Run ``function`` in its own thread and join it before returning, also on cancellation
    (the blocking call has its own timeout), so no thread outlives the call."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def target() -> None:
        try:
            result = function()
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
            loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise
    finally:
        thread.join()


class PacsSender(ABC):
    """One connection to one destination; ``async with sender.session(refs):`` then ``store``
    each instance. Subclasses implement the ``_do_*`` hooks."""

    def __init__(self, destination_name: str) -> None:
        self.destination_name = destination_name

    async def open(self, instances: list[InstanceRef]) -> None:
        """Connect, negotiating for the SOP classes and transfer syntaxes of ``instances``."""
        await self._do_open(instances)

    async def store(self, instance: InstanceRef) -> None:
        """Send one instance; returns only once the PACS confirmed it."""
        await self._do_store(instance)

    async def close(self) -> None:
        await self._do_close()

    async def __aenter__(self) -> PacsSender:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def where(self, instance: InstanceRef | None = None) -> str:
        return f"{self.destination_name}" + (f": {instance.path.name}" if instance else "")

    @abstractmethod
    async def _do_open(self, instances: list[InstanceRef]) -> None: ...

    @abstractmethod
    async def _do_store(self, instance: InstanceRef) -> None: ...

    @abstractmethod
    async def _do_close(self) -> None: ...
