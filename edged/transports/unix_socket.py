"""The local Unix socket listener: bind it (replacing a stale socket file, refusing a live one), learn
who connects (SO_PEERCRED), and the uvicorn server both listeners run the HTTP app with
(`edged.transports.http.app`; the TCP listener puts its key gate in front: `edged.transports.tcp`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
from collections.abc import Generator
from pathlib import Path

import structlog
import uvicorn
from starlette.types import ASGIApp

from edged.errors import TransportError
from edged.transports.limits import SOCKET_LIMITS, LimitedH11Protocol, ListenerLimits, ServerConfig

log = structlog.get_logger(__name__)


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """Bind and listen on ``path`` with ``mode``; replace a stale file, refuse if edged is live there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise TransportError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError:
            log.info("replacing stale socket", path=str(path))
            path.unlink()
        else:
            raise TransportError(f"another process is already listening on {path} (is edged running?)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


class PeerCredProtocol(LimitedH11Protocol):
    """The HTTP protocol of both listeners (its limits: `edged.transports.limits`), plus who is on
    the other end of a Unix socket connection: the peer's pid, uid and gid from the kernel
    (SO_PEERCRED) as the request's ``client`` host, so each job's log line says which local process
    sent it."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return
        pid, uid, gid = struct.unpack("3i", creds)
        self.client = (f"pid={pid} uid={uid} gid={gid}", 0)


class UnixServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon decides how shutdown proceeds."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(
    app: ASGIApp, *, limits: ListenerLimits = SOCKET_LIMITS, ssl_context: ssl.SSLContext | None = None
) -> UnixServer:
    """A uvicorn server for ``app`` with a listener's connection limits (the Unix socket's unless
    told; the TCP listener's options, TLS included: `edged.transports.tcp.listener_options`)."""
    config = ServerConfig(
        app,
        limits=limits,
        ssl_context=ssl_context,
        http=PeerCredProtocol,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    return UnixServer(config)


def unlink_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()
