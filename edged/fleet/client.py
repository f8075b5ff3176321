"""The one MQTT client factory of edged: the daemon, `edged ask --mqtt` and `edged fleet` all build
their paho client here, so they accept the same broker options and treat them the same way.

`BrokerOptions` says where and how to connect: ``HOST``, ``HOST:PORT``, ``[IPV6]:PORT`` or a bare
IPv6 address, user name and password, TLS (CA, client certificate and key, verification) and the
protocol (MQTT 5 by default, 3.1.1 on request). TLS is on when asked for (``tls=True``) or when a
CA or a client certificate is given, never guessed from the port; the port defaults to 1883, 8883
with TLS. `BrokerOptions.from_config` reads the ``mqtt.*`` settings and applies command-line
overrides on top.

`make_client` + `start` are the low-level pair (the daemon's transport needs its own callbacks,
persistent session and manual acknowledgements); `Connection` is the ready-made client of the
command-line tools: it connects, subscribes (again after every reconnect), and `open` reports the
first outcome, raising `BrokerUnreachable` if the broker cannot be reached or refuses.
"""

from __future__ import annotations

import ipaddress
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog
from paho.mqtt import client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

if TYPE_CHECKING:
    from edged.config import MqttConfig

log = structlog.get_logger(__name__)

PLAIN_PORT = 1883
TLS_PORT = 8883

Protocol = Literal["5", "3.1.1"]


class BrokerUnreachable(Exception):
    """The broker did not accept the connection or the subscription."""


class BrokerSetupError(ValueError):
    """The options cannot work: a malformed address, a missing TLS file, a certificate without its key."""


def parse_address(text: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT``, ``[IPV6]``, ``[IPV6]:PORT`` or a bare IPv6 address -> (host, port).

    A bare IPv6 address has no port (``::1`` is the host ``::1``); give a port with brackets:
    ``[::1]:1883``. Raises `BrokerSetupError` for anything else.
    """
    text = text.strip()
    if not text:
        raise BrokerSetupError("the broker address is empty: give HOST[:PORT]")
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or not inside:
            raise BrokerSetupError(f"unclosed IPv6 bracket in {text!r}: write [ADDRESS]:PORT")
        _check_ipv6(inside, text)
        if not rest:
            return inside, None
        if not rest.startswith(":"):
            raise BrokerSetupError(f"after ] comes :PORT, in {text!r}")
        return inside, _port(rest[1:], text)
    if text.count(":") > 1:
        _check_ipv6(text, text)
        return text, None
    host, sep, port = text.partition(":")
    if not host:
        raise BrokerSetupError(f"no host before the port in {text!r}")
    return host, (_port(port, text) if sep else None)


def _check_ipv6(address: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        raise BrokerSetupError(
            f"{address!r} is not an IPv6 address (in {text!r}); an IPv6 address with a port is [ADDRESS]:PORT"
        ) from None


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BrokerSetupError(f"the port in {whole!r} must be a number from 1 to 65535")
    return int(text)


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the handshake fails: paho (2.2) leaves such a socket open (one file
    descriptor per failed TLS attempt, until garbage collection)."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


@dataclass(frozen=True)
class BrokerOptions:
    """Where the broker is and how to talk to it; the same for every edged MQTT client."""

    host: str
    port: int | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool | None = None
    """True/False forces TLS on/off; None = on when ``ca`` or ``cert`` is given."""
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    verify: bool = True
    """Verify the broker's certificate and host name (off only for a test broker)."""
    protocol: Protocol = "5"
    keepalive_s: int = 30
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30

    @property
    def tls_active(self) -> bool:
        return self.tls if self.tls is not None else bool(self.ca or self.cert)

    @property
    def effective_port(self) -> int:
        return self.port or (TLS_PORT if self.tls_active else PLAIN_PORT)

    @property
    def address(self) -> str:
        """``host:port`` for messages (``[::1]:1883`` for IPv6)."""
        return format_address(self.host, self.effective_port)

    @classmethod
    def parse(cls, address: str, **options: Any) -> BrokerOptions:
        """``BrokerOptions.parse("[::1]:1883", username="u")``; raises `BrokerSetupError`."""
        host, port = parse_address(address)
        return cls(host, port, **options).checked()

    @classmethod
    def from_config(
        cls, cfg: MqttConfig, address: str | None = None, overrides: Mapping[str, Any] | None = None
    ) -> BrokerOptions:
        """The ``mqtt.*`` settings, then ``address`` (``HOST[:PORT]``, replacing mqtt.host and
        mqtt.port), then ``overrides`` (field name -> value; None values are ignored). Raises
        `BrokerSetupError` when no host is known or the result cannot work."""
        if address is not None:
            host, port = parse_address(address)
        elif cfg.host:
            host, port = parse_address(cfg.host)
            port = cfg.port or port
        else:
            raise BrokerSetupError("no broker: give --mqtt HOST[:PORT] or set mqtt.host in the configuration")
        options = cls(
            host=host,
            port=port,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password is not None else None,
            tls=cfg.tls.enabled,
            ca=cfg.tls.ca,
            cert=cfg.tls.cert,
            key=cfg.tls.key,
            verify=cfg.tls.verify,
            protocol=cfg.protocol,
            keepalive_s=cfg.keepalive_s,
            reconnect_min_s=cfg.reconnect_min_s,
            reconnect_max_s=cfg.reconnect_max_s,
        )
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        return replace(options, **given).checked()

    def checked(self) -> BrokerOptions:
        """Self, or `BrokerSetupError` naming what cannot work."""
        if (self.cert is None) != (self.key is None):
            raise BrokerSetupError("a TLS client certificate and its key go together: give both or neither")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise BrokerSetupError(f"TLS {name}: no such file {path}")
        if self.protocol not in ("5", "3.1.1"):
            raise BrokerSetupError(f"MQTT protocol must be 5 or 3.1.1, not {self.protocol!r}")
        return self

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context these options ask for, or None for plain TCP; raises `BrokerSetupError`."""
        if not self.tls_active:
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
            if self.cert is not None and self.key is not None:
                context.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise BrokerSetupError(f"cannot set up TLS for MQTT: {exc}") from exc
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.sslsocket_class = _ClosingSSLSocket
        return context


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
