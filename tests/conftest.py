"""Suite-wide fixtures. ``no_leaks`` (autouse) fails any test that leaves behind an asyncio task,
a thread or a child process, in the manner of pymodbus' ``system_health_check``."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

LEAK_GRACE_S = 2.0

pytest_plugins = ["tests.fixtures.broker", "tests.fixtures.orthanc"]


def child_pids() -> set[int]:
    """Live (non-zombie) children of this process."""
    me = str(os.getpid())
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            found.add(int(entry.name))
    return found


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """Wrap coroutine tests so that tasks still pending when the test returns fail it."""
    function = getattr(item, "obj", None)
    if function is None or not inspect.iscoroutinefunction(function):
        return

    @functools.wraps(function)
    async def checked(*args: object, **kwargs: object) -> None:
        await function(*args, **kwargs)
        me = asyncio.current_task()
        deadline = time.monotonic() + LEAK_GRACE_S
        while True:
            others = {t for t in asyncio.all_tasks() if t is not me and not t.done()}
            if not others or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        if others:
            names = ", ".join(sorted(f"{t.get_name()}:{t.get_coro()!r}"[:120] for t in others))
            for task in others:
                task.cancel()
            pytest.fail(f"test leaked {len(others)} asyncio task(s): {names}")

    item.obj = checked  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    threads_before = set(threading.enumerate())
    children_before = child_pids()
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        new_threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        new_children = child_pids() - children_before
        if (not new_threads and not new_children) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if new_threads:
        pytest.fail(f"test leaked threads: {[t.name for t in new_threads]}")
    if new_children:
        pytest.fail(f"test leaked child processes: {sorted(new_children)}")
