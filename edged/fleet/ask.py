"""`edged ask --mqtt`: send one job to a device (or the fleet) over MQTT and stream the answer back.

This is a requester, like any IoT device would be: it uses the MQTT v5 Response Topic and
Correlation Data, so it is also a worked example of the wire protocol.
"""

from __future__ import annotations

import json
import queue
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paho.mqtt import client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class BrokerUnreachable(Exception):
    """The broker did not accept the connection or the subscription."""


class NoAnswer(Exception):
    """No answer arrived in time."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> Target:
        host, sep, port = text.rpartition(":")
        if sep and port.isdigit() and host:
            return cls(host, int(port))
        return cls(text, None)


def ask_over_mqtt(
    target: Target,
    job: dict[str, Any],
    *,
    device: str | None,
    prefix: str = "edged",
    username: str | None = None,
    password: str | None = None,
    ca: Path | None = None,
    timeout: float = 300.0,
) -> Iterator[dict[str, Any]]:
    """Yield the answer's chunks and, last, the final message (``status`` done or error)."""
    topic = f"{prefix}/{device}/jobs" if device else f"{prefix}/fleet/jobs"
    correlation = uuid.uuid4().hex
    reply = f"replies/{username or 'anonymous'}/{correlation}"
    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()

    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=f"edged-ask-{correlation[:12]}", protocol=paho.MQTTv5
    )
    if username:
        client.username_pw_set(username, password)
    if ca is not None or (target.port == 8883):
        client.tls_set_context(ssl.create_default_context(cafile=str(ca) if ca else None))

    def on_connect(c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            inbox.put(("refused", str(reason)))
        else:
            c.subscribe(reply, qos=1)

    def on_subscribe(_c: paho.Client, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        if codes and codes[0].is_failure:
            inbox.put(("refused", f"subscription to {reply} refused: {codes[0]}"))
        else:
            inbox.put(("subscribed", None))

    def on_message(_c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        echoed = getattr(props, "CorrelationData", None)
        if echoed is not None and bytes(echoed) != correlation.encode():
            return
        inbox.put(("message", message.payload))

    client.on_connect = on_connect
    client.on_connect_fail = lambda _c, _u: inbox.put(("refused", "cannot connect"))
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    port = target.port or (8883 if ca else 1883)
    # connect_async + loop_start (connect() before loop_start() leaks paho's wake-up socket pair)
    client.connect_async(target.host, port, keepalive=30)
    client.loop_start()
    try:
        try:
            kind, value = inbox.get(timeout=10)
        except queue.Empty:
            raise BrokerUnreachable(f"no answer from MQTT broker {target.host}:{port}") from None
        if kind == "refused":
            raise BrokerUnreachable(f"MQTT broker {target.host}:{port} refused: {value}")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        props.CorrelationData = correlation.encode()
        client.publish(topic, json.dumps({**job, "stream": True}), qos=1, properties=props).wait_for_publish(
            10
        )
        while True:
            try:
                kind, value = inbox.get(timeout=timeout)
            except queue.Empty:
                raise NoAnswer(
                    f"no answer on {reply} within {timeout:.0f} s (is a device on {topic}?)"
                ) from None
            if kind == "refused":
                raise BrokerUnreachable(str(value))
            message = json.loads(value)
            yield message
            if "status" in message:
                return
    finally:
        client.disconnect()
        client.loop_stop()
