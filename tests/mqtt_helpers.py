"""A private Mosquitto broker per test and a small paho client to talk to it (not edged's code)."""

from __future__ import annotations

import getpass
import json
import queue
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt import client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """mosquitto on a free loopback port with its own config, persistence and log."""

    def __init__(self, workdir: Path, extra: str = "", anonymous: bool = True) -> None:
        if not Path(MOSQUITTO).exists():
            pytest.fail("mosquitto is not installed: make test installs it (scripts/system-deps.sh)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            # Started as root, mosquitto would switch to user "mosquitto" and could not write here.
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if anonymous else 'false'}\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            f"log_dest file {self.log}\n"
            "log_type all\n"
            "max_queued_messages 10000\n"
            f"{extra}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"mosquitto could not start ({self.proc.returncode}): {err}\n{self.text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        pytest.fail(f"mosquitto did not listen on {self.port}:\n{self.text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Probe:
    """A test's own MQTT v5 client: subscribe, publish with response topic, collect messages."""

    def __init__(
        self,
        port: int,
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        persistent: bool = False,
    ) -> None:
        self.messages: queue.Queue[tuple[str, bytes, Any]] = queue.Queue()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(1, 2)
        self._connected = threading.Event()
        self._subacks: dict[int, list[Any]] = {}
        self._sub_event = threading.Condition()
        self.client.on_connect = lambda c, u, f, rc, p: self._connected.set() if not rc.is_failure else None
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload, m.properties))
        self.client.on_subscribe = self._on_subscribe
        props = Properties(PacketTypes.CONNECT)
        if persistent:
            props.SessionExpiryInterval = 3600
        # connect_async, not connect: connect() before loop_start() leaks a paho socket pair.
        self.client.connect_async("127.0.0.1", port, 30, clean_start=not persistent, properties=props)
        self.client.loop_start()
        if not self._connected.wait(10):
            self.client.loop_stop()
            pytest.fail(f"probe could not connect to the broker on {port}")

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reason_codes: list[Any], _p: Any) -> None:
        with self._sub_event:
            self._subacks[mid] = reason_codes
            self._sub_event.notify_all()

    def subscribe(self, topic: str) -> list[Any]:
        _, mid = self.client.subscribe(topic, qos=1)
        with self._sub_event:
            if not self._sub_event.wait_for(lambda: mid in self._subacks, timeout=10):
                pytest.fail(f"no SUBACK for {topic!r} within 10 s")
        return self._subacks[mid]

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict,
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        retain: bool = False,
    ) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = Properties(PacketTypes.PUBLISH)
        if response_topic:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(10)

    def next(self, timeout: float = 60) -> tuple[str, dict, Any]:
        try:
            topic, payload, props = self.messages.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no MQTT message within {timeout} s")
        return topic, json.loads(payload), props

    def until_final(self, timeout: float = 60) -> tuple[list[dict], dict]:
        """Chunks, then the final answer (done or error), all within ``timeout`` seconds."""
        chunks = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            _, message, _ = self.next(left)
            if "status" in message:
                return chunks, message
            chunks.append(message)
        pytest.fail(f"no final answer within {timeout} s, after {len(chunks)} chunks")

    def finals(self, count: int, timeout: float = 120) -> list[dict]:
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"only {len(out)} of {count} answers within {timeout} s: {[m.get('id') for m in out]}"
                )
            _, message, _ = self.next(remaining)
            if "status" in message:
                out.append(message)
        return out

    def quiet(self, seconds: float) -> list[dict]:
        """Everything that arrives within ``seconds`` (to show that nothing more comes)."""
        out = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(json.loads(self.messages.get(timeout=left)[1]))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
