"""structlog set-up: JSON lines for journald, readable lines on a terminal.

Every line carries ``daemon`` and ``device``. :class:`StateLog` logs a state transition once
(connected -> lost -> recovered) instead of one line per retry.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class _Current:
    """Writes to whatever ``sys.stdout``/``sys.stderr`` is at the time (it may be replaced after
    set-up)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        return int(getattr(sys, self.name).write(text))

    def flush(self) -> None:
        getattr(sys, self.name).flush()


def configure(level: str = "info", fmt: str = "auto", *, stream: str = "stdout",
              **context: Any) -> None:
    """Configure structlog for this process; ``context`` (daemon, device) goes on every line.
    ``stream="stderr"`` for commands whose stdout is their result (``medge console``'s URL)."""
    use_json = fmt == "json" or (fmt == "auto" and not getattr(sys, stream).isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(_Current(stream)),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**{"daemon": "medge", "device": "-", **context})


def get_logger(**context: Any) -> Any:
    return structlog.get_logger().bind(**context)


class StateLog:
    """Logs a named state only when it changes, so a retry loop does not flood the journal."""

    def __init__(self, logger: Any, subject: str) -> None:
        self._logger = logger
        self._subject = subject
        self.state: str | None = None

    def set(self, state: str, level: str = "info", **fields: Any) -> bool:
        """Record ``state``; log it (and return True) only if it differs from the last one."""
        if state == self.state:
            return False
        previous, self.state = self.state, state
        getattr(self._logger, level)(f"{self._subject} {state}", previous=previous, **fields)
        return True
