"""bench/gateway: one home gateway with every device simulator at realistic and 100x rates, then
a fleet of N simulated gateways publishing to one mosquitto.

Part 1 runs ``medge run gateway`` as its own process against ``medge sim`` processes, once per
device and once with all of them, and reports the gateway's CPU and memory (minus an idle
gateway) and the latency from a measurement's receipt on the gateway (``Observation.issued``)
to the hospital subscriber. Part 2 starts N lightweight gateways (each a real
:class:`medge.runtime.Runtime`: SQLite outbox + MQTT link, no devices) spread over a few worker
processes, offers increasing message rates and reports what the broker delivers to one shared
subscription (``$share/ingest/...``) and where it saturates.

    .venv/bin/python -m bench.gateway [--seconds 15] [--fleet 100,1000] [--skip-single]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt

from medge.localbroker import Mosquitto, free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
VENT_MAP = REPO / "config" / "ventilators" / "home-ventilator.toml"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class DeviceBench:
    """How to run one device at a given pace: simulator arguments and gateway device table."""

    sim: str
    sim_args: tuple[str, ...]
    device: dict[str, Any]


def devices(rate: str, work: Path) -> dict[str, DeviceBench]:
    """Realistic pace, or 100x: streams 100x denser, events 100x more often."""
    fast = rate == "100x"
    vent_map = VENT_MAP
    if fast:  # the map sets the poll interval: 1 s -> 10 ms
        vent_map = work / "vent-100x.toml"
        vent_map.write_text(VENT_MAP.read_text().replace("poll_interval = 1.0",
                                                         "poll_interval = 0.01"))
    publish = 0.6 if fast else 60.0
    strips = ("--every", "3" if fast else "300", "--first-after", "1")
    return {
        "oximeter": DeviceBench("cms50", ("--every", str(1 / 6000)) if fast else (),
                                {"driver": "cms50", "obs_interval_s": publish,
                                 "pleth_every_s": 3.0 if fast else 300.0}),
        "ventilator": DeviceBench("modbus-vent", (), {
            "driver": "modbus", "map": str(vent_map), "serial": "VENT-1",
            "obs_interval_s": publish}),
        "urine-astm": DeviceBench("astm-urine", strips, {"driver": "urine-astm"}),
        "urine-printout": DeviceBench("printout-urine", strips, {"driver": "urine-printout"}),
        "uroflow": DeviceBench("uroflow", ("--speed", "100") if fast else (),
                               {"driver": "uroflow"}),
    }


# -- process helpers ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def simulator(name: str, args: tuple[str, ...]) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medge.cli", "sim", name, "--listen",
                             f"tcp://127.0.0.1:{port}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        yield f"socket://127.0.0.1:{port}"
    finally:
        stop(proc)


def toml_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else json.dumps(value)


def gateway_toml(state: Path, broker_port: int, devices_: dict[str, dict[str, Any]]) -> str:
    lines = ["[node]", 'site = "bench"', 'node = "gw-bench"',
             f"state_dir = {json.dumps(str(state))}", "[mqtt]", f"port = {broker_port}",
             "[outbox]", 'sync = "full"',
             "[log]", 'level = "warning"', 'format = "json"',
             "[gateway.status]", "http = false"]
    for name, table in devices_.items():
        lines += ["[[gateway.devices]]", f'name = "{name}"']
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


async def cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# -- part 1: one gateway ----------------------------------------------------------------------


@dataclass
class Latencies:
    values: list[float] = field(default_factory=list)
    messages: int = 0


async def subscribe(port: int, topic_filter: str, ready: asyncio.Event,
                    on_body: Callable[[float, dict[str, Any]], None]) -> None:
    """The hospital side: ``on_body(receipt time, message body)`` for every message."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-hospital-{os.getpid()}",
                              protocol=aiomqtt.ProtocolVersion.V5,
                              socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
                              ) as client:
        await client.subscribe(topic_filter, qos=1)
        ready.set()
        async for message in client.messages:
            now = time.time()
            assert isinstance(message.payload, bytes | bytearray)
            on_body(now, json.loads(message.payload)["body"])


def hospital(port: int, into: Latencies, ready: asyncio.Event) -> Coroutine[Any, Any, None]:
    """Receipt time minus ``Observation.issued`` (the gateway's receipt of the measurement)."""

    def record(now: float, body: dict[str, Any]) -> None:
        into.messages += 1
        into.values.append(now - datetime.fromisoformat(body["issued"]).timestamp())

    return subscribe(port, "medge/v1/+/+/+/obs", ready, record)


async def run_gateway(broker_port: int, work: Path, chosen: dict[str, DeviceBench],
                      seconds: float) -> dict[str, float]:
    """One gateway process with ``chosen`` devices for ``seconds``; CPU, RSS, latency."""
    with ExitStack() as stack:
        tables = {name: {**bench.device, "port": stack.enter_context(
            simulator(bench.sim, bench.sim_args))} for name, bench in chosen.items()}
        if not tables:  # the idle baseline: one device whose port nobody serves
            tables = {"idle": {"driver": "urine-printout", "port": "socket://127.0.0.1:9"}}
        state = Path(tempfile.mkdtemp(dir=work))
        config_path = state / "gateway.toml"
        config_path.write_text(gateway_toml(state, broker_port, tables))
        received = Latencies()
        ready = asyncio.Event()
        listener = asyncio.create_task(hospital(broker_port, received, ready))
        await asyncio.wait_for(ready.wait(), 10)
        proc = subprocess.Popen([sys.executable, "-m", "medge.cli", "run", "gateway",
                                 "--config", str(config_path)], stdout=subprocess.DEVNULL)
        try:
            # CPU and rates exclude start-up (imports, connects); latencies (receipt minus
            # Observation.issued) do not depend on it, so the first readings count too.
            await asyncio.sleep(min(5.0, seconds / 3))
            cpu0, t0, received.messages = cpu_seconds(proc.pid), time.monotonic(), 0
            await asyncio.sleep(seconds)
            cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
            rss = rss_mib(proc.pid)
        finally:
            stop(proc)
            await cancel(listener)
    ordered = sorted(received.values) or [float("nan")]
    return {"cpu": cpu * 100, "rss": rss, "obs_per_s": received.messages / seconds,
            "p50_ms": ordered[len(ordered) // 2] * 1000,
            "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000}


async def single_gateway(broker_port: int, work: Path, seconds: float) -> None:
    baseline = await run_gateway(broker_port, work, {}, seconds)
    print(f"\nPart 1: one gateway, {seconds:.0f} s per run; idle gateway "
          f"{baseline['cpu']:.1f} % CPU, {baseline['rss']:.1f} MiB RSS (subtracted below)")
    print(f"{'rate':<9} | {'devices':<15} | {'CPU %':>6} | {'RSS MiB':>7} | {'obs/s':>7} | "
          f"{'latency p50':>11} | {'p99':>8}")
    print("-" * 82)
    for rate in ("realistic", "100x"):
        table = devices(rate, work)
        runs = [(name, {name: bench}) for name, bench in table.items()] + [("all five", table)]
        for label, chosen in runs:
            r = await run_gateway(broker_port, work, chosen, seconds)
            print(f"{rate:<9} | {label:<15} | {r['cpu'] - baseline['cpu']:>6.1f} | "
                  f"{r['rss'] - baseline['rss']:>7.1f} | {r['obs_per_s']:>7.1f} | "
                  f"{r['p50_ms']:>8.1f} ms | {r['p99_ms']:>5.1f} ms", flush=True)


# -- part 2: the fleet ------------------------------------------------------------------------


async def fleet_worker(port: int, first: int, count: int, rates: list[float], step_s: float,
                       state: Path) -> None:
    """``count`` gateways in this process; each offers ``rate`` msg/s per step, in turn."""
    from medge import log
    from medge.runtime import Runtime
    from medge.settings import DaemonConfig, LogSection, MqttSection, NodeSection, OutboxSection

    log.configure("error", "json")
    runtimes = [Runtime(DaemonConfig(
        node=NodeSection(site="fleet", node=f"gw-{first + i:05d}", state_dir=state / str(i)),
        mqtt=MqttSection(port=port, reconnect_min=0.5, reconnect_max=5.0, connect_timeout=60),
        outbox=OutboxSection(sync="normal", max_inflight=20), log=LogSection(level="error"),
    ), "gateway", health_interval=3600) for i in range(count)]
    for batch in range(0, count, 50):  # do not storm the broker with connects
        await asyncio.gather(*(rt.__aenter__() for rt in runtimes[batch:batch + 50]))
    await asyncio.gather(*(rt.link.wait_connected(120) for rt in runtimes))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # "go": every worker starts together

    async def gateway(rt: Runtime, rate: float, step: int, until: float, offset: float) -> int:
        if rate <= 0:  # the idle step: connected gateways that have nothing to say
            await asyncio.sleep(until - time.monotonic())
            return 0
        sent, interval = 0, 1.0 / rate
        next_at = time.monotonic() + offset * interval
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await rt.emit("oximeter", "obs", {"step": step, "t0": time.time(), "n": sent})
            sent += 1
            next_at += interval
        return sent

    for step, rate in enumerate(rates):
        cpu0, start = time.process_time(), time.monotonic()
        until = start + step_s
        sent = await asyncio.gather(*(gateway(rt, rate, step, until, i / count)
                                      for i, rt in enumerate(runtimes)))
        elapsed = time.monotonic() - start
        print(json.dumps({"step": step, "emitted": sum(sent), "seconds": elapsed,
                          "cpu": (time.process_time() - cpu0) / elapsed}), flush=True)
    # the backlog of an overloaded step stays in the outboxes (durable); no drain here
    await asyncio.gather(*(rt.close(drain_timeout=0.5) for rt in runtimes))


@dataclass
class Ingested:
    receipts: list[float] = field(default_factory=list)
    """Wall-clock receipt time of every message."""
    latencies: dict[int, list[float]] = field(default_factory=dict)
    """Per step: receipt minus emit time."""


def fleet_ingest(port: int, into: Ingested, ready: asyncio.Event) -> Coroutine[Any, Any, None]:
    """The hospital: one member of the shared subscription group ``ingest``."""

    def record(now: float, body: dict[str, Any]) -> None:
        into.receipts.append(now)
        into.latencies.setdefault(body["step"], []).append(now - body["t0"])

    return subscribe(port, "$share/ingest/medge/v1/fleet/+/+/obs", ready, record)


async def fleet(broker: Mosquitto, work: Path, gateways: int, rates: list[float],
                step_s: float, workers: int) -> None:
    """Steps of ``step_s`` seconds at each per-gateway rate; the *delivered* rate of a step is
    what the subscriber received during that step's wall-clock window (backlog not counted)."""
    ingested = Ingested()
    ready = asyncio.Event()
    ingest = asyncio.create_task(fleet_ingest(broker.port, ingested, ready))
    await asyncio.wait_for(ready.wait(), 10)
    assert broker.proc is not None
    per = -(-gateways // workers)
    procs = []
    for w in range(workers):
        count = min(per, gateways - w * per)
        state = work / f"fleet-{gateways}-{w}"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bench.gateway", "--fleet-worker", str(broker.port),
             str(w * per), str(count), ",".join(map(str, rates)), str(step_s), str(state)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    try:
        t_connect = time.monotonic()
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            if line.strip() != "ready":
                raise RuntimeError(f"fleet worker failed to start: {line!r}")
        connect_s = time.monotonic() - t_connect
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        t_go = time.time()
        broker_cpu = []
        for step in range(len(rates)):
            cpu0 = cpu_seconds(broker.proc.pid)
            await asyncio.sleep(t_go + (step + 1) * step_s - time.time())
            broker_cpu.append((cpu_seconds(broker.proc.pid) - cpu0) / step_s)
        reports: list[list[dict[str, Any]]] = [[] for _ in procs]
        for index, proc in enumerate(procs):
            for _ in rates:
                assert proc.stdout is not None
                reports[index].append(json.loads(await asyncio.to_thread(proc.stdout.readline)))
        await asyncio.to_thread(lambda: [p.wait(300) for p in procs])
    finally:
        for proc in procs:
            if proc.poll() is None:
                stop(proc)
        await cancel(ingest)
    print(f"\nPart 2: {gateways} gateways in {workers} processes, all connected in "
          f"{connect_s:.1f} s, {step_s:.0f} s per step")
    print(f"{'offered msg/s':>13} | {'emitted':>7} | {'delivered':>9} | {'latency p50':>11} | "
          f"{'p99':>8} | {'gateways CPU':>12} | {'broker CPU':>10} | {'broker µs/msg':>13}")
    print("-" * 104)
    for step, rate in enumerate(rates):
        emitted = sum(r[step]["emitted"] for r in reports) / step_s
        cpu = sum(r[step]["cpu"] for r in reports)
        begin, end = t_go + step * step_s, t_go + (step + 1) * step_s
        delivered = sum(1 for t in ingested.receipts if begin <= t < end) / step_s
        ordered = sorted(ingested.latencies.get(step, [])) or [float("nan")]
        per_message = broker_cpu[step] / delivered * 1e6 if delivered else float("nan")
        print(f"{rate * gateways:>13,.0f} | {emitted:>7,.0f} | {delivered:>9,.0f} | "
              f"{ordered[len(ordered) // 2] * 1000:>8.1f} ms | "
              f"{ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000:>5.0f} ms | "
              f"{cpu * 100:>11.0f}% | {broker_cpu[step] * 100:>9.1f}% | {per_message:>13.0f}",
              flush=True)


async def main(args: argparse.Namespace) -> None:
    print(f"bench/gateway on {platform.node()}: {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "broker", persistence=False)
        broker.start()
        try:
            if not args.skip_single:
                await single_gateway(broker.port, work, args.seconds)
            for gateways in args.fleet:
                rates = [r / gateways for r in args.offered]
                await fleet(broker, work, gateways, rates, args.step, args.workers)
        finally:
            broker.stop()


def numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per single-gateway run")
    parser.add_argument("--skip-single", action="store_true", help="fleet only")
    parser.add_argument("--fleet", type=lambda t: [int(x) for x in numbers(t)],
                        default=[100, 1000], help="fleet sizes (default 100,1000)")
    parser.add_argument("--offered", type=numbers, default=[0.0, 300.0, 1000.0, 2000.0, 4000.0],
                        help="aggregate offered msg/s per fleet step (0 = idle)")
    parser.add_argument("--step", type=float, default=10.0, help="seconds per fleet step")
    parser.add_argument("--workers", type=int, default=4, help="fleet worker processes")
    parser.add_argument("--fleet-worker", nargs=6, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.fleet_worker:
        port, first, count, rates, step, state = arguments.fleet_worker
        asyncio.run(fleet_worker(int(port), int(first), int(count), numbers(rates),
                                 float(step), Path(state)))
    else:
        asyncio.run(main(arguments))
