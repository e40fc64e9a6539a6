"""Give the memory a finished batch of work freed back to the operating system.

glibc keeps pages freed in the middle of its heaps (and in the per-thread arenas) mapped, so
after a bursty job — a slide's tiles, stitched and encoded in worker threads — a daemon's
resident memory stays at the job's peak until the next one reuses it. ``malloc_trim(0)``
returns every whole free page. Other C libraries (musl) have no such call; there is nothing
to do there.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; True if any were returned (False also off glibc)."""
    trim = _malloc_trim()
    return trim is not None and trim(0) == 1
