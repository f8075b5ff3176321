"""The one MQTT client factory of edged: the daemon, `edged ask --mqtt` and `edged fleet` all build
their paho client here from `BrokerOptions` (`edged.mqtt.broker`), so they treat the broker options
the same way: protocol, credentials, TLS and the reconnect back-off.

`make_client` + `start` are the low-level pair (the daemon's transport needs its own callbacks,
persistent session and manual acknowledgements); `Connection` is the ready-made client of the
command-line tools: it connects, subscribes (again after every reconnect), and `open` reports the
first outcome, raising `BrokerUnreachable` if the broker cannot be reached or refuses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from paho.mqtt import client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edged.mqtt.broker import BrokerOptions

log = structlog.get_logger(__name__)


class BrokerUnreachable(Exception):
    """The broker did not accept the connection or the subscription."""


def make_client(
    options: BrokerOptions, client_id: str, *, persistent: bool = False, manual_ack: bool = False
) -> paho.Client:
    """A paho client (callback API 2) set up from ``options``: protocol, credentials, TLS and the
    reconnect back-off. ``persistent`` keeps the session across connections (3.1.1: clean session
    off; 5: see `start`). Set the callbacks and the will, then call `start`."""
    v5 = options.protocol == "5"
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else not persistent,
        manual_ack=manual_ack,
    )
    if options.username is not None:
        client.username_pw_set(options.username, options.password)
    context = options.tls_context()
    if context is not None:
        client.tls_set_context(context)
    client.reconnect_delay_set(options.reconnect_min_s, options.reconnect_max_s)
    return client


def start(
    client: paho.Client,
    options: BrokerOptions,
    *,
    properties: Properties | None = None,
    persistent: bool = False,
) -> None:
    """Connect in paho's own network thread, which also reconnects. (connect_async, then loop_start:
    connect() before loop_start() leaks paho's wake-up socket pair.)"""
    kwargs: dict[str, Any] = {"properties": properties}
    if options.protocol == "5":
        kwargs["clean_start"] = not persistent
    client.connect_async(options.host, options.effective_port, options.keepalive_s, **kwargs)
    client.loop_start()


def stop(client: paho.Client) -> None:
    """Disconnect and stop the network thread (safe on a client that never connected)."""
    client.disconnect()
    client.loop_stop()


MessageHandler = Callable[[paho.MQTTMessage], None]


class Connection:
    """A started client that subscribes to ``subscriptions`` after every (re)connection.

    `open` waits for the first connection and its SUBACKs and raises `BrokerUnreachable` if the
    broker cannot be reached, refuses the login or refuses a subscription. Afterwards paho
    reconnects by itself; ``on_failure`` hears of each later failure, `connected` tells the state.
    ``on_message`` runs in paho's network thread. An exception it raises is logged (once per type)
    and counted in `handler_errors`, never passed on: paho 2.2 re-raises it out of its loop, which
    ends the network thread for good while `connected` still says True.
    """

    def __init__(
        self,
        options: BrokerOptions,
        *,
        client_id: str,
        subscriptions: Iterable[tuple[str, int]] = (),
        on_message: MessageHandler | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self.subscriptions = list(subscriptions)
        self._on_message = on_message
        self._on_failure = on_failure
        self._outcome = threading.Event()
        self._failure: str | None = None
        self._connected = False
        self._started = False
        self.handler_errors = 0
        """Messages whose ``on_message`` raised (skipped; the connection carries on)."""
        self._logged_errors: set[str] = set()
        self.client = make_client(options, client_id)
        self.client.on_connect = self._connected_cb
        self.client.on_connect_fail = self._connect_failed
        self.client.on_disconnect = self._disconnected
        self.client.on_subscribe = self._subscribed
        self.client.on_message = self._message

    @property
    def connected(self) -> bool:
        return self._connected

    def open(self, timeout: float = 10.0) -> Connection:
        """Connect and subscribe; raises `BrokerUnreachable` (the client is stopped then)."""
        self._started = True
        start(self.client, self.options)
        if not self._outcome.wait(timeout):
            self.close()
            raise BrokerUnreachable(f"no answer from MQTT broker {self.options.address} within {timeout:g} s")
        if self._failure is not None:
            self.close()
            raise BrokerUnreachable(f"MQTT broker {self.options.address}: {self._failure}")
        return self

    def close(self) -> None:
        if self._started:
            self._started = False
            stop(self.client)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _fail(self, reason: str) -> None:
        if self._outcome.is_set():
            if self._on_failure is not None:
                self._on_failure(reason)
            return
        self._failure = reason
        self._outcome.set()

    def _connected_cb(self, client: paho.Client, _u: Any, _flags: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            self._fail(f"refused the connection: {reason}")
            return
        self._connected = True
        if not self.subscriptions:
            self._outcome.set()
            return
        client.subscribe(self.subscriptions)

    def _subscribed(self, _c: paho.Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any) -> None:
        topics = [topic for topic, _ in self.subscriptions]
        refused = [f"{topic} ({code})" for topic, code in zip(topics, codes) if code.is_failure]  # noqa: B905
        if refused:
            self._fail(f"refused the subscription to {', '.join(refused)}")
        else:
            self._outcome.set()

    def _connect_failed(self, _c: paho.Client, _u: Any) -> None:
        self._fail("cannot connect (is the broker running, and the address, port and TLS options right?)")

    def _disconnected(self, _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._connected = False
        if reason.is_failure and self._outcome.is_set() and self._on_failure is not None:
            self._on_failure(f"disconnected: {reason}")

    def _message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(message)
        except Exception as exc:  # RecursionError included: one message must not end the thread
            self.handler_errors += 1
            name = type(exc).__name__
            if name not in self._logged_errors:
                self._logged_errors.add(name)
                topic = bytes(getattr(message, "_topic", b""))[:200].decode("utf-8", "replace")
                log.warning("mqtt message handler failed; message skipped", topic=topic, exc_info=True)
