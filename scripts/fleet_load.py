"""Load on the fleet aggregator: N simulated devices publishing a retained status and realistic
telemetry every interval through a real Mosquitto, into the real `edged fleet serve` (a subprocess,
measured alone: RSS and CPU from /proc), with a page connected to /events and /metrics scraped as
Prometheus would. Not part of `make test`.

    python scripts/fleet_load.py                      # 1000 devices every 10 s for 3 minutes
    python scripts/fleet_load.py --devices 200 --interval 5 --duration 60 --json load.json
    python scripts/fleet_load.py --mqtt broker.lan:1883 --template report.json

The template is a real telemetry report: captured at start from a real `edged serve` (the ROCK 5B
fixture board, the embedded model, one real job), or read from --template (e.g. one saved with
``mosquitto_sub -C 1 -t 'edged/+/telemetry'``). Every device varies it: its own decode speed, jobs
counted into the histograms, temperatures on a random walk. Publishing is spread evenly over the
interval by a few paho clients (QoS 0), and their lateness is reported, to show the publisher is
not the bottleneck.
"""

from __future__ import annotations

import argparse
import copy
import getpass
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from paho.mqtt import client as paho

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"fleet_load: {what} not within {timeout} s")
        time.sleep(0.05)


def edged_command() -> list[str]:
    exe = Path(sys.executable).parent / "edged"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edged.cli"]


# -- processes -------------------------------------------------------------------------------------


class Broker:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "persistence false\nmax_queued_messages 100000\nlog_type error\n"
        )
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait(listening, 10, "mosquitto listening")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def connect(host: str, port: int, name: str) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:8]}")
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.max_queued_messages_set(0)
    client.connect_async(host, port, 60)
    client.loop_start()
    if not connected.wait(10):
        client.loop_stop()
        raise SystemExit(f"fleet_load: cannot connect to the broker {host}:{port}")
    return client


def capture_template(host: str, port: int, workdir: Path) -> dict[str, Any]:
    """One real report: `edged serve` on the ROCK 5B fixture board runs one job and publishes."""
    device = f"template-{uuid.uuid4().hex[:6]}"
    sock = Path(tempfile.mkdtemp(prefix="edged-", dir="/tmp")) / "edged.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    env.update(
        EDGED_SOCKET__PATH=str(sock),
        EDGED_BOARD__ROOT=str(ROOT / "tests/fixtures/boards/rock5b"),
        EDGED_BOARD__PROFILES_DIR=str(workdir / "profiles"),
        EDGED_DEVICE_ID=device,
        EDGED_MQTT__HOST=host,
        EDGED_MQTT__PORT=str(port),
        EDGED_TELEMETRY__INTERVAL_S="1",
        EDGED_MODEL__THREADS="1",
        EDGED_JOURNAL__PATH=str(workdir / "journal.sqlite3"),
        EDGED_ENGINE__PREFIX_CACHE_DIR=str(workdir / "prefix-cache"),
    )
    received: list[dict[str, Any]] = []
    probe = connect(host, port, "template")
    probe.on_message = lambda c, u, m: received.append(json.loads(m.payload))
    probe.subscribe(f"edged/{device}/telemetry")
    with (workdir / "template-daemon.log").open("wb") as log:
        daemon = subprocess.Popen([*edged_command(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait(sock.exists, 60, "the template daemon's socket")
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://edged") as http:
                wait(lambda: _healthy(http), 60, "the template daemon ready")
                job = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 16}
                assert http.post("/v1/chat/completions", json=job, timeout=120).status_code == 200
            wait(lambda: any(r["jobs"]["done"] >= 1 for r in received), 30, "a report counting the job")
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            shutil.rmtree(sock.parent, ignore_errors=True)
    probe.publish(f"edged/{device}/status", b"", qos=1, retain=True).wait_for_publish(10)  # gone
    probe.disconnect()
    probe.loop_stop()
    return next(r for r in received if r["jobs"]["done"] >= 1)


def _healthy(http: httpx.Client) -> bool:
    try:
        return http.get("/health").status_code == 200
    except httpx.TransportError:
        return False


class Proc:
    """CPU and memory of a process from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.last = (time.monotonic(), self.cpu_s())

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def memory_mib(self) -> dict[str, float]:
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines()
        )
        return {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}

    def cpu_percent(self) -> float:
        """Since the previous call."""
        now, cpu = time.monotonic(), self.cpu_s()
        percent = 100 * (cpu - self.last[1]) / (now - self.last[0])
        self.last = (now, cpu)
        return percent


# -- simulated devices -------------------------------------------------------------------------------


class Device:
    """One simulated board: its own copy of the template, changed a little every report."""

    def __init__(self, device_id: str, template: dict[str, Any], interval: float, rng: random.Random) -> None:
        self.id = device_id
        self.rng = rng
        self.doc = copy.deepcopy(template)
        self.doc["device_id"] = device_id
        self.doc["interval_s"] = interval
        self.doc["jobs"] = {k: 0 for k in self.doc.get("jobs", {"done": 0})}
        for histogram in self.doc.get("histograms", {}).values():
            histogram["buckets"] = [[le, 0] for le, _ in histogram["buckets"]]
            histogram["sum"], histogram["count"] = 0.0, 0
        self.speed = rng.uniform(4, 30)
        self.base_temp = rng.uniform(42, 68)
        self.temp_offset = 0.0
        board = template.get("device_id", "board")
        self.status = json.dumps(
            {
                "state": "online",
                "device_id": device_id,
                "board": f"simulated ({board})",
                "profile": "rk3588",
                "backend": template.get("backend"),
                "model": template.get("model"),
                "version": template.get("version"),
                "interval_s": interval,
            }
        ).encode()

    def _observe(self, name: str, value: float) -> None:
        histogram = self.doc.get("histograms", {}).get(name)
        if histogram is None:
            return
        for bucket in histogram["buckets"]:
            if value <= float(bucket[0]):
                bucket[1] += 1
        histogram["sum"] = round(histogram["sum"] + value, 6)
        histogram["count"] += 1

    def report(self) -> bytes:
        rng, doc = self.rng, self.doc
        jobs = rng.choice((0, 0, 1, 1, 2, 3))
        decode = max(0.5, self.speed * rng.uniform(0.85, 1.1))
        for _ in range(jobs):
            self._observe("edged_ttft_seconds", rng.uniform(0.1, 2.5))
            self._observe("edged_decode_tokens_per_second", decode * rng.uniform(0.9, 1.1))
            self._observe("edged_prefill_tokens_per_second", decode * rng.uniform(4, 9))
            self._observe("edged_queue_wait_seconds", rng.expovariate(2.0))
        doc["jobs"]["done"] = doc["jobs"].get("done", 0) + jobs
        totals = doc.setdefault("totals", {})
        totals["prompt_tokens"] = totals.get("prompt_tokens", 0) + jobs * 60
        totals["completion_tokens"] = totals.get("completion_tokens", 0) + jobs * 120
        summary = doc["summary"]
        summary.update(
            decode_tokens_per_s=round(decode, 2),
            tokens_per_s=round(decode * 0.92, 2),
            s_per_1k_tokens=round(1000 / decode, 2),
            ttft_ms_p50=round(rng.uniform(120, 900), 2),
        )
        for window in doc.get("throughput", {}).values():
            window["decode_tokens_per_s_p50"] = summary["decode_tokens_per_s"]
            window["tokens_per_s"] = summary["tokens_per_s"]
            window["s_per_1k_tokens"] = summary["s_per_1k_tokens"]
        self.temp_offset = max(-8.0, min(12.0, self.temp_offset + rng.uniform(-1.2, 1.3)))
        zones = doc.get("thermals", {}).get("zones", [])
        for n, zone in enumerate(zones):
            zone["temp_c"] = round(self.base_temp + self.temp_offset - n * 0.4 + rng.uniform(-0.3, 0.3), 3)
        if zones:
            summary["hottest_c"] = max(z["temp_c"] for z in zones)
        doc["queue"]["depth"] = rng.choice((0, 0, 0, 1, 2))
        doc["ts"] = round(time.time(), 3)
        return json.dumps(doc, separators=(",", ":")).encode()


class Publisher(threading.Thread):
    """One paho client publishing for its share of the devices, spread evenly over the interval."""

    def __init__(
        self, host: str, port: int, devices: list[Device], phases: list[float], interval: float
    ) -> None:
        super().__init__(name="publisher", daemon=True)
        self.client = connect(host, port, "load")
        self.devices = devices
        self.phases = phases
        self.interval = interval
        self.stop = threading.Event()
        self.sent = 0
        self.bytes = 0
        self.late: list[float] = []

    def run(self) -> None:
        for device in self.devices:
            self.client.publish(f"edged/{device.id}/status", device.status, qos=0, retain=True)
        start = time.monotonic()
        order = sorted(range(len(self.devices)), key=lambda i: self.phases[i])
        cycle = 0
        while not self.stop.is_set():
            for i in order:
                due = start + cycle * self.interval + self.phases[i]
                if (pause := due - time.monotonic()) > 0 and self.stop.wait(pause):
                    return
                self.late.append(max(0.0, time.monotonic() - due))
                payload = self.devices[i].report()
                self.client.publish(f"edged/{self.devices[i].id}/telemetry", payload, qos=0)
                self.sent += 1
                self.bytes += len(payload)
            cycle += 1

    def close(self, clear: bool) -> None:
        self.stop.set()
        self.join(10)
        if clear:  # remove the simulated devices' retained statuses from the broker
            for device in self.devices:
                self.client.publish(f"edged/{device.id}/status", b"", qos=1, retain=True).wait_for_publish(10)
        self.client.disconnect()
        self.client.loop_stop()


class SSEReader(threading.Thread):
    """A page: reads /events to the end, counting messages and bytes."""

    def __init__(self, url: str) -> None:
        super().__init__(name="sse", daemon=True)
        self.url = url
        self.messages = 0
        self.bytes = 0
        self.reconnects = -1
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=httpx.Timeout(10, read=30)) as http:
            while not self.stop.is_set():
                self.reconnects += 1
                try:
                    with http.stream("GET", self.url + "events") as stream:
                        for line in stream.iter_lines():
                            self.bytes += len(line) + 1
                            if line.startswith("event: "):
                                self.messages += 1
                            if self.stop.is_set():
                                return
                except httpx.HTTPError:
                    self.stop.wait(1)


# -- main ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument(
        "--interval", type=float, default=10.0, help="seconds between two reports of a device"
    )
    parser.add_argument("--duration", type=float, default=180.0, help="seconds measured, after the warm-up")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before measuring (>= interval)")
    parser.add_argument("--publishers", type=int, default=4, help="paho clients publishing")
    parser.add_argument("--mqtt", metavar="HOST:PORT", help="an existing broker (default: start a Mosquitto)")
    parser.add_argument("--template", type=Path, help="a telemetry report (JSON) instead of capturing one")
    parser.add_argument("--sse-clients", type=int, default=1, help="pages connected to /events")
    parser.add_argument("--scrape-every", type=float, default=15.0, help="seconds between /metrics scrapes")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fleet-load-"))
    broker = None
    if args.mqtt:
        host, _, port_text = args.mqtt.rpartition(":")
        host, port = host or "127.0.0.1", int(port_text)
    else:
        broker = Broker(work)
        host, port = "127.0.0.1", broker.port
    server: subprocess.Popen[bytes] | None = None
    publishers: list[Publisher] = []
    readers: list[SSEReader] = []
    try:
        template = (
            json.loads(args.template.read_text()) if args.template else capture_template(host, port, work)
        )
        print(f"template: a real report of {len(json.dumps(template, separators=(',', ':')))} bytes")

        web_port = free_port()
        url = f"http://127.0.0.1:{web_port}/"
        log = (work / "fleet-serve.log").open("wb")
        server = subprocess.Popen(
            [
                *edged_command(),
                "fleet",
                "--mqtt",
                f"{host}:{port}",
                "--interval",
                str(args.interval),
                "serve",
                "--listen",
                f"127.0.0.1:{web_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("EDGED_")},
        )
        http = httpx.Client(base_url=url, timeout=60)
        wait(lambda: _healthy(http), 30, "edged fleet serve ready")
        agg = Proc(server.pid)
        idle = agg.memory_mib()
        print(f"edged fleet serve (pid {server.pid}) idle: RSS {idle['VmRSS']:.1f} MiB")

        rng = random.Random(args.seed)
        devices = [
            Device(f"sim-{n:04d}", template, args.interval, random.Random(rng.random()))
            for n in range(args.devices)
        ]
        for k in range(args.publishers):
            mine = devices[k :: args.publishers]
            phases = [(n * args.publishers + k) * args.interval / args.devices for n in range(len(mine))]
            publishers.append(Publisher(host, port, mine, phases, args.interval))
        readers = [SSEReader(url) for _ in range(args.sse_clients)]
        for thread in (*publishers, *readers):
            thread.start()
        load_started = time.monotonic()
        me = Proc(os.getpid())
        mosquitto = Proc(broker.proc.pid) if broker else None

        wait(
            lambda: http.get("/health").json()["devices"] >= args.devices,
            max(60, 3 * args.interval),
            "all devices known",
        )
        pause = threading.Event()
        pause.wait(max(0.0, args.warmup - (time.monotonic() - load_started)))
        counters_before = http.get("/api/fleet", params={"history": "false"}).json()["counters"]
        sent_before = sum(p.sent for p in publishers)
        for proc in (agg, me, mosquitto):
            if proc is not None:
                proc.cpu_percent()
        print(f"measuring {args.devices} devices every {args.interval:g} s for {args.duration:g} s ...")

        samples: list[dict[str, float]] = []
        scrapes: list[tuple[float, int]] = []
        measure_start = time.monotonic()
        next_sample = measure_start + args.sample_every
        next_scrape = measure_start
        while (now := time.monotonic()) < measure_start + args.duration:
            if now >= next_scrape:
                t0 = time.monotonic()
                body = http.get("/metrics").content
                scrapes.append((time.monotonic() - t0, len(body)))
                next_scrape += args.scrape_every
            if now >= next_sample:
                memory = agg.memory_mib()
                samples.append(
                    {
                        "t": round(now - measure_start, 1),
                        "rss_mib": round(memory["VmRSS"], 1),
                        "cpu_pct": round(agg.cpu_percent(), 1),
                        "publisher_cpu_pct": round(me.cpu_percent(), 1),
                        "mosquitto_cpu_pct": round(mosquitto.cpu_percent(), 1) if mosquitto else math.nan,
                    }
                )
                print("  " + "  ".join(f"{k} {v}" for k, v in samples[-1].items()), flush=True)
                next_sample += args.sample_every
            pause.wait(max(0.01, min(next_sample, next_scrape) - time.monotonic()))
        elapsed = time.monotonic() - measure_start

        t0 = time.monotonic()
        fleet = http.get("/api/fleet").json()
        api_s = time.monotonic() - t0
        counters = fleet["counters"]
        sent = sum(p.sent for p in publishers) - sent_before
        received = counters["telemetry"] - counters_before["telemetry"]
        late = sorted(x for p in publishers for x in p.late[len(p.late) // 4 :])
        memory = agg.memory_mib()
        cpu = [s["cpu_pct"] for s in samples]
        rss = [s["rss_mib"] for s in samples]
        figures = {
            "devices": args.devices,
            "interval_s": args.interval,
            "measured_s": round(elapsed, 1),
            "messages_per_s": round(received / elapsed, 1),
            "telemetry_published": sent,
            "telemetry_received": received,
            "devices_online": fleet["summary"]["online"],
            "rss_idle_mib": round(idle["VmRSS"], 1),
            "rss_mib": {"first": rss[0], "last": rss[-1], "max": max(rss)},
            "rss_peak_mib": round(memory["VmHWM"], 1),
            "cpu_pct": {
                "mean": round(statistics.fmean(cpu), 1),
                "median": round(statistics.median(cpu), 1),
                "max": max(cpu),
            },
            "publisher_cpu_pct_mean": round(statistics.fmean(s["publisher_cpu_pct"] for s in samples), 1),
            "mosquitto_cpu_pct_mean": round(statistics.fmean(s["mosquitto_cpu_pct"] for s in samples), 1)
            if mosquitto
            else None,
            "publish_lateness_ms": {
                "p50": round(1000 * late[len(late) // 2], 2),
                "p99": round(1000 * late[int(len(late) * 0.99)], 2),
                "max": round(1000 * late[-1], 2),
            },
            "metrics_scrape": {
                "count": len(scrapes),
                "seconds_median": round(statistics.median(s for s, _ in scrapes), 3),
                "seconds_max": round(max(s for s, _ in scrapes), 3),
                "bytes": scrapes[-1][1],
            },
            "api_fleet": {"seconds": round(api_s, 3), "bytes": len(json.dumps(fleet))},
            "sse": [{"messages": r.messages, "bytes": r.bytes, "reconnects": r.reconnects} for r in readers],
            "malformed": counters["malformed"],
            "machine": f"{os.uname().machine}, {os.cpu_count()} CPUs",
        }
        print(json.dumps(figures, indent=2))
        if args.json:
            args.json.write_text(json.dumps({"figures": figures, "samples": samples}, indent=2))
        http.close()
    finally:
        for reader in readers:
            reader.stop.set()
        for publisher in publishers:
            publisher.close(clear=args.mqtt is not None)
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
        for reader in readers:
            reader.join(10)
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
