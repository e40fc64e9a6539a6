"""medge.memory: freed heap pages really go back to the operating system."""

from __future__ import annotations

import platform

import pytest

from medge.memory import release_free_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")

CHUNK = 64 * 1024  # below glibc's mmap threshold: served from the heap, not its own mapping


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def test_pages_freed_in_the_middle_of_the_heap_are_returned() -> None:
    chunks = [bytearray(CHUNK) for _ in range(3200)]  # 200 MiB, every page touched
    kept = chunks[::16]  # the survivors pin the heap: free() alone can trim only its top
    del chunks
    before = resident_mib()
    assert release_free_memory()
    after = resident_mib()
    assert before - after > 100, (before, after)
    assert all(len(chunk) == CHUNK for chunk in kept)
