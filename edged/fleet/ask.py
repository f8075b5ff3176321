"""`edged ask --mqtt`: send one job to a device (or the fleet) over MQTT and stream the answer back.

This is a requester, like any IoT device would be: it uses the MQTT v5 Response Topic and
Correlation Data, so it is also a worked example of the wire protocol. The client comes from the
shared factory (`edged.mqtt`), so the broker options are those of the daemon and of
`edged fleet`.

Only messages that carry this job's Correlation Data (a fresh random value; edged echoes it on every
chunk and on the final answer) are read: anything else arriving on the reply topic - no
correlation, another one, not a JSON object - is ignored, so nobody who can publish there can
slip an answer in without having seen the job.
"""

from __future__ import annotations

import hmac
import json
import queue
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from paho.mqtt import client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.mqtt.broker import BrokerOptions, BrokerSetupError
from edged.mqtt.client import BrokerUnreachable, Connection

__all__ = ["BrokerOptions", "BrokerUnreachable", "NoAnswer", "ask_over_mqtt"]


class NoAnswer(Exception):
    """No answer arrived in time."""


def ask_over_mqtt(
    broker: BrokerOptions,
    job: dict[str, Any],
    *,
    device: str | None,
    prefix: str = "edged",
    timeout: float = 300.0,
) -> Iterator[dict[str, Any]]:
    """Yield the answer's chunks and, last, the final message (``status`` done or error), from the
    device ``device`` or (None) the fleet. The job always goes over MQTT 5 (it needs the Response
    Topic), whatever ``broker.protocol`` says."""
    options = replace(broker, protocol="5")
    topic = f"{prefix}/{device}/jobs" if device else f"{prefix}/fleet/jobs"
    correlation = uuid.uuid4().hex
    expected = correlation.encode()
    reply = f"replies/{options.username or 'anonymous'}/{correlation}"
    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()

    def on_message(message: paho.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        echoed = getattr(props, "CorrelationData", None)
        if echoed is None or not hmac.compare_digest(bytes(echoed), expected):
            return  # not an answer to this job (a forgery, or a stray message)
        try:
            doc = json.loads(message.payload)
        except (ValueError, RecursionError):
            return
        if isinstance(doc, dict):
            inbox.put(("message", doc))

    try:
        connection = Connection(
            options,
            client_id=f"edged-ask-{correlation[:12]}",
            subscriptions=[(reply, 1)],
            on_message=on_message,
            on_failure=lambda reason: inbox.put(("refused", reason)),
        )
    except BrokerSetupError as exc:
        raise BrokerUnreachable(str(exc)) from exc
    with connection.open(timeout=10):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        props.CorrelationData = correlation.encode()
        connection.client.publish(
            topic, json.dumps({**job, "stream": True}), qos=1, properties=props
        ).wait_for_publish(10)
        while True:
            try:
                kind, value = inbox.get(timeout=timeout)
            except queue.Empty:
                raise NoAnswer(
                    f"no answer on {reply} within {timeout:.0f} s (is a device on {topic}?)"
                ) from None
            if kind == "refused":
                raise BrokerUnreachable(f"MQTT broker {options.address}: {value}")
            message = value
            yield message
            if "status" in message:
                return
