"""``make demo``: the main job. Starts a local broker, the device simulators and the daemons,
end to end on this machine, and shows the telemetry the hospital would receive.

Each part of the demo (the home gateway; later the slide scanner and the robot) is a function
that starts its simulators and daemon as child processes and says where to look. Every child is
stopped by its PID when the demo ends (Ctrl-C, or after ``--duration`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt

from medge.localbroker import Mosquitto, free_port, wait_for_port


class Demo:
    """The processes of one demo run, their logs, and the broker they share."""

    def __init__(self, workdir: Path, broker: Mosquitto) -> None:
        self.workdir = workdir
        self.broker = broker
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen([sys.executable, "-m", "medge.cli", *args], stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        self.processes.append((name, proc))
        return proc

    def simulator(self, device: str, *options: str) -> str:
        """Start ``medge sim DEVICE`` on a free port; return the URL a driver opens."""
        port = free_port()
        self.spawn(f"sim-{device}", "sim", device, "--listen", f"tcp://127.0.0.1:{port}",
                   *options)
        wait_for_port(port, timeout=20)
        return f"socket://127.0.0.1:{port}"

    def check_alive(self) -> list[str]:
        """Names of children that died with a failure (their log says why); a one-shot child
        such as the scan job may finish successfully."""
        return [name for name, proc in self.processes if proc.poll() not in (None, 0)]

    def stop(self) -> None:
        for _, proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.processes):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def gateway_part(demo: Demo) -> list[str]:
    """The home gateway with every home device simulated, measurements every few seconds."""
    from daemons.gateway import devices  # the demo shows whatever the gateway supports

    supported = set(typing.get_args(devices.DriverName))
    oximeter = demo.simulator("cms50")
    ventilator = demo.simulator("modbus-vent")
    astm = demo.simulator("astm-urine", "--every", "20")
    printout = demo.simulator("printout-urine", "--every", "25")
    vent_map = Path(__file__).resolve().parent.parent / "config/ventilators/home-ventilator.toml"
    entries = [
        ("oximeter", "cms50", oximeter, "obs_interval_s = 10\npleth_every_s = 30\n"),
        ("ventilator", "modbus", ventilator,
         f'map = "{vent_map}"\nserial = "VENT-SIM-1"\nobs_interval_s = 10\n'),
        ("urine-astm", "urine-astm", astm, ""),
        ("urine-printout", "urine-printout", printout, ""),
    ]
    if "uroflow" in supported:
        entries.append(("uroflow", "uroflow", demo.simulator("uroflow", "--every", "30"), ""))
    config = demo.workdir / "gateway.toml"
    status_port = free_port()
    text = (
        f'[node]\nsite = "home-demo"\nnode = "gw-0001"\nstate_dir = "{demo.workdir}/gateway"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {demo.broker.port}\n\n'
        f'[gateway.status]\nbind = "127.0.0.1"\nport = {status_port}\n\n'
    )
    for name, driver, url, extra in entries:
        text += (f'[[gateway.devices]]\nname = "{name}"\ndriver = "{driver}"\n'
                 f'port = "{url}"\n{extra}\n')
    config.write_text(text)
    demo.spawn("gateway", "run", "gateway", "--config", str(config))
    return [f"home gateway: {len(entries)} simulated devices; patient status page "
            f"http://127.0.0.1:{status_port}/ ; config {config}"]


def scanner_part(demo: Demo) -> list[str]:
    """The slide scanner: the microscope daemon on its simulated rig (GRBL simulator and virtual
    slide camera) scans the tissue of a small simulated slide into a local Orthanc."""
    from medge.localpacs import ORTHANC, PLUGIN_DIR, PLUGINS, Orthanc

    root = Path(__file__).resolve().parent.parent
    missing = [str(p) for p in (ORTHANC, *(PLUGIN_DIR / n for n in PLUGINS)) if not p.exists()]
    pacs_lines = ""
    if not missing:
        orthanc = Orthanc(demo.workdir / "orthanc")
        orthanc.start()
        assert orthanc.proc is not None
        demo.processes.append(("orthanc", orthanc.proc))  # stopped by PID with the others
        (demo.workdir / "pacs.toml").write_text(
            f'spool_dir = "pacs-spool"\n[retry]\ninitial_s = 2.0\nmax_s = 10.0\n'
            f'[destinations.demo-pacs]\nprotocol = "dimse"\nhost = "127.0.0.1"\n'
            f'port = {orthanc.dicom_port}\ncalled_ae = "{orthanc.aet}"\n')
        pacs_lines = 'pacs_file = "pacs.toml"\n'
    config = demo.workdir / "microscope.toml"
    config.write_text(
        f'[node]\nsite = "lab-demo"\nnode = "scanner-01"\n'
        f'state_dir = "{demo.workdir}/microscope"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {demo.broker.port}\n\n'
        f'[microscope]\nobjectives_file = "{root / "config/objectives.toml"}"\n{pacs_lines}'
        f'focus_points = 3\ndisk_reserve_mb = 200\n\n'
        f'[microscope.stage]\nslide_origin_um = [-10000.0, -10000.0]\n\n'
        f'[microscope.camera]\nwidth = 640\nheight = 480\noverview_um_per_px = 20.0\n\n'
        f'[microscope.simulator]\nslide = "test"\ntime_scale = 5.0\n')
    demo.spawn("microscope", "run", "microscope", "--config", str(config))
    job = ["scan", "start", "--config", str(config), "--barcode", "DEMO-SLIDE-1",
           "--accession", "ACC-0001", "--patient", "PSEUDO-7", "--objective", "20x",
           "--area", "1.0,0.6,2.4,1.8", "--wait", "--wait-for-daemon", "120"]
    demo.spawn("scan-job", *job, *(["--pacs", "demo-pacs"] if not missing else []))
    lines = [f"slide scanner: one 20x scan of a simulated slide (progress in "
             f"{demo.workdir / 'scan-job.log'}; `medge scan list --config {config}`)"]
    if missing:
        lines.append(f"  no local PACS (missing {', '.join(missing)}; run `make setup`): the "
                     f"DICOM files stay in {demo.workdir / 'microscope' / 'scans'}")
    else:
        lines.append(f"  Orthanc: {orthanc.url}/app/explorer.html (user {orthanc.username}, "
                     f"password {orthanc.password}); open the series, then its WSI viewer "
                     f"({orthanc.url}/wsi/app/viewer.html?series=ID)")
    return lines


def robot_part(demo: Demo) -> list[str]:
    """The tele-ultrasound robot: the Dynamixel bus and load cell simulated over one patient,
    the manipulator daemon with the simulated RGB-D camera, and the sonographer's console."""
    bus_port, force_port, console_port = free_port(), free_port(), free_port()
    demo.spawn("sim-dynamixel", "sim", "dynamixel", "--listen", f"tcp://127.0.0.1:{bus_port}",
               "--force-listen", f"tcp://127.0.0.1:{force_port}")
    wait_for_port(bus_port, timeout=20)
    wait_for_port(force_port, timeout=20)
    site, node = "clinic-demo", "us-cart-1"
    config = demo.workdir / "manipulator.toml"
    config.write_text(
        f'[node]\nsite = "{site}"\nnode = "{node}"\nstate_dir = "{demo.workdir}/manipulator"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {demo.broker.port}\n\n'
        f'[manipulator]\nbus = "socket://127.0.0.1:{bus_port}"\n'
        f'force_sensor = "socket://127.0.0.1:{force_port}"\n\n'
        f'[manipulator.registration]\ncamera = "simulated"\n\n'
        # the console page sends a setpoint every 20 ms (console.js SEND_PERIOD_MS)
        f'[manipulator.supervisor]\nsetpoint_period_s = 0.02\n\n'
        # the phantom seen from the robot's measured pose: the console's live ultrasound image
        f'[manipulator.ultrasound]\nsource = "simulated"\nresolution = [640, 480]\n'
        f'frame_rate_hz = 15.0\n')
    demo.spawn("manipulator", "run", "manipulator", "--config", str(config))
    console = demo.spawn("console", "console", "--broker", f"127.0.0.1:{demo.broker.port}",
                         "--robot", f"{site}/{node}", "--user", "demo-sonographer",
                         "--no-browser", "--port", str(console_port), "--spacemouse", "off")
    url = _printed_url(demo.workdir / "console.log", console, timeout=30)
    return [f"tele-ultrasound robot: manipulator on the simulated bus and load cell "
            f"(config {config}); sonographer console {url or '(did not start: see console.log)'}"
            " — Arm, then hold Space and use W/A/S/D/Q/E (E lowers the probe onto the phantom:"
            " the live ultrasound image appears)"]


def _printed_url(log: Path, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """The URL a child printed to its log (the console's carries a session token)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for word in log.read_text(errors="replace").split():
            if word.startswith("http://"):
                return word
        time.sleep(0.1)
    return None


PARTS: list[Callable[[Demo], list[str]]] = [gateway_part, scanner_part, robot_part]


def describe(topic: str, envelope: dict[str, Any]) -> str:
    """One readable line for a telemetry message."""
    parts = topic.split("/")
    device, kind = parts[4], parts[5]
    body = envelope.get("body", envelope)
    text = ""
    if kind == "obs" and isinstance(body, dict):
        coding = body.get("code", {}).get("coding", [{}])[0]
        label = coding.get("display") or coding.get("code", "?")
        if "valueQuantity" in body:
            quantity = body["valueQuantity"]
            text = f"{label}: {quantity.get('value')} {quantity.get('unit', '')}"
        elif "valueCodeableConcept" in body:
            concept = body["valueCodeableConcept"]
            text = f"{label}: {concept.get('text') or concept['coding'][0].get('code')}"
        elif "valueString" in body:
            text = f"{label}: {body['valueString']}"
        elif "valueSampledData" in body:
            text = f"{label}: waveform"
        else:
            text = label
    elif kind == "alert" and isinstance(body, dict):
        text = "ALERT " + ", ".join(f"{k}={v}" for k, v in list(body.items())[:4])
    elif isinstance(body, dict):
        text = ", ".join(f"{k}={v}" for k, v in list(body.items())[:3])
    flag = " (historical)" if envelope.get("historical") else ""
    return f"{device:>15} {kind:<6} {text[:90]}{flag}"


async def watch(port: int, until: float, counts: Counter[str]) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier="demo-hospital",
                              protocol=aiomqtt.ProtocolVersion.V5,
                              socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]) as c:
        await c.subscribe("medge/v1/#", qos=1)
        async with asyncio.timeout_at(until):
            async for message in c.messages:
                payload = message.payload
                if not isinstance(payload, bytes | bytearray):
                    continue
                try:
                    envelope = json.loads(payload)
                except ValueError:
                    continue
                topic = message.topic.value
                counts["/".join(topic.split("/")[4:6])] += 1
                if not topic.endswith(("/health", "/state")):
                    print(time.strftime("%H:%M:%S"), describe(topic, envelope), flush=True)


async def run(duration: float, workdir: Path) -> int:
    broker = Mosquitto(workdir / "broker", persistence=False)
    broker.start()
    demo = Demo(workdir, broker)
    counts: Counter[str] = Counter()
    try:
        print(f"medge demo: broker on 127.0.0.1:{broker.port}; logs in {workdir}")
        for part in PARTS:
            for line in part(demo):
                print("  " + line)
        print(f"hospital view (medge/v1/#) for {duration:.0f} s — Ctrl-C to stop:", flush=True)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            await watch(broker.port, loop.time() + duration, counts)
    finally:
        dead = demo.check_alive()
        demo.stop()
        broker.stop()
    print("\nmessages received by the hospital, per device/kind:")
    for key, count in sorted(counts.items()):
        print(f"  {key:<28} {count}")
    if dead:
        print(f"these processes failed: {', '.join(dead)} (see their logs in {workdir})")
        return 1
    obs = sum(count for key, count in counts.items() if key.endswith("/obs"))
    if obs == 0:
        print("no observation reached the hospital: see the logs in", workdir)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where logs and state go (default: a new temporary directory)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="medge-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(run(args.duration, workdir))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
