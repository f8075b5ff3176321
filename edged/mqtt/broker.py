"""Where the broker is and how to talk to it: `BrokerOptions`, the same for every edged MQTT client
(the daemon's transport, `edged ask --mqtt`, `edged fleet`).

A broker address is ``HOST``, ``HOST:PORT``, ``[IPV6]:PORT`` or a bare IPv6 address; the options add
user name and password, TLS (CA, client certificate and key, verification) and the protocol (MQTT 5
by default, 3.1.1 on request). TLS is on when asked for (``tls=True``) or when a CA or a client
certificate is given, never guessed from the port; the port defaults to 1883, 8883 with TLS.
`BrokerOptions.from_config` reads the ``mqtt.*`` settings and applies command-line overrides on top.
No paho here: resolving options (the command line, the configuration) does not load the client.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from edged.config import MqttConfig

PLAIN_PORT = 1883
TLS_PORT = 8883

Protocol = Literal["5", "3.1.1"]


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
