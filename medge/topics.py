"""The MQTT topic namespace: ``medge/v1/{site}/{node}/{device}/{kind}`` (docs/telemetry.md)."""

from __future__ import annotations

from dataclasses import dataclass

from medge.settings import check_topic_level

ROOT = "medge/v1"

KINDS = frozenset({"obs", "alert", "status", "state", "health", "cmd", "reply", "job"})
"""Known kinds; ``status`` is birth/death, ``health`` the outbox/link health report."""


@dataclass(frozen=True)
class Topics:
    site: str
    node: str

    def __post_init__(self) -> None:
        check_topic_level("site", self.site)
        check_topic_level("node", self.node)

    def topic(self, device: str, kind: str) -> str:
        check_topic_level("device", device)
        if kind not in KINDS:
            raise ValueError(f"unknown topic kind {kind!r} (expected one of {sorted(KINDS)})")
        return f"{ROOT}/{self.site}/{self.node}/{device}/{kind}"

    def filter(self, device: str = "+", kind: str = "#") -> str:
        """A subscription filter within this node, e.g. every kind of one device."""
        return f"{ROOT}/{self.site}/{self.node}/{device}/{kind}"


def parse(topic: str) -> tuple[str, str, str, str]:
    """Split a medge topic into (site, node, device, kind); ``ValueError`` if it is not one."""
    parts = topic.split("/")
    if len(parts) != 6 or "/".join(parts[:2]) != ROOT or parts[5] not in KINDS:
        raise ValueError(f"not a medge topic: {topic!r}")
    return parts[2], parts[3], parts[4], parts[5]
