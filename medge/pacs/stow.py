"""DICOMweb STOW-RS with the standard library: one multipart/related POST per instance (retry
granularity on flaky links), the file streamed from disk, and the per-instance result checked in
the response (reference: an empty FailedSOPSequence is success; absent is too)."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from medge.pacs.base import (
    InstanceRef,
    PacsSender,
    PermanentPacsError,
    TransientPacsError,
    run_blocking,
)
from medge.pacs.config import Destination

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
MAX_RESPONSE_BYTES = 4 << 20
CHUNK = 1 << 20
TRANSIENT_HTTP = {408, 429}


def _transient_failure_reason(reason: int | None) -> bool:
    """0xA7xx out of resources and 0x0110 processing failure may clear on a later attempt."""
    return reason is not None and (reason & 0xFF00 == 0xA700 or reason == 0x0110)


class StowSender(PacsSender):
    def __init__(self, destination_name: str, destination: Destination) -> None:
        super().__init__(destination_name)
        self.destination = destination
        parts = urlsplit(destination.url.rstrip("/"))
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._path = f"{parts.path}/studies"

    def _authorization(self) -> str | None:
        destination = self.destination
        if destination.token_file is not None:
            return f"Bearer {destination.token_file.value}"
        if destination.password_file is not None:
            pair = f"{destination.username}:{destination.password_file.value}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        return None

    def _connection(self) -> http.client.HTTPConnection:
        timeout = self.destination.timeout_s
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _post(self, path: Path) -> tuple[int, bytes]:
        boundary = f"medge-{uuid.uuid4().hex}"
        prefix = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode()
        suffix = f"\r\n--{boundary}--\r\n".encode()
        connection = self._connection()
        try:
            with open(path, "rb") as source:
                size = Path(path).stat().st_size
                connection.putrequest("POST", self._path)
                connection.putheader("Content-Type", "multipart/related; "
                                     f'type="application/dicom"; boundary={boundary}')
                connection.putheader("Accept", "application/dicom+json")
                connection.putheader("Content-Length", str(len(prefix) + size + len(suffix)))
                authorization = self._authorization()
                if authorization:
                    connection.putheader("Authorization", authorization)
                connection.endheaders()
                connection.send(prefix)
                while chunk := source.read(CHUNK):
                    connection.send(chunk)
                connection.send(suffix)
            response = connection.getresponse()
            return response.status, response.read(MAX_RESPONSE_BYTES)
        finally:
            connection.close()

    async def _do_open(self, instances: list[InstanceRef]) -> None:
        """Nothing to negotiate: every POST carries its own authorization."""

    async def _do_close(self) -> None:
        """Each POST closes its own connection."""

    async def _do_store(self, instance: InstanceRef) -> None:
        where = self.where(instance)
        try:
            status, body = await run_blocking(lambda: self._post(instance.path),
                                              f"stow-{self.destination_name}")
        except (OSError, http.client.HTTPException) as exc:
            raise TransientPacsError(
                f"{where}: STOW-RS to {self.destination.url} failed: {exc or type(exc).__name__}"
            ) from exc
        if status in (401, 403):
            raise PermanentPacsError(f"{where}: STOW-RS authentication refused (HTTP {status});"
                                     " check username/password_file or token_file")
        if status >= 500 or status in TRANSIENT_HTTP:
            raise TransientPacsError(f"{where}: STOW-RS HTTP {status}")
        if status not in (200, 202, 409):
            raise PermanentPacsError(f"{where}: STOW-RS HTTP {status}: {body[:200]!r}")
        self._check_result(instance, status, body)

    def _check_result(self, instance: InstanceRef, status: int, body: bytes) -> None:
        where = self.where(instance)
        try:
            result: Any = json.loads(body) if body.strip() else {}
        except ValueError:
            raise PermanentPacsError(
                f"{where}: STOW-RS response is not JSON: {body[:200]!r}"
            ) from None
        if isinstance(result, list):  # some servers wrap the dataset in a list
            result = result[0] if result else {}
        if not isinstance(result, dict):
            raise PermanentPacsError(f"{where}: STOW-RS response is not a DICOM JSON object")
        failed = result.get(FAILED_SOP_SEQUENCE, {}).get("Value") or []
        if failed:
            reason = _first_value(failed[0].get(FAILURE_REASON))
            text = f"{where}: PACS refused the instance (FailureReason {reason})"
            if _transient_failure_reason(reason):
                raise TransientPacsError(text)
            raise PermanentPacsError(text)
        stored = {
            _first_value(item.get(REFERENCED_SOP_INSTANCE_UID))
            for item in result.get(REFERENCED_SOP_SEQUENCE, {}).get("Value") or []
        }
        if instance.sop_instance_uid not in stored:
            raise PermanentPacsError(f"{where}: STOW-RS HTTP {status} without a reference"
                                     " to the instance: not confirmed")


def _first_value(element: Any) -> Any:
    if isinstance(element, dict) and element.get("Value"):
        return element["Value"][0]
    return None
