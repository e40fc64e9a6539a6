"""PACS destinations and the spool's retry policy, loaded with :mod:`medge.config`.

Example (``config/pacs.example.toml``)::

    spool_dir = "/var/lib/medge/pacs-spool"
    [retry]
    initial_s = 5.0
    [destinations.lab-pacs]
    protocol = "dimse"
    host = "10.0.0.5"
    port = 4242
    called_ae = "ORTHANC"
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medge.config import Secret, bounds

AE_TITLE = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$")
"""1-16 printable ASCII characters, no backslash, no leading/trailing space (PS3.5 AE VR)."""


@dataclass(frozen=True)
class Destination:
    """One PACS. ``dimse`` needs host/port/called_ae; ``stow`` needs the DICOMweb base url."""

    protocol: Literal["dimse", "stow"]
    host: str = ""
    port: int = field(default=104, metadata=bounds(min=1, max=65535))
    called_ae: str = ""
    calling_ae: str = "MEDGE"
    url: str = ""
    """DICOMweb service root, e.g. ``http://pacs:8042/dicom-web``; STOW posts to url/studies."""
    username: str = ""
    password_file: Secret | None = None
    """Basic auth password (file mode 0600) used with ``username``."""
    token_file: Secret | None = None
    """Bearer token (file mode 0600); exclusive with username/password."""
    timeout_s: float = field(default=30.0, metadata=bounds(min=0, min_exclusive=True, max=3600))

    def validate(self) -> None:
        if self.protocol == "dimse":
            if not self.host:
                raise ValueError("protocol 'dimse' needs host")
            for name, title in (("called_ae", self.called_ae), ("calling_ae", self.calling_ae)):
                if not AE_TITLE.match(title):
                    raise ValueError(f"{name} {title!r} is not a valid AE title (1-16 ASCII)")
        else:
            if not re.match(r"^https?://[^/\s]+", self.url):
                raise ValueError(
                    f"protocol 'stow' needs url=http(s)://host[:port]/path, got {self.url!r}"
                )
            if bool(self.username) != (self.password_file is not None):
                raise ValueError("username and password_file go together (basic auth)")
            if self.token_file is not None and self.username:
                raise ValueError("use either token_file (bearer) or username/password_file (basic)")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff between delivery attempts of one queued series."""

    initial_s: float = field(default=5.0, metadata=bounds(min=0, min_exclusive=True))
    factor: float = field(default=2.0, metadata=bounds(min=1))
    max_s: float = field(default=600.0, metadata=bounds(min=0, min_exclusive=True))

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (1-based)."""
        return float(min(self.max_s, self.initial_s * self.factor ** max(0, failures - 1)))


@dataclass(frozen=True)
class PacsConfig:
    spool_dir: Path
    destinations: dict[str, Destination] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def destination(self, name: str) -> Destination:
        try:
            return self.destinations[name]
        except KeyError:
            known = ", ".join(sorted(self.destinations)) or "none configured"
            raise KeyError(f"unknown PACS destination {name!r} (known: {known})") from None
