"""Configuration sections every daemon shares: node identity, MQTT link, outbox, logging.

A daemon's schema subclasses :class:`DaemonConfig` and adds its own section, e.g.::

    @dataclass(frozen=True)
    class GatewayConfig(DaemonConfig):
        gateway: GatewaySection = field(default_factory=GatewaySection)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medge.config import Secret, bounds

TOPIC_LEVEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_topic_level(name: str, value: str) -> None:
    """MQTT topic levels must not contain wildcards, separators or spaces."""
    if not TOPIC_LEVEL.match(value):
        raise ValueError(
            f"{name} {value!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )


@dataclass(frozen=True)
class NodeSection:
    site: str
    """Hospital site or patient home, the second topic level."""
    node: str
    """This edge box."""
    state_dir: Path = Path("/var/lib/medge")
    """Where durable state (outbox, spool, jobs) lives; systemd's StateDirectory."""

    def validate(self) -> None:
        check_topic_level("site", self.site)
        check_topic_level("node", self.node)


@dataclass(frozen=True)
class TlsSection:
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    """Private key for mutual TLS; must be readable only by its owner."""

    def validate(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")
        if self.key_file is not None:
            Secret.read(self.key_file)  # refuse a key readable by group/other, or missing


@dataclass(frozen=True)
class MqttSection:
    host: str = "127.0.0.1"
    port: int = field(default=1883, metadata=bounds(min=1, max=65535))
    username: str | None = None
    password_file: Secret | None = None
    client_id: str | None = None
    """Defaults to medge-{node}-{daemon}."""
    keepalive: int = field(default=30, metadata=bounds(min=1, max=3600))
    """Seconds; the broker declares the link dead after 1.5 times this."""
    tls: TlsSection | None = None
    reconnect_min: float = field(default=0.5, metadata=bounds(min=0.01, max=60))
    reconnect_max: float = field(default=30.0, metadata=bounds(min=0.1, max=3600))
    connect_timeout: float = field(default=10.0, metadata=bounds(min=0.1, max=300))

    def validate(self) -> None:
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs a username")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be at least reconnect_min")


@dataclass(frozen=True)
class OutboxSection:
    max_bytes: int = field(default=256 * 1024 * 1024, metadata=bounds(min=64 * 1024))
    """Bound on stored payload bytes; past it the overflow policy evicts (docs/telemetry.md)."""
    warn_fraction: float = field(default=0.8, metadata=bounds(min=0.1, max=1.0))
    """Fill level that raises a technical alert."""
    sync: Literal["full", "normal", "off"] = "full"
    """full: fsync every group commit (power-loss safe); normal: survives a process crash."""
    group_commit_ms: float = field(default=2.0, metadata=bounds(min=0.0, max=1000))
    """How long an append may wait to share one fsync with other appends."""
    ttl: dict[str, float] = field(
        default_factory=lambda: {"status": 300.0, "state": 60.0}, metadata=bounds(min=0.0)
    )
    """Seconds per kind after which an unsent record is dropped (and counted). No entry: no TTL."""
    max_inflight: int = field(default=100, metadata=bounds(min=1, max=65535))


@dataclass(frozen=True)
class LogSection:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    """auto: JSON lines unless stdout is a terminal."""


@dataclass(frozen=True)
class DaemonConfig:
    node: NodeSection
    mqtt: MqttSection = field(default_factory=MqttSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    log: LogSection = field(default_factory=LogSection)
