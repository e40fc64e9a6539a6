"""Enrolment: the only source of patient identity (clinical-data.md §2.4).

``medge gateway pair`` writes ``gateway-enrolment.json`` in the state directory, pairing this
gateway with a pseudonymous patient id and, optionally, naming the devices (KIND:SERIAL) paired
with it. Observations get ``subject`` from here and nowhere else: a patient id typed on a
device keypad (the ASTM P record, a printout's ``ID:``) is ignored. A device missing from a
non-empty device list, or a gateway with no enrolment, sends observations without a subject,
``preliminary`` and tagged ``unpaired``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ENROLMENT_FILE = "gateway-enrolment.json"
PSEUDONYM = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
"""A FHIR id: what goes into ``Patient/<id>``."""
DEVICE_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]*:[^\s:]{1,64}$")


class EnrolmentError(ValueError):
    """An enrolment file or a pairing request is invalid; the message names what and where."""


@dataclass(frozen=True)
class Enrolment:
    patient: str
    paired_at: str
    devices: tuple[str, ...] = ()
    """``KIND:SERIAL`` keys; empty means every device on this gateway belongs to the patient."""

    def subject_for(self, device_kind: str, serial: str) -> str | None:
        """The patient id for a device's data, or None when that device is not paired."""
        if not self.devices or f"{device_kind}:{serial}" in self.devices:
            return self.patient
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"patient": self.patient, "paired_at": self.paired_at,
                "devices": list(self.devices)}


def path_in(state_dir: Path) -> Path:
    return state_dir / ENROLMENT_FILE


def make(patient: str, devices: list[str], now: datetime | None = None) -> Enrolment:
    """Validate a pairing request."""
    if not PSEUDONYM.match(patient):
        raise EnrolmentError(
            f"patient {patient!r}: a pseudonym is 1-64 letters, digits, '-' or '.'")
    for key in devices:
        if not DEVICE_KEY.match(key):
            raise EnrolmentError(f"device {key!r}: expected KIND:SERIAL, e.g. cms50:SIM0001")
    stamp = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    return Enrolment(patient, stamp, tuple(dict.fromkeys(devices)))


def save(state_dir: Path, enrolment: Enrolment) -> Path:
    """Write atomically (temp file, fsync, rename) so a power cut leaves old or new, never half."""
    state_dir.mkdir(parents=True, exist_ok=True)
    target = path_in(state_dir)
    fd, temp = tempfile.mkstemp(prefix=".enrolment-", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(enrolment.as_dict(), handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return target


def load(state_dir: Path) -> Enrolment | None:
    """The current enrolment, None if the gateway was never paired."""
    path = path_in(state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnrolmentError(f"{path}: unreadable enrolment: {exc}") from exc
    if not isinstance(data, dict):
        raise EnrolmentError(f"{path}: expected a JSON object")
    try:
        enrolment = make(data["patient"], list(data.get("devices", [])))
    except (KeyError, TypeError) as exc:
        raise EnrolmentError(f"{path}: missing or malformed field {exc}") from exc
    except EnrolmentError as exc:
        raise EnrolmentError(f"{path}: {exc}") from exc
    return Enrolment(enrolment.patient, str(data.get("paired_at", "")), enrolment.devices)


class EnrolmentWatcher:
    """Reloads the enrolment when the file changes, so pairing needs no restart."""

    def __init__(self, state_dir: Path) -> None:
        self.path = path_in(state_dir)
        self._state_dir = state_dir
        self._stamp: tuple[int, int] | None = None
        self.current: Enrolment | None = None
        self.error: str | None = None

    def refresh(self) -> bool:
        """Reload if the file changed; True when the enrolment changed. Errors are kept in
        ``error`` (data then goes out unpaired rather than under a guessed identity)."""
        try:
            info = self.path.stat()
            stamp: tuple[int, int] | None = (info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and self._stamp is not None:
            return False
        self._stamp = stamp
        before = self.current
        try:
            self.current, self.error = load(self._state_dir), None
        except EnrolmentError as exc:
            self.current, self.error = None, str(exc)
        return before != self.current
