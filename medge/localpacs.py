"""A local Orthanc PACS (Debian orthanc + orthanc-dicomweb + orthanc-wsi) for the demo and the
tests: free loopback ports, its own config and storage directory, HTTP basic auth with one
registered user, the called AE title checked. Orthanc 1.10 binds its ports on all interfaces
(no bind-address key) with ``RemoteAccessAllowed`` false for HTTP; medge only ever sends to
127.0.0.1."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medge.localproc import LocalServer, free_port, wait_for_port

ORTHANC = Path("/usr/sbin/Orthanc")
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
PLUGINS = ("libOrthancDicomWeb.so", "libOrthancWSI.so")
STARTUP_TIMEOUT_S = 30.0


@dataclass
class Orthanc(LocalServer):
    """A local Orthanc with auth on, the called AE title checked, DICOMweb and WSI plugins."""

    LOG_NAME: ClassVar[str] = "orthanc.log"
    STOP_TIMEOUT_S: ClassVar[float] = 15.0
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    aet: str = "TESTPACS"
    username: str = "tester"
    password: str = "s3cret-pacs"
    extra_config: dict[str, Any] = field(default_factory=dict)
    """Orthanc keys to add or override, e.g. ``AcceptedTransferSyntaxes``."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def write_config(self) -> Path:
        storage = self.directory / "db"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medge-test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "Plugins": [str(PLUGIN_DIR / name) for name in PLUGINS],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            **self.extra_config,
        }
        path = self.directory / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def start(self) -> None:
        if self.running:
            return
        config = self.write_config()
        self.spawn([str(ORTHANC), str(config)])
        wait_for_port(self.http_port, STARTUP_TIMEOUT_S, self.proc)
        wait_for_port(self.dicom_port, STARTUP_TIMEOUT_S, self.proc)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "Orthanc has started" not in self.log_text():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc did not finish starting: {self.log_text()[-500:]}")
            time.sleep(0.05)

    def rest(self, path: str, data: bytes | None = None, *, auth: bool = True) -> Any:
        """JSON from Orthanc's REST API (POST when ``data`` is given)."""
        request = urllib.request.Request(self.url + path, data=data)
        if auth:
            pair = f"{self.username}:{self.password}".encode()
            request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def status(self, path: str, *, auth: bool) -> int:
        try:
            self.rest(path, auth=auth)
        except urllib.error.HTTPError as exc:
            return exc.code
        return 200

    def series_id(self, series_instance_uid: str) -> str | None:
        for hit in self.rest("/tools/lookup", series_instance_uid.encode()):
            if hit["Type"] == "Series":
                return str(hit["ID"])
        return None

    def instance_uids(self, series_instance_uid: str) -> set[str]:
        """SOPInstanceUIDs Orthanc holds for a series (empty if it does not know the series)."""
        series = self.series_id(series_instance_uid)
        if series is None:
            return set()
        instances = self.rest(f"/series/{series}/instances")
        return {str(item["MainDicomTags"]["SOPInstanceUID"]) for item in instances}
