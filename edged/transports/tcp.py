"""The optional TCP listener (``http.listen``): the socket's very app, behind a key gate.

One set of handlers, two listeners: the Unix socket is guarded by its file permissions, the TCP
listener by API keys (``Authorization: Bearer <key>``, which both OpenAI and Ollama clients can send),
a per-key rate limit, and optionally TLS. Keys may be stored as ``sha256:<hex>`` so the configuration
holds no secret; jobs log the key's name, never the key. ``/metrics`` is not served here (the metrics
port stays separate and loopback by default).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from edged.config import HttpConfig, is_loopback
from edged.errors import ConfigError, NotFound, RateLimited, TransportError, Unauthorized
from edged.transports.http.errors import send_error, shape_of
from edged.transports.limits import ACCEPT_BACKLOG, tcp_limits
from edged.transports.ratelimit import RateLimiter, client_key

log = structlog.get_logger(__name__)

HASH_PREFIX = "sha256:"
NOT_ON_TCP = ("/metrics", "/v1/jobs")
"""Local only: the metrics, and the job list (every client's jobs; one job by its id stays reachable)."""
OPEN_ON_TCP = ("/health",)
"""Served without a key (load balancers and Docker health checks): it tells only ready or not."""


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def load_keys(config: HttpConfig) -> dict[str, str]:
    """Key name -> ``sha256:<hex>``, from ``api_keys`` and ``api_keys_file``; raises `ConfigError`."""
    keys: dict[str, str] = {}
    problems: list[str] = []

    def add(name: str, value: str, where: str) -> None:
        if value.startswith(HASH_PREFIX):
            digest = value[len(HASH_PREFIX) :].lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                problems.append(f"{where}: key {name!r}: sha256 needs 64 hex digits")
                return
            keys[name] = HASH_PREFIX + digest
        else:
            keys[name] = hash_key(value)

    for name, secret in config.api_keys.items():
        add(name, secret.get_secret_value(), "http.api_keys")
    if config.api_keys_file is not None:
        path = config.api_keys_file
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError([f"http.api_keys_file: cannot read {path}: {exc.strerror or exc}"]) from exc
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            parts = text.split()
            if len(parts) != 2:
                problems.append(f"{path}:{number}: expected 'NAME KEY' or 'NAME sha256:<hex>'")
                continue
            add(parts[0], parts[1], f"{path}:{number}")
        if not keys and not problems:
            problems.append(f"http.api_keys_file: {path} holds no keys")
    if problems:
        raise ConfigError(problems)
    return keys


@dataclass(frozen=True)
class Caller:
    key: str
    """The key's name, or ``anonymous``."""
    address: str


class KeyGate:
    """ASGI middleware in front of the app on the TCP listener.

    Only ``http`` requests pass it (and ``lifespan``, which carries no request): any other scope,
    a websocket today or whatever ASGI adds, is refused before the app sees it."""

    REFUSALS_LOGGED_PER_MIN = 2
    """401 lines logged per minute and client address; `refused_keys` counts them all."""

    def __init__(self, app: ASGIApp, config: HttpConfig, keys: dict[str, str]) -> None:
        self.app = app
        self.keys = keys
        self.anonymous = config.allow_anonymous or (not keys and _loopback_only(config))
        self.limiter = RateLimiter(config.rate_limit_per_min)
        self.refused_keys = 0
        self._refusals_logged = RateLimiter(self.REFUSALS_LOGGED_PER_MIN)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})  # before accept: a 403
            return
        scope.setdefault("state", {})[TCP_MARK] = True
        path: str = scope.get("path", "")
        client = scope.get("client") or ("?", 0)
        address = str(client[0])
        if path in NOT_ON_TCP:
            await send_error(send, NotFound(f"{path} is not served on the TCP listener"), shape_of(path))
            return
        if path in OPEN_ON_TCP:
            await self.app(scope, receive, send)
            return
        presented = _bearer(scope)
        name = self._identify(presented)
        if name is None:
            if presented is not None or not self.anonymous:
                self.refused_keys += 1
                if self._refusals_logged.take(client_key(address)) == 0:
                    log.warning(
                        "tcp request refused",
                        path=path,
                        client=address,
                        key_given=presented is not None,
                        refused_total=self.refused_keys,
                    )
                message = "a wrong API key" if presented is not None else "no API key"
                await send_error(
                    send,
                    Unauthorized(f"{message}: send 'Authorization: Bearer <key>' (a key from http.api_keys)"),
                    shape_of(path),
                    {"www-authenticate": 'Bearer realm="edged"'},
                )
                return
            name = "anonymous"
        wait = self.limiter.take(name if name != "anonymous" else f"anonymous@{client_key(address)}")
        if wait > 0:
            retry = max(1, math.ceil(wait))
            limited = RateLimited(
                f"key {name!r} is over http.rate_limit_per_min ({self.limiter.per_min}); retry in {retry} s",
                retry_after=retry,
            )
            await send_error(send, limited, shape_of(path), {"retry-after": str(retry)})
            return
        scope["state"]["edged_caller"] = Caller(key=name, address=address)
        await self.app(scope, receive, send)

    def _identify(self, presented: str | None) -> str | None:
        if presented is None:
            return None
        digest = hash_key(presented)
        found = None
        for name, stored in self.keys.items():  # every key compared, in constant time each
            if hmac.compare_digest(digest, stored):
                found = name
        return found


TCP_MARK = "edged_tcp"
"""Scope state the key gate sets on every request it passes, /health included."""


def on_tcp(request: Any) -> bool:
    """Whether the request came through the TCP listener (its key gate), not the Unix socket."""
    state = request.scope.get("state", {})
    return bool(state.get(TCP_MARK)) or isinstance(state.get("edged_caller"), Caller)


def origin_of(request: Any) -> str:
    """``tcp:<key name>`` on the TCP listener (its key gate says who), else ``socket``."""
    caller = request.scope.get("state", {}).get("edged_caller")
    return f"tcp:{caller.key}" if isinstance(caller, Caller) else "socket"


def _loopback_only(config: HttpConfig) -> bool:
    address = config.address
    return address is not None and is_loopback(address[0])


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""  # present but not a bearer token: a wrong key, not anonymous
        if name == b"x-api-key":  # what some clients send instead
            return value.decode("latin-1").strip()
    return None


def bind_tcp(config: HttpConfig) -> socket.socket:
    """Bind and listen on ``http.listen``; raises `TransportError` with the reason."""
    address = config.address
    assert address is not None
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TransportError(f"http.listen {config.listen}: cannot resolve {host!r}: {exc.strerror}") from exc
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # [::] takes IPv4 too
        sock.bind(sockaddr)
        sock.listen(ACCEPT_BACKLOG)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {config.listen}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!aDSS"
"""TLS 1.2 suites: forward secrecy and AEAD only (no CBC, no SHA-1). TLS 1.3's suites are all of that."""


def server_tls_context(config: HttpConfig) -> ssl.SSLContext | None:
    """The listener's TLS: at least TLS 1.2 with `TLS_CIPHERS`, set here rather than left to the
    defaults of uvicorn (older versions offered TLS 1.0 era suites) or of Python's build. None
    without a certificate; raises `ConfigError` when the files cannot be loaded."""
    if config.tls.cert is None or config.tls.key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS_CIPHERS)
    try:
        context.load_cert_chain(str(config.tls.cert), str(config.tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"http.tls: cannot load {config.tls.cert} / {config.tls.key}: {exc}"]) from exc
    return context


def check_tls(config: HttpConfig) -> None:
    """Load the certificate and key once at start, so a bad file is a clear error, not a dead listener."""
    server_tls_context(config)


def listener_options(config: HttpConfig) -> dict[str, Any]:
    """`make_server`'s options for the TCP listener: its connection limits and its TLS context."""
    return {"limits": tcp_limits(config), "ssl_context": server_tls_context(config)}


def describe(config: HttpConfig, keys: dict[str, str]) -> dict[str, Any]:
    """The listener for /status (key names only)."""
    return {
        "listen": config.listen,
        "tls": config.tls.cert is not None,
        "keys": sorted(keys),
        "anonymous": config.allow_anonymous,
        "rate_limit_per_min": config.rate_limit_per_min,
    }


def public_status(doc: dict[str, Any]) -> dict[str, Any]:
    """/status as the TCP listener serves it: what a client needs to pick a board and see its load.
    Built from an allowlist, so a field added to the full document is not published by default: no
    pid, no file paths, no broker, topics or key names, no job ids or origins, no listeners."""
    board = doc.get("board") or {}
    backend = doc.get("backend") or {}
    model = doc.get("model") or {}
    engine = doc.get("engine") or {}
    governor = (doc.get("thermals") or {}).get("governor") or {}
    return {
        "device_id": doc.get("device_id"),
        "version": doc.get("version"),
        "reduced": True,
        "board": {"model": board.get("model"), "soc": board.get("soc"), "profile": board.get("profile")},
        "backend": {"name": backend.get("name")},
        "model": {"name": model.get("name"), "ctx": model.get("ctx")},
        "engine": {
            "state": engine.get("state"),
            "slots": engine.get("slots"),
            "queue": engine.get("queue"),
            "running": [
                {"state": job.get("state"), "completion_tokens": job.get("completion_tokens")}
                for job in engine.get("running") or []
            ],
            "thermal": engine.get("thermal"),
            "throughput": engine.get("throughput"),
        },
        "thermals": {
            "state": governor.get("state"),
            "hottest_c": governor.get("hottest_c"),
            "hottest_zone": governor.get("hottest_zone"),
        },
    }
