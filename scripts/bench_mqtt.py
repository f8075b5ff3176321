"""Round-trip overhead of one job over MQTT versus the same job over the Unix socket, same run.

Starts a private Mosquitto on a loopback port and one edged with MQTT on, then alternates the same
small job (greedy, fixed token count) over both transports from already-connected clients and
reports client-side round-trip medians and spread, the engine's own total_ms, and the difference.

    python scripts/bench_mqtt.py [--rounds 21] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from paho.mqtt import client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "stdev": round(statistics.stdev(values), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edged-bench-mqtt-"))
    port = free_port()
    (work / "m.conf").write_text(
        f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
    )
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = subprocess.Popen(
        [mosquitto, "-c", str(work / "m.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    sock = work / "edged.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGED_")}
    env.update(
        EDGED_SOCKET__PATH=str(sock),
        EDGED_MQTT__HOST="127.0.0.1",
        EDGED_MQTT__PORT=str(port),
        EDGED_DEVICE_ID="bench",
        EDGED_LOG__FORMAT="json",
    )
    log = (work / "edged.log").open("wb")
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "edged"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://edged", timeout=120)
    inbox: queue.Queue[bytes] = queue.Queue()
    mqtt = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-requester", protocol=paho.MQTTv5)
    mqtt.on_message = lambda _c, _u, m: inbox.put(m.payload)
    try:
        while True:
            try:
                status = http.get("/status").json()
                if status["engine"]["state"] == "ready" and status["mqtt"] and status["mqtt"]["connected"]:
                    break
            except (httpx.TransportError, KeyError, TypeError):
                pass
            if daemon.poll() is not None:
                raise SystemExit((work / "edged.log").read_text())
            time.sleep(0.05)
        mqtt.connect_async("127.0.0.1", port)
        mqtt.loop_start()
        while not mqtt.is_connected():
            time.sleep(0.01)
        mqtt.subscribe("bench/answers", qos=1)
        time.sleep(0.2)
        job: dict[str, Any] = {
            "prompt": "Name a colour.",
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "bench/answers"

        def over_socket() -> tuple[float, float]:
            start = time.perf_counter()
            r = http.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": job["prompt"]}],
                    **{k: v for k, v in job.items() if k != "prompt"},
                },
            )
            elapsed = (time.perf_counter() - start) * 1000
            r.raise_for_status()
            return elapsed, r.json()["timings"]["total_ms"]

        def over_mqtt() -> tuple[float, float]:
            start = time.perf_counter()
            mqtt.publish("edged/bench/jobs", json.dumps(job), qos=1, properties=props)
            answer = json.loads(inbox.get(timeout=120))
            elapsed = (time.perf_counter() - start) * 1000
            assert answer["status"] == "done", answer
            return elapsed, answer["timings"]["total_ms"]

        over_socket()
        over_mqtt()
        rows: dict[str, list[tuple[float, float]]] = {"socket": [], "mqtt": []}
        for i in range(args.rounds):
            pair = [("socket", over_socket), ("mqtt", over_mqtt)]
            for name, fn in pair if i % 2 == 0 else reversed(pair):
                rows[name].append(fn())
    finally:
        http.close()
        mqtt.disconnect()
        mqtt.loop_stop()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        log.close()
        broker.terminate()
        broker.wait(10)

    result: dict[str, Any] = {
        "machine": f"{os.uname().machine}, {len(os.sched_getaffinity(0))} cores",
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
    }
    for name, values in rows.items():
        result[name] = {
            "round_trip_ms": summary([v[0] for v in values]),
            "engine_total_ms": summary([v[1] for v in values]),
            "transport_overhead_ms": summary([v[0] - v[1] for v in values]),
        }
    s, m = result["socket"]["round_trip_ms"]["median"], result["mqtt"]["round_trip_ms"]["median"]
    result["mqtt_minus_socket_ms"] = round(m - s, 2)
    result["mqtt_over_socket_ratio"] = round(m / s, 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
