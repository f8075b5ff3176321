"""What a connection may hold on either HTTP listener: a deadline to send its request, a cap on idle
keep-alive, a deadline for a response it stops reading, and a number of connections per listener (and
per client address on TCP).

uvicorn alone bounds none of these: its h11 protocol starts no timer when a connection is made, arms
its keep-alive timer only after a response and cancels it on every byte received, and a stream whose
client stops reading waits in ``drain`` forever. A thousand such connections, without a key, exhaust
the daemon's file descriptors, and then the Unix socket, the journal and MQTT fail too. So every
connection is admitted (or refused, before any byte is parsed) by its listener's `Listener`, and
timed by `LimitedH11Protocol`:

- receive: from the connection's start (or the first byte of a later request on a kept-alive
  connection) to the end of the request's body, ``receive_timeout_s``; then 408 and close;
- idle: between requests, ``idle_timeout_s`` (uvicorn's keep-alive timeout);
- send: the transport's write buffer above its high-water mark (the client reads nothing) for
  ``send_timeout_s``: the connection is dropped, which the app sees as a disconnect (a streamed job
  is cancelled).

TLS, when the listener has it, is started by the protocol after the connection is admitted, so a
connection in its handshake counts against the caps and its receive deadline (asyncio's own handshake
timeout is 60 s, for connections nothing would count).

The protocol is h11's, pinned: the timers are written against its request cycle, and its 16 KiB cap
on a request head is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import socket
import ssl
import struct
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from edged.config import HttpConfig, SocketConfig

log = structlog.get_logger(__name__)

RECEIVE_TIMEOUT_S = 10.0
"""Seconds a client has to send a whole request, headers and body (1 MiB in 10 s is 100 kB/s)."""
IDLE_TIMEOUT_S = 5.0
"""Seconds a kept-alive connection may wait for its next request (uvicorn's default, set explicitly)."""
SEND_TIMEOUT_S = 15.0
"""Seconds a response may stay unwritable (the client reads nothing) before the connection is dropped."""
SOCKET_MAX_CONNECTIONS = 128
"""Connections the Unix socket holds at once: its own budget, which TCP clients cannot use up."""
TCP_MAX_CONNECTIONS = 256
"""Connections the TCP listener holds at once (with the socket's, well inside a soft limit of 1024 files)."""
TCP_MAX_CONNECTIONS_PER_CLIENT = 32
"""Connections one client address holds at once on TCP."""
TCP_SEND_BUFFER_BYTES = 16 * 1024
"""SO_SNDBUF of a TCP connection (the kernel doubles it). Left alone, Linux grows it to 4 MiB: a stream
whose client reads nothing would fill that for minutes before anything waits, and 256 such clients
would pin 1 GiB of kernel memory. 32 KiB in flight is ample for token streams on a LAN."""
WRITE_BUFFER_HIGH = 16 * 1024
"""Bytes the event loop buffers for a connection beyond the kernel's before it stops writing to it."""
ACCEPT_BACKLOG = 128
"""listen() backlog, which is also how many connections the loop accepts in one go before any is
refused and closed (uvicorn's 2048 could take a thousand descriptors at once)."""
CLOSE_GRACE_S = 1.0
"""After a polite close (408, 503), the connection is dropped if it is not gone within this time."""
LOG_EVERY_S = 10.0
"""A listener logs at most one line per reason (refused, receive or send timeout) this often; it counts
every one."""

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: 24\r\n\r\ntoo many connections now"
)
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: 33\r\n\r\nthe request was not sent in time\n"
)


@dataclass(frozen=True)
class ListenerLimits:
    name: str
    """``socket`` or ``tcp``: named in log lines."""
    max_connections: int
    max_per_client: int
    """0: no cap per client address (the Unix socket)."""
    receive_timeout_s: float = RECEIVE_TIMEOUT_S
    idle_timeout_s: float = IDLE_TIMEOUT_S
    send_timeout_s: float = SEND_TIMEOUT_S
    send_buffer_bytes: int = 0
    """SO_SNDBUF of each connection; 0: the kernel's (a Unix socket's is small and fixed)."""


SOCKET_LIMITS = ListenerLimits(name="socket", max_connections=SOCKET_MAX_CONNECTIONS, max_per_client=0)
TCP_LIMITS = ListenerLimits(
    name="tcp",
    max_connections=TCP_MAX_CONNECTIONS,
    max_per_client=TCP_MAX_CONNECTIONS_PER_CLIENT,
    send_buffer_bytes=TCP_SEND_BUFFER_BYTES,
)


def socket_limits(socket: SocketConfig, http: HttpConfig) -> ListenerLimits:
    """The Unix socket's limits from the configuration (the timeouts are ``http.*``: both listeners)."""
    return ListenerLimits(
        name="socket",
        max_connections=socket.max_connections,
        max_per_client=0,
        receive_timeout_s=http.receive_timeout_s,
        idle_timeout_s=http.idle_timeout_s,
        send_timeout_s=http.send_timeout_s,
    )


def tcp_limits(http: HttpConfig) -> ListenerLimits:
    """The TCP listener's limits from ``http.*``."""
    return ListenerLimits(
        name="tcp",
        max_connections=http.max_connections,
        max_per_client=http.max_connections_per_client,
        receive_timeout_s=http.receive_timeout_s,
        idle_timeout_s=http.idle_timeout_s,
        send_timeout_s=http.send_timeout_s,
        send_buffer_bytes=TCP_SEND_BUFFER_BYTES,
    )


def address_key(peer: Any) -> str:
    """The client a TCP connection counts for: its address (an IPv4-mapped IPv6 one as IPv4)."""
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    try:
        ip = ipaddress.ip_address(str(host))
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class Listener:
    """One listener's connections: how many are open, by client address, and what was refused."""

    def __init__(self, limits: ListenerLimits) -> None:
        self.limits = limits
        self.open = 0
        self.by_client: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        """Connections refused or closed by a limit, by reason."""
        self._logged: dict[str, float] = {}

    def admit(self, client: str) -> str | None:
        """Count a new connection in; else the reason it is refused (nothing counted)."""
        limits = self.limits
        if self.open >= limits.max_connections:
            return f"{limits.name} listener at max_connections ({limits.max_connections})"
        if limits.max_per_client and self.by_client[client] >= limits.max_per_client:
            return f"client at max_connections_per_client ({limits.max_per_client})"
        self.open += 1
        if limits.max_per_client:
            self.by_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.open -= 1
        if self.limits.max_per_client:
            self.by_client[client] -= 1
            if self.by_client[client] <= 0:
                del self.by_client[client]

    def note(self, reason: str, client: str, message: str) -> None:
        """Count a refused or closed connection; log it unless this reason was logged lately (a flood
        must not become a flood of log lines)."""
        self.closed[reason] += 1
        now = time.monotonic()
        if now - self._logged.get(reason, -math.inf) >= LOG_EVERY_S:
            self._logged[reason] = now
            counts = dict(self.closed)
            log.warning(message, listener=self.limits.name, client=client, reason=reason, counts=counts)


class ServerConfig(uvicorn.Config):
    """uvicorn's config plus the listener's limits and TLS context. uvicorn is given no TLS: the
    protocol starts it itself once a connection is admitted, so the caps count connections still in
    their handshake, the receive deadline covers it, and the TLS settings are edged's whatever
    uvicorn's version (asyncio's own handshake timeout would be 60 s, and uncounted)."""

    def __init__(
        self, app: Any, *, limits: ListenerLimits, ssl_context: ssl.SSLContext | None, **options: Any
    ) -> None:
        super().__init__(
            app,
            http=options.pop("http", LimitedH11Protocol),
            ws="none",  # no upgrade to another protocol: every request is HTTP, through the key gate
            timeout_keep_alive=math.ceil(limits.idle_timeout_s),
            backlog=ACCEPT_BACKLOG,
            **options,
        )
        self.listener = Listener(limits)
        self.ssl_context = ssl_context


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, admitted by its `Listener`, put behind TLS when the listener has it,
    and timed as the module says."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, ServerConfig), "made by edged.transports.unix_socket.make_server"
        self.listener = config.listener
        self.limits = config.listener.limits
        self.tls = config.ssl_context
        self.client_key = ""
        self.admitted = False
        self.attached = False
        """h11 runs on the connection (after the TLS handshake, on TLS)."""
        self.lost = False
        self._raw: asyncio.Transport | None = None
        self._handshake: asyncio.Task[None] | None = None
        self._early = bytearray()
        self._receiving: asyncio.TimerHandle | None = None
        self._unwritable: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        if self.limits.max_per_client:
            self.client_key = address_key(transport.get_extra_info("peername"))
        refused = self.listener.admit(self.client_key)
        if refused is not None:
            self.listener.note("max_connections", self._who(), "connection refused: " + refused)
            if self.tls is not None:
                self._drop()  # no plain-text answer on a TLS port, and no handshake to spend on it
                return
            self._attach(transport)
            transport.write(_REFUSED)
            self._close_politely()
            return
        self.admitted = True
        sock = transport.get_extra_info("socket")
        if self.limits.send_buffer_bytes and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer_bytes)
        self._receiving = self.loop.call_later(self.limits.receive_timeout_s, self._receive_expired)
        if self.tls is None:
            self._attach(transport)
        else:
            transport.pause_reading()  # the ClientHello is the TLS layer's, not h11's
            self._handshake = self.loop.create_task(self._start_tls(transport, self.tls))

    def _attach(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.attached = True
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    async def _start_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        try:
            tls = await self.loop.start_tls(
                raw, self, context, server_side=True, ssl_handshake_timeout=self.limits.receive_timeout_s
            )
        except asyncio.CancelledError:
            self._end_handshake(raw)
            raise
        except Exception:  # a failed, refused or timed-out handshake: the client's problem, not logged
            self._end_handshake(raw)
            return
        self._handshake = None
        if self.lost or tls is None:
            return
        self._attach(tls)
        if self._early:  # what arrived with the end of the handshake, before this task ran again
            early, self._early = bytes(self._early), bytearray()
            self.data_received(early)

    def _end_handshake(self, raw: asyncio.Transport) -> None:
        """The connection ended in its handshake: only here is it known (TLS does not tell the
        protocol), so here its place is given back."""
        self._handshake = None
        self._gone()
        if not raw.is_closing():
            raw.abort()

    def data_received(self, data: bytes) -> None:
        if not self.attached:
            if self._handshake is not None and self.admitted:
                self._early += data  # TLS delivers data as its handshake ends; h11 comes next
            return
        if not self.admitted or self.transport.is_closing():
            return  # refused or being closed: nothing reaches the app
        super().data_received(data)
        self._time_receipt()

    def _time_receipt(self) -> None:
        """Arm the receive deadline while a request is being received, disarm it once it is whole."""
        cycle = self.cycle
        receiving = cycle is None or cycle.response_complete or cycle.more_body
        if not receiving or self.transport.is_closing():
            self._cancel_receiving()
        elif self._receiving is None:
            self._receiving = self.loop.call_later(self.limits.receive_timeout_s, self._receive_expired)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # a pipelined request whose head was already buffered starts here, not in data_received
        cycle = self.cycle
        if not self.lost and cycle is not None and not cycle.response_complete and cycle.more_body:
            self._time_receipt()

    def _receive_expired(self) -> None:
        self._receiving = None
        if self.lost:
            return
        if not self.attached:  # still in the TLS handshake
            self.listener.note("receive_timeout", self._who(), "connection dropped: no TLS handshake in time")
            self._drop()
            return
        if self.transport.is_closing():
            return
        self.listener.note(
            "receive_timeout",
            self._who(),
            f"connection closed: no whole request within {self.limits.receive_timeout_s:g} s",
        )
        if self.cycle is None or self.cycle.response_complete:  # no response under way: say why
            self.transport.write(_TIMED_OUT)
        self._close_politely()

    def pause_writing(self) -> None:
        if not self.attached:
            return
        super().pause_writing()
        if self._unwritable is None:
            self._unwritable = self.loop.call_later(self.limits.send_timeout_s, self._send_expired)

    def resume_writing(self) -> None:
        if not self.attached:
            return
        super().resume_writing()
        if self._unwritable is not None:
            self._unwritable.cancel()
            self._unwritable = None

    def _send_expired(self) -> None:
        self._unwritable = None
        if self.lost:
            return
        self.listener.note(
            "send_timeout",
            self._who(),
            f"connection dropped: the client read nothing for {self.limits.send_timeout_s:g} s",
        )
        self._drop()  # the app sees a disconnect

    def _who(self) -> str:
        """The client for a log line: its address on TCP, the peer's pid/uid/gid on the socket."""
        return self.client_key or (str(self.client[0]) if self.client else "?")

    def _close_politely(self) -> None:
        """Close after what is written; drop the connection if it lingers (a TLS peer may never
        answer the close)."""
        self.transport.close()
        self.loop.call_later(CLOSE_GRACE_S, self._drop_if_open)

    def _drop_if_open(self) -> None:
        if not self.lost:
            self._drop()

    def _drop(self) -> None:
        """Close now, unsent data and all. On TCP with a reset (SO_LINGER 0): a plain close would
        queue the FIN behind data a client that reads nothing never takes, and the kernel would
        keep the connection and its buffers for minutes after the descriptor is gone."""
        transport = self.transport if self.attached else self._raw
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def _cancel_receiving(self) -> None:
        if self._receiving is not None:
            self._receiving.cancel()
            self._receiving = None

    def _gone(self) -> None:
        """The connection is over: stop its timers and give its place back (once)."""
        self.lost = True
        self._cancel_receiving()
        if self._unwritable is not None:
            self._unwritable.cancel()
            self._unwritable = None
        if self.admitted:
            self.admitted = False
            self.listener.release(self.client_key)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        if self._handshake is not None:  # lost before TLS took the connection over
            self._handshake.cancel()
        if self.attached:
            super().connection_lost(exc)

    def _unsupported_upgrade_warning(self) -> None:
        """An ``Upgrade`` header is answered as plain HTTP (``ws="none"``); uvicorn would log two
        warning lines per such request, a log flood anyone can send."""
